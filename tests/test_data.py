"""Calibration data folders: formats, order, validation errors that name the file, split, progress."""
import io

import numpy as np
import pytest
from PIL import Image

from compiler.data import Dataset, ImageOptions, InputSpec
from compiler.ir import QccError
from compiler.progress import Progress

X = InputSpec("x", (1, 3, 4, 6), np.dtype(np.float32))
DYNAMIC = InputSpec("x", (None, 3, None, None), np.dtype(np.float32))


def _npy_folder(tmp_path, count=5):
    rng = np.random.default_rng(0)
    arrays = {}
    for i in reversed(range(count)):  # written out of order; read back sorted
        arrays[f"s{i:02d}.npy"] = rng.standard_normal((1, 3, 4, 6)).astype(np.float32)
        np.save(tmp_path / f"s{i:02d}.npy", arrays[f"s{i:02d}.npy"])
    return arrays


def test_npy_folder_in_sorted_order_with_count_cap(tmp_path):
    arrays = _npy_folder(tmp_path)
    data = Dataset(tmp_path, [X], count=3)
    assert len(data) == 3
    assert [f.name for f in data.files] == ["s00.npy", "s01.npy", "s02.npy"]
    for sample, name in zip(data, ["s00.npy", "s01.npy", "s02.npy"]):
        assert set(sample) == {"x"}
        np.testing.assert_array_equal(sample["x"], arrays[name])


def test_missing_batch_dimension_is_added_and_float64_cast(tmp_path):
    np.save(tmp_path / "a.npy", np.ones((3, 4, 6)))  # float64, no batch dim
    sample = Dataset(tmp_path, [X])[0]
    assert sample["x"].shape == (1, 3, 4, 6) and sample["x"].dtype == np.float32


def test_npz_keyed_by_input_name(tmp_path):
    y = InputSpec("y", (2,), np.dtype(np.int64))
    np.savez(tmp_path / "a.npz", x=np.zeros((1, 3, 4, 6), np.float32), y=np.array([1, 2], np.int32))
    sample = Dataset(tmp_path, [X, y])[0]
    assert sample["y"].dtype == np.int64 and list(sample["y"]) == [1, 2]


@pytest.mark.parametrize("arrays, message", [
    ({"y": np.zeros((1, 3, 4, 6), np.float32)}, "missing input 'x'"),
    ({"x": np.zeros((1, 3, 4, 6), np.float32), "z": np.zeros(1)}, "unexpected array 'z'"),
    ({"x": np.zeros((1, 3, 5, 6), np.float32)}, "has shape [1, 3, 5, 6], the model expects [1,3,4,6]"),
    ({"x": np.zeros((1, 3, 4, 6), np.int64)}, "has dtype int64, the model expects float32"),
    ({"x": np.full((1, 3, 4, 6), np.nan, np.float32)}, "NaN or infinite"),
])
def test_bad_sample_errors_name_the_file_and_mismatch(tmp_path, arrays, message):
    np.savez(tmp_path / "good.npz", x=np.zeros((1, 3, 4, 6), np.float32))
    np.savez(tmp_path / "bad.npz", **arrays)
    data = Dataset(tmp_path, [X])
    with pytest.raises(QccError) as err:
        list(data)
    assert "bad.npz" in str(err.value) and message in str(err.value)


def test_unreadable_file_is_named(tmp_path):
    (tmp_path / "broken.npy").write_bytes(b"not numpy")
    with pytest.raises(QccError, match="broken.npy: cannot read"):
        Dataset(tmp_path, [X])[0]


def test_npy_needs_single_input_model(tmp_path):
    _npy_folder(tmp_path, 1)
    with pytest.raises(QccError, match="single-input"):
        Dataset(tmp_path, [X, InputSpec("y", (1,), np.dtype(np.float32))])


@pytest.mark.parametrize("setup, message", [
    (lambda p: None, "no samples"),
    (lambda p: (p / "notes.txt").write_text("x"), "no samples"),
])
def test_empty_folder(tmp_path, setup, message):
    setup(tmp_path)
    with pytest.raises(QccError, match=message):
        Dataset(tmp_path, [X])


