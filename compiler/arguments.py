"""Command-line arguments the commands share (compile, analyze, run-htp, compare-dump, print): their
definitions and their parsing into the library's types. One clear line (QccError) per malformed value."""
from __future__ import annotations

from compiler.errors import QccError

GATE_METRICS = ("cos", "sqnr")


def add_input_shape(parser) -> None:
    parser.add_argument("--input-shape", action="append", metavar="NAME:D1,D2,...",
                        help="fix a dynamic input shape (repeatable)")


def input_shapes(values) -> dict[str, list[int]]:
    """``--input-shape`` values as {input name: shape}; one input given two different shapes is refused."""
    from compiler.ir import parse_input_shape
    shapes = {}
    for text in values or []:
        name, shape = parse_input_shape(text)
        if name in shapes and shapes[name] != shape:
            raise QccError(f"--input-shape: input '{name}' given twice, as {shapes[name]} and {shape}")
        shapes[name] = shape
    return shapes


def add_image_arguments(parser) -> None:
    parser.add_argument("--image-mean", metavar="R,G,B", help="image normalisation (x - mean) / std on [0, 1] pixels")
    parser.add_argument("--image-std", metavar="R,G,B")
    parser.add_argument("--image-size", metavar="H,W", help="resize image samples to H,W (default: the input's H, W)")


def image_options(args):
    from compiler.data import ImageOptions
    size = _floats("--image-size", args.image_size, 2)
    std = _floats("--image-std", args.image_std, 3) or (1.0, 1.0, 1.0)
    if any(v == 0 for v in std):
        raise QccError(f"--image-std '{args.image_std}': values must be non-zero")
    return ImageOptions(mean=_floats("--image-mean", args.image_mean, 3) or (0.0, 0.0, 0.0), std=std,
                        size=tuple(int(v) for v in size) if size else None)


def parse_gate(values, flag: str = "--fail-under") -> dict:
    """``["cos=0.999", "sqnr=30"]`` (or comma-separated) -> {"cos": 0.999, "sqnr": 30.0}."""
    gate = {}
    for value in values or []:
        for item in value.split(","):
            key, eq, number = item.strip().partition("=")
            if not eq or key not in GATE_METRICS:
                raise QccError(f"{flag} '{item}': expected cos=NUMBER or sqnr=NUMBER (e.g. cos=0.999)")
            try:
                gate[key] = float(number)
            except ValueError:
                raise QccError(f"{flag} '{item}': '{number}' is not a number") from None
    return gate


def _floats(flag: str, text: str | None, count: int) -> tuple | None:
    if text is None:
        return None
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) != count:
        raise QccError(f"{flag} '{text}': expected {count} comma-separated numbers")
    return values
