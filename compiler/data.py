"""Sample data for calibration and evaluation: a folder with one sample per file.

- ``.npy``: one array, for single-input models;
- ``.npz``: arrays keyed by input name (every model input, nothing else);
- ``.png`` / ``.jpg`` / ``.jpeg`` / ``.bmp``: an image for a single image input, read
  with Pillow as RGB, resized to ``size`` (H, W; default: the input's static H, W),
  scaled to [0, 1], normalised with ``(x - mean) / std`` and laid out as the input is:
  NCHW, or NHWC when its last axis has the 3 channels and axis 1 does not (TensorFlow exports).

Files are read in sorted name order, one at a time (memory holds one sample), so
runs are reproducible. Each sample is checked against the model's inputs; a
mismatch raises QccError naming the file and what is wrong. An array missing only
a leading batch dimension of 1 is given one. Floating arrays are cast to the
input's float type (numpy saves float64 by default); other dtype changes are errors.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from compiler.ir import QccError

ARRAY_SUFFIXES = (".npy", ".npz")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")


@dataclass(frozen=True)
class ImageOptions:
    mean: tuple = (0.0, 0.0, 0.0)
    std: tuple = (1.0, 1.0, 1.0)
    size: tuple | None = None  # (H, W)


@dataclass(frozen=True)
class InputSpec:
    name: str
    shape: tuple  # None for a dynamic dimension
    dtype: np.dtype
    has_default: bool = False  # an input with an initializer: samples may leave it out


def specs_of(module) -> list[InputSpec]:
    from compiler.runtime import input_specs
    return [InputSpec(name, tuple(shape), np.dtype(dtype), name in module.input_defaults)
            for name, shape, dtype in input_specs(module)]


class Dataset:
    """The samples of a folder (or an explicit file list), validated against ``inputs``."""

    def __init__(self, folder: str | Path | None, inputs: list[InputSpec], *, count: int | None = None,
                 image: ImageOptions | None = None, files: list[Path] | None = None):
        self.inputs = list(inputs)
        # A sample file of one array (.npy, an image) feeds the one input without a default.
        self.required = [spec for spec in self.inputs if not spec.has_default]
        self.image = image or ImageOptions()
        if files is None:
            files = _list_folder(Path(folder))
        if count is not None:
            if count <= 0:
                raise QccError(f"sample count must be positive, got {count}")
            files = files[:count]
        self.files = list(files)
        if not self.files:
            raise QccError(f"{folder}: no samples")
        if any(f.suffix.lower() == ".npy" for f in self.files) and len(self.required) != 1:
            raise QccError(f"{self.files[0].parent}: .npy samples need a single-input model; this one has inputs "
                           f"{', '.join(s.name for s in self.required)} (use .npz keyed by input name)")
        if any(f.suffix.lower() in IMAGE_SUFFIXES for f in self.files):
            self._check_image_input()

    @property
    def key(self) -> tuple:
        """Identifies the samples, for caches keyed by data."""
        return tuple(str(f) for f in self.files), self.image

    def __len__(self) -> int:
        return len(self.files)

    def __iter__(self) -> Iterator[dict]:
        for path in self.files:
            yield self.load(path)

    def __getitem__(self, index: int) -> dict:
        return self.load(self.files[index])

    def subset(self, files: list[Path]) -> "Dataset":
        return Dataset(None, self.inputs, image=self.image, files=files)

    def split(self, held_out: float = 0.25) -> tuple["Dataset", "Dataset"]:
        """(calibration, held-out): every k-th file is held out, so both halves span the folder."""
        keep, held = split_indices(len(self.files), held_out)
        return self.subset([self.files[i] for i in keep]), self.subset([self.files[i] for i in held])

    def check(self) -> None:
        """Every sample's names, shapes and dtypes against the inputs, from the files' headers (array
        files) or by opening them (images), so that a bad sample is reported before any work."""
        for path in self.files:
            suffix = path.suffix.lower()
            if suffix == ".npy":
                headers = {self.required[0].name: _read(path, _npy_header)}
            elif suffix == ".npz":
                headers = _read(path, _npz_headers)
            else:
                _read(path, _open_image)
                continue
            self._check_names(path, headers)
            for spec in self.inputs:
                if spec.name in headers:
                    _check_header(path, spec, *headers[spec.name])

    def load(self, path: Path) -> dict:
        suffix = path.suffix.lower()
        if suffix == ".npy":
            arrays = {self.required[0].name: _read(path, np.load)}
        elif suffix == ".npz":
            arrays = _read(path, lambda p: dict(np.load(p)))
        else:
            arrays = {self.required[0].name: self._load_image(path)}
        return self._validate(path, arrays)

    def _check_names(self, path: Path, arrays: dict) -> None:
        expected = {s.name for s in self.inputs}
        missing = [s.name for s in self.required if s.name not in arrays]
        if missing:
            raise QccError(f"{path}: missing input '{missing[0]}' (file has: {', '.join(sorted(arrays)) or 'nothing'})")
        extra = sorted(set(arrays) - expected)
        if extra:
            raise QccError(f"{path}: unexpected array '{extra[0]}' (model inputs: {', '.join(sorted(expected))})")

    def _validate(self, path: Path, arrays: dict) -> dict:
        self._check_names(path, arrays)
        sample = {}
        for spec in (s for s in self.inputs if s.name in arrays):
            sample[spec.name] = _conform(path, spec, np.asarray(arrays[spec.name]))
        return sample

    def _check_image_input(self) -> None:
        spec = self.required[0] if self.required else self.inputs[0]
        if len(self.required) != 1 or image_layout(spec.shape) is None:
            shapes = ", ".join(f"{s.name}{list(s.shape)}" for s in self.inputs)
            raise QccError(f"image samples need one NCHW or NHWC input with 3 channels; the model has {shapes}")
        if not np.issubdtype(spec.dtype, np.floating):
            raise QccError(f"image samples need a float input; '{spec.name}' is {spec.dtype}")
        if self.image.size is None and None in _height_width(spec.shape):
            raise QccError(f"input '{spec.name}' has a dynamic height or width; give the image size "
                           f"(--image-size H,W or --input-shape)")

    def _load_image(self, path: Path) -> np.ndarray:
        from PIL import Image
        spec = self.required[0]
        height, width = self.image.size or _height_width(spec.shape)
        try:
            with Image.open(path) as img:
                rgb = img.convert("RGB").resize((int(width), int(height)), Image.BILINEAR)
        except Exception as exc:
            raise QccError(f"{path}: cannot read image ({type(exc).__name__}: {exc})") from None
        pixels = np.asarray(rgb, dtype=np.float32) / 255.0
        mean = np.asarray(self.image.mean, dtype=np.float32)
        std = np.asarray(self.image.std, dtype=np.float32)
        normalised = (pixels - mean) / std  # H, W, C
        if image_layout(spec.shape) == "NCHW":
            normalised = normalised.transpose(2, 0, 1)
        return normalised[None].astype(spec.dtype)


def split_indices(count: int, held_out: float) -> tuple[list[int], list[int]]:
    """(kept, held-out) indices of ``count`` samples: round(count * held_out) of them (at least one, never all)
    spread evenly, sample i held out where the running quota floor((i + 1) * wanted / count) steps up."""
    if not 0 < held_out < 1:
        raise QccError(f"held-out fraction must be in (0, 1), got {held_out}")
    if count < 2:
        raise QccError(f"cannot split {count} sample(s) into calibration and held-out parts")
    wanted = min(max(1, round(count * held_out)), count - 1)
    held = [(i + 1) * wanted // count > i * wanted // count for i in range(count)]
    return [i for i in range(count) if not held[i]], [i for i in range(count) if held[i]]


def image_layout(shape: tuple) -> str | None:
    """"NCHW" or "NHWC" for a rank-4 input shape with 3 channels (None: dynamic) on axis 1 or axis 3; NCHW
    where both could be. None if neither."""
    if len(shape) != 4:
        return None
    if shape[3] == 3 and shape[1] != 3:
        return "NHWC"
    return "NCHW" if shape[1] in (3, None) else None


def _height_width(shape: tuple) -> tuple:
    return (shape[1], shape[2]) if image_layout(shape) == "NHWC" else (shape[2], shape[3])


def _list_folder(folder: Path) -> list[Path]:
    if not folder.exists():
        raise QccError(f"{folder}: no such folder")
    if not folder.is_dir():
        raise QccError(f"{folder}: not a folder (expected a folder of .npy/.npz/image samples)")
    files = sorted(p for p in folder.iterdir()
                   if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in ARRAY_SUFFIXES + IMAGE_SUFFIXES)
    if not files:
        raise QccError(f"{folder}: no samples (expected .npy, .npz, .png, .jpg, .jpeg or .bmp files)")
    return files


def _read(path: Path, reader):
    try:
        return reader(path)
    except Exception as exc:
        raise QccError(f"{path}: cannot read ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else 'error'})") from None


def _npy_header(path: Path) -> tuple:
    with open(path, "rb") as handle:
        return _array_header(handle)


def _npz_headers(path: Path) -> dict:
    import zipfile
    with zipfile.ZipFile(path) as archive:
        headers = {}
        for member in archive.namelist():
            if member.endswith(".npy"):
                with archive.open(member) as handle:
                    headers[member[:-4]] = _array_header(handle)
        return headers


def _array_header(handle) -> tuple:
    """(shape, dtype) of a .npy stream, without reading its data."""
    version = np.lib.format.read_magic(handle)
    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, _, dtype = read(handle)
    return tuple(shape), np.dtype(dtype)


def _open_image(path: Path) -> None:
    from PIL import Image
    with Image.open(path) as img:
        img.verify()


def _check_header(path: Path, spec: InputSpec, shape: tuple, dtype: np.dtype) -> bool:
    """Raise QccError if an array of ``shape`` and ``dtype`` cannot feed ``spec``; True when it lacks only a
    leading batch dimension of 1."""
    if dtype.kind != np.dtype(spec.dtype).kind and not (dtype.kind in "iu" and np.dtype(spec.dtype).kind in "iu"):
        raise QccError(f"{path}: input '{spec.name}' has dtype {dtype}, the model expects {np.dtype(spec.dtype)}")
    batched = len(shape) == len(spec.shape) - 1 and bool(spec.shape) and spec.shape[0] in (1, None)
    if batched:
        shape = (1, *shape)
    if len(shape) != len(spec.shape) or any(d is not None and d != a for d, a in zip(spec.shape, shape)):
        expected = "[" + ",".join("?" if d is None else str(d) for d in spec.shape) + "]"
        raise QccError(f"{path}: input '{spec.name}' has shape {list(shape)}, the model expects {expected}")
    return batched


def _conform(path: Path, spec: InputSpec, array: np.ndarray) -> np.ndarray:
    if _check_header(path, spec, array.shape, array.dtype):
        array = array[None]
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        raise QccError(f"{path}: input '{spec.name}' contains NaN or infinite values")
    return np.ascontiguousarray(array.astype(spec.dtype, copy=False))