def test_missing_folder(tmp_path):
    with pytest.raises(QccError, match="no such folder"):
        Dataset(tmp_path / "nope", [X])


def test_images_rgb_nchw_scaled_and_normalised(tmp_path):
    pixels = np.random.default_rng(0).integers(0, 256, (4, 6, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "a.png")
    Image.fromarray(pixels[:, :, 0]).save(tmp_path / "b.png")  # grayscale becomes RGB
    data = Dataset(tmp_path, [X], image=ImageOptions(mean=(0.5, 0.4, 0.3), std=(0.5, 0.25, 0.2)))
    color, gray = list(data)
    expected = ((pixels / 255.0 - [0.5, 0.4, 0.3]) / [0.5, 0.25, 0.2]).transpose(2, 0, 1)[None]
    np.testing.assert_allclose(color["x"], expected, atol=1e-6)
    assert color["x"].dtype == np.float32
    np.testing.assert_allclose(gray["x"][0, 0], (pixels[:, :, 0] / 255.0 - 0.5) / 0.5, atol=1e-6)


def test_images_resized_to_size_for_dynamic_inputs(tmp_path):
    Image.fromarray(np.zeros((10, 10, 3), np.uint8)).save(tmp_path / "a.jpg")
    with pytest.raises(QccError, match="--image-size"):
        Dataset(tmp_path, [DYNAMIC])
    sample = Dataset(tmp_path, [DYNAMIC], image=ImageOptions(size=(8, 16)))[0]
    assert sample["x"].shape == (1, 3, 8, 16)


def test_images_laid_out_nhwc_for_an_nhwc_input(tmp_path):
    pixels = np.random.default_rng(0).integers(0, 256, (4, 6, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "a.png")
    Image.fromarray(np.zeros((10, 10, 3), np.uint8)).save(tmp_path / "b.png")  # resized to the input's H, W
    data = Dataset(tmp_path, [InputSpec("x", (1, 4, 6, 3), np.dtype(np.float32))], image=ImageOptions(mean=(0.5, 0.4, 0.3)))
    first, second = list(data)
    np.testing.assert_allclose(first["x"], (pixels / 255.0 - [0.5, 0.4, 0.3])[None], atol=1e-6)
    assert second["x"].shape == (1, 4, 6, 3)
    dynamic = Dataset(tmp_path, [InputSpec("x", (None, None, None, 3), np.dtype(np.float32))], image=ImageOptions(size=(8, 16)))
    assert dynamic[0]["x"].shape == (1, 8, 16, 3)


def test_images_need_an_nchw_rgb_input(tmp_path):
    Image.fromarray(np.zeros((4, 6, 3), np.uint8)).save(tmp_path / "a.png")
    with pytest.raises(QccError, match="3 channels"):
        Dataset(tmp_path, [InputSpec("x", (1, 4, 6), np.dtype(np.float32))])


def test_corrupt_image_is_named(tmp_path):
    (tmp_path / "bad.png").write_bytes(b"\x89PNG garbage")
    with pytest.raises(QccError, match="bad.png: cannot read image"):
        Dataset(tmp_path, [X])[0]


def test_split_is_disjoint_spread_and_deterministic(tmp_path):
    _npy_folder(tmp_path, 10)
    data = Dataset(tmp_path, [X])
    calib, held = data.split(0.3)
    assert len(held) == 3 and len(calib) == 7
    assert set(calib.files).isdisjoint(held.files) and set(calib.files) | set(held.files) == set(data.files)
    assert [f.name for f in held.files] == [f.name for f in data.split(0.3)[1].files]
    indices = [data.files.index(f) for f in held.files]
    assert max(indices) - min(indices) >= 5, "held-out files should span the folder"
    with pytest.raises(QccError):
        data.split(1.5)


def test_progress_is_quiet_off_a_terminal_and_draws_on_one():
    quiet = io.StringIO()
    with Progress(3, "calibrate", stream=quiet) as bar:
        bar.advance(3)
    assert quiet.getvalue() == ""
    drawn = io.StringIO()
    with Progress(4, "calibrate", stream=drawn, enabled=True) as bar:
        bar.advance(2)
    assert "calibrate [" in drawn.getvalue() and "2/4" in drawn.getvalue() and drawn.getvalue().endswith("\n")
