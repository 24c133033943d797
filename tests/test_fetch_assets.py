"""tools/fetch_assets.py: rendering determinism, sizes and labels, cache idempotency, failures.

Rendering is tested on a tiny set (two cached images, two cached fonts, a few images per
set); nothing is downloaded when the cache is present."""
import json
import subprocess
from pathlib import Path

import numpy as np
import pytest

from tools import fetch_assets as fa

PIL = pytest.importorskip("PIL")
from PIL import Image  # noqa: E402


@pytest.fixture(scope="module")
def cache():
    dest = fa.assets_dir()
    manifest = fa._read_manifest(dest)
    have = {rel.split("/", 1)[0] for rel in manifest.get("files", {})}
    if not {"models", "images", "fonts"} <= have:
        try:
            fa.fetch(dest)
        except SystemExit as exc:
            pytest.skip(f"assets cache absent and cannot be fetched: {exc}")
    return dest


@pytest.fixture(scope="module")
def tiny(cache):
    images = fa.background_images(cache / "images")[:2]
    fonts = [cache / "fonts" / "DejaVuSans.ttf", cache / "fonts" / "DejaVuSerif.ttf"]
    return images, fonts


@pytest.fixture(scope="module")
def rendered(tiny, tmp_path_factory):
    images, fonts = tiny
    a, b = tmp_path_factory.mktemp("render_a"), tmp_path_factory.mktemp("render_b")
    return (a, fa.render(a, images, fonts, count=6)), (b, fa.render(b, images, fonts, count=6))


def _files(root: Path) -> dict:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_render_is_byte_deterministic(rendered):
    (a, hashes_a), (b, hashes_b) = rendered
    files_a, files_b = _files(a), _files(b)
    assert files_a == files_b
    assert hashes_a == hashes_b
    assert set(files_a) == set(hashes_a)
    assert len([f for f in files_a if f.endswith(".png")]) == 12


def test_render_sizes_and_metadata(rendered):
    (a, _), _ = rendered
    for folder, size in (("text_cls", (192, 48)), ("text_det", (320, 320))):
        pngs = sorted((a / folder).glob("*.png"))
        assert len(pngs) == 6
        for p in pngs:
            with Image.open(p) as im:
                assert im.format == "PNG" and im.mode == "RGB" and im.size == size
                assert not im.info.get("icc_profile") and not getattr(im, "text", {})
                assert np.asarray(im).std() > 5  # a real background with text, not a flat fill


def test_cls_labels(rendered):
    (a, _), _ = rendered
    labels = json.loads((a / "text_cls" / "labels.json").read_text())
    assert sorted(labels) == [p.name for p in sorted((a / "text_cls").glob("*.png"))]
    assert set(labels.values()) == {0, 180}


def test_det_boxes(rendered):
    (a, _), _ = rendered
    boxes = json.loads((a / "text_det" / "boxes.json").read_text())
    assert sorted(boxes) == [p.name for p in sorted((a / "text_det").glob("*.png"))]
    for lines in boxes.values():
        assert 1 <= len(lines) <= 6
        for x0, y0, x1, y1, text in lines:
            assert 0 <= x0 < x1 <= 320 and 0 <= y0 < y1 <= 320 and text


def test_smaller_count_renders_a_prefix(rendered, tiny, tmp_path):
    (a, _), _ = rendered
    images, fonts = tiny
    fa.render(tmp_path, images, fonts, count=2)
    for folder in ("text_cls", "text_det"):
        names = sorted(p.name for p in (tmp_path / folder).glob("*.png"))
        assert len(names) == 2
        for name in names:
            assert (tmp_path / folder / name).read_bytes() == (a / folder / name).read_bytes()
    labels = json.loads((tmp_path / "text_cls" / "labels.json").read_text())
    full = json.loads((a / "text_cls" / "labels.json").read_text())
    assert labels == {k: full[k] for k in labels}


def test_rerender_replaces_old_files(tiny, tmp_path):
    images, fonts = tiny
    fa.render(tmp_path, images, fonts, count=3)
    fa.render(tmp_path, images, fonts, count=1)
    assert sorted(p.name for p in (tmp_path / "text_cls").iterdir()) == ["cls_0000.png", "labels.json"]


def test_fetch_is_a_no_op_on_a_complete_cache(cache, monkeypatch):
    manifest = fa._read_manifest(cache)
    if "count" not in manifest:
        pytest.skip("cache has no rendered text images")

    def no_download(*args, **kwargs):
        raise AssertionError("fetch downloaded although the cache is complete")

    monkeypatch.setattr(fa.subprocess, "run", no_download)
    monkeypatch.setattr(fa, "render", no_download)
    before = {p: p.stat().st_mtime_ns for p in cache.rglob("*") if p.is_file()}
    assert fa.fetch(cache, count=manifest["count"]) == cache
    assert {p: p.stat().st_mtime_ns for p in cache.rglob("*") if p.is_file()} == before
    # A smaller request (the tests' and the bench's default after a larger --count) keeps the larger cache.
    assert fa.fetch(cache, count=manifest["count"] - 1) == cache
    assert {p: p.stat().st_mtime_ns for p in cache.rglob("*") if p.is_file()} == before


def test_a_cache_rendered_again_keeps_its_larger_count(cache, monkeypatch, tmp_path):
    import shutil
    sources = {rel: sha for rel, sha in fa._read_manifest(cache)["files"].items()
               if rel.split("/", 1)[0] in ("models", "images", "fonts")}

    def copy_sources(dest, log):  # the wheels' files, from the real cache instead of pip
        for rel in sources:
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(cache / rel, dest / rel)
        return dict(sources)

    monkeypatch.setattr(fa, "_fetch_sources", copy_sources)
    dest = tmp_path / "assets"
    fa.fetch(dest, count=3)
    manifest = fa._read_manifest(dest)
    manifest["sources"] = {"an-older-wheel": "0.1"}  # as after a new model joins SOURCES
    (dest / fa.MANIFEST).write_text(json.dumps(manifest))
    fa.fetch(dest, count=2)  # the bench's and the tests' default request
    assert fa._read_manifest(dest)["count"] == 3
    assert len(list((dest / "text_det").glob("det_*.png"))) == 3


def test_assets_dir_honours_env(monkeypatch, tmp_path):
    monkeypatch.setenv("QCC_ASSETS", str(tmp_path))
    assert fa.assets_dir() == tmp_path
    monkeypatch.delenv("QCC_ASSETS")
    assert fa.assets_dir() == fa.REPO / ".cache" / "qcc-assets"


def test_pip_failure_is_one_clear_line(monkeypatch, tmp_path, capsys):
    def failing_pip(cmd, **kwargs):
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: No matching distribution found\n")

    monkeypatch.setattr(fa.subprocess, "run", failing_pip)
    with pytest.raises(SystemExit) as exc:
        fa.fetch(tmp_path / "assets")
    message = str(exc.value)
    assert "rapidocr-onnxruntime==1.4.4" in message and "package registry" in message

    assert fa.main(["--dest", str(tmp_path / "assets")]) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "package registry" in err
