"""`qcc compare-dump QUANT.onnx DUMPDIR`: the first tensor where a device run leaves qcc's simulation.

DUMPDIR holds one file per tensor as a device run dumps them (qnn-net-run's debug mode): a ``.raw``
file of float32 values or a ``.npy`` file, named after the tensor with every character other than
a letter or digit replaced by ``_`` (``conv1/out:0`` -> ``conv1_out_0.raw``).

Each file is matched to a QUANT tensor by that sanitised name. A name that is quantized in QUANT
(the input of a QuantizeLinear, or its DequantizeLinear output) is compared with the dequantized
value, which is what the device holds there; other tensors are compared as they are. QUANT runs on
onnxruntime's CPU provider with optimisations off (exact QDQ simulation) on the same input: the
``--data`` file (.npy for a single input, .npz keyed by input name), else the graph inputs found
among the dumps. Tensors are visited in QUANT's topological order; the first whose agreement is
below ``--threshold`` (cosine and/or SQNR in dB) is reported, with the tensors before it, since
everything upstream agreeing is what makes it the place to look. Exit status: 1 when a tensor
diverges, 0 when all agree.
"""
from __future__ import annotations

import json
import re
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnx

from compiler.arguments import add_input_shape, input_shapes, parse_gate
from compiler.ir import QccError, load
from compiler.outputs import write_file
from compiler.layer_analysis import ErrorStats, Reference, GraphIndex, dq_params, is_dq, is_q
from compiler.runtime import make_session

DUMP_SUFFIXES = (".raw", ".npy")
DEFAULT_THRESHOLD = {"cos": 0.99}
EXIT_DIVERGED = 1


def sanitize(name: str) -> str:
    """qnn-net-run's file name for a tensor: every non-alphanumeric character becomes '_'."""
    return re.sub(r"[^A-Za-z0-9]", "_", name)


def write_dump(folder: Path, tensors: dict) -> None:
    """Write tensors as a device dump: ``<sanitised name>.raw``, float32 (used to test the reader)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, value in tensors.items():
        np.asarray(value, dtype=np.float32).tofile(folder / f"{sanitize(name)}.raw")


@dataclass
class TensorComparison:
    name: str            # QUANT tensor compared (the dequantized value for a quantized tensor)
    file: str
    op: str
    cos: float | None
    sqnr: float | None
    max_abs: float
    max_steps: float | None  # max |device - simulation| in quantization steps, for quantized tensors
    diverged: bool


@dataclass
class DumpComparison:
    tensors: list[TensorComparison]
    first_divergence: str | None
    unmatched_files: list[str]
    problems: list[str]

    def to_dict(self) -> dict:
        return {"first_divergence": self.first_divergence, "tensors": [asdict(t) for t in self.tensors],
                "unmatched_files": self.unmatched_files, "problems": self.problems}


def _dump_files(folder: Path) -> dict[str, Path]:
    if not folder.is_dir():
        raise QccError(f"{folder}: no such folder" if not folder.exists() else f"{folder}: not a folder")
    files = {p.stem: p for p in sorted(folder.iterdir()) if p.is_file() and p.suffix.lower() in DUMP_SUFFIXES}
    if not files:
        raise QccError(f"{folder}: no .raw or .npy tensor dumps")
    return files


def _read_dump(path: Path) -> np.ndarray:
    try:
        return np.load(path) if path.suffix.lower() == ".npy" else np.fromfile(path, dtype=np.float32)
    except Exception as exc:
        raise QccError(f"{path}: cannot read ({type(exc).__name__}: {exc})") from None


def _targets(g: GraphIndex) -> dict[str, tuple[str, float | None, int]]:
    """Sanitised name -> (tensor to compare, quantization step or None, topological position)."""
    result: dict[str, tuple[str, float | None, int]] = {}
    position = {name: 0 for name in g.inputs}
    for i, node in enumerate(g.nodes):
        for out in node.output:
            position[out] = i + 1

    def add(alias: str, tensor: str, step, where: int):
        for key in {sanitize(alias), "_" + sanitize(alias)} if alias[:1].isdigit() else {sanitize(alias)}:
            result.setdefault(key, (tensor, step, where))

    for i, node in enumerate(g.nodes):
        if not is_dq(node) or g.is_constant(node.input[0]):
            continue
        params = dq_params(g, node)
        step = float(np.max(params.scale)) if params is not None else None
        source = g.producer.get(node.input[0])
        where = i + 1
        add(node.output[0], node.output[0], step, where)
        if source is not None and is_q(g.nodes[source]):
            add(g.nodes[source].input[0], node.output[0], step, where)
    for name, where in position.items():
        if not g.is_constant(name):
            add(name, name, None, where)
    return result


def compare_dump(quant_model: onnx.ModelProto, dump_dir: Path, sample: dict | None, threshold: dict) -> DumpComparison:
    g = GraphIndex(quant_model)
    files = _dump_files(dump_dir)
    targets = _targets(g)
    matched = {stem: targets[stem] for stem in files if stem in targets}
    unmatched = sorted(stem for stem in files if stem not in targets)
    if not matched:
        raise QccError(f"{dump_dir}: no dump file names a tensor of the model (expected e.g. "
                       f"{sanitize(g.outputs[0]) if g.outputs else 'output'}.raw)")
    if sample is None:
        sample = {}
        for name in g.inputs:
            if sanitize(name) not in files:
                raise QccError(f"no input sample: pass --data FILE, or dump the graph input '{name}' "
                               f"as {sanitize(name)}.raw")
            sample[name] = _read_dump(files[sanitize(name)])
        sample = _shape_inputs(quant_model, sample)
    names = list(dict.fromkeys(tensor for tensor, _, _ in matched.values()))
    session = make_session(quant_model, names)
    simulated = dict(zip(names, session.run(names, sample)))
    problems, rows, first = [], [], None
    for stem, (tensor, step, where) in sorted(matched.items(), key=lambda item: (item[1][2], item[0])):
        device = _read_dump(files[stem])
        reference = simulated[tensor]
        if device.size != reference.size:
            problems.append(f"{files[stem].name}: {device.size} values, the model's '{tensor}' has {reference.size}")
            continue
        device = device.reshape(reference.shape).astype(np.float32)
        stats = ErrorStats()
        stats.update(Reference(reference), device)
        max_abs = float(np.max(np.abs(device - reference))) if reference.size else 0.0
        sqnr = stats.sqnr
        diverged = ("cos" in threshold and stats.cos < threshold["cos"]) or \
                   ("sqnr" in threshold and sqnr is not None and sqnr < threshold["sqnr"])
        producer = g.producer.get(tensor)
        op = _op_of(g, producer)
        rows.append(TensorComparison(tensor, files[stem].name, op, stats.cos, sqnr, max_abs,
                                     max_abs / step if step else None, diverged))
        if diverged and first is None:
            first = tensor
    return DumpComparison(rows, first, unmatched, problems)


def _op_of(g: GraphIndex, producer: int | None) -> str:
    """The op that computed a tensor: for a DequantizeLinear, the op before its QuantizeLinear."""
    if producer is None:
        return "input"
    node = g.nodes[producer]
    if is_dq(node):
        q = g.producer.get(node.input[0])
        if q is not None and is_q(g.nodes[q]):
            before = g.producer.get(g.nodes[q].input[0])
            return g.nodes[before].op_type if before is not None else "input"
    return node.op_type


def _shape_inputs(model: onnx.ModelProto, sample: dict) -> dict:
    """Reshape flat .raw inputs to the graph input shapes (which must then be static)."""
    shapes = {i.name: [d.dim_value for d in i.type.tensor_type.shape.dim] for i in model.graph.input}
    shaped = {}
    for name, value in sample.items():
        shape = shapes.get(name, [])
        if value.ndim == len(shape):
            shaped[name] = value
        elif shape and all(d > 0 for d in shape) and int(np.prod(shape)) == value.size:
            shaped[name] = value.reshape(shape)
        else:
            raise QccError(f"dumped input '{name}' has {value.size} values; the model input shape is "
                           f"{shape or 'unknown'} (give --input-shape or --data)")
    return shaped


def add_command(sub) -> None:
    p = sub.add_parser("compare-dump", help="first tensor where a device dump diverges from qcc's simulation")
    p.add_argument("quant_model", metavar="QUANT.onnx")
    p.add_argument("dump_dir", metavar="DUMPDIR", help="one .raw (float32) or .npy file per tensor, sanitised names")
    p.add_argument("--data", metavar="FILE", help="the input the device ran (.npy, or .npz keyed by input name)")
    add_input_shape(p)
    p.add_argument("--threshold", action="append", metavar="cos=0.99|sqnr=20",
                   help="agreement a tensor needs (default cos=0.99; repeatable)")
    p.add_argument("--json", metavar="OUT.json", help="write every comparison as JSON")
    p.add_argument("-q", "--quiet", action="store_true")
    p.set_defaults(func=cmd_compare_dump)


def cmd_compare_dump(args) -> int:
    from compiler.data import Dataset, specs_of
    threshold = parse_gate(args.threshold, "--threshold") if args.threshold else dict(DEFAULT_THRESHOLD)
    shapes = input_shapes(args.input_shape)
    module = load(args.quant_model, shapes)
    sample = None
    if args.data:
        path = Path(args.data)
        if not path.is_file():
            raise QccError(f"{path}: no such file")
        sample = Dataset(None, specs_of(module), files=[path])[0]
    result = compare_dump(module.to_onnx(), Path(args.dump_dir), sample, threshold)
    if args.json:
        write_file(Path(args.json), json.dumps(result.to_dict(), indent=1) + "\n")
    if not args.quiet:
        sys.stdout.write(render_text(result, threshold))
    return EXIT_DIVERGED if result.first_divergence else 0


def render_text(result: DumpComparison, threshold: dict) -> str:
    bar = ", ".join(f"{k} >= {v:g}" for k, v in threshold.items())
    lines = [f"{len(result.tensors)} dumped tensors compared with the simulation (agreement: {bar})",
             f"{'dumped tensor':<48} {'op':<12} {'cos':>9} {'SQNR dB':>8} {'max |d|':>10} {'steps':>6}"]
    for t in result.tensors:
        stem = t.file.rsplit(".", 1)[0]
        name = stem if len(stem) <= 48 else "…" + stem[-47:]
        sqnr = "inf" if t.sqnr is None else f"{t.sqnr:.1f}"
        steps = "-" if t.max_steps is None else f"{t.max_steps:.1f}"
        lines.append(f"{name:<48} {t.op[:12]:<12} {t.cos:>9.6f} {sqnr:>8} {t.max_abs:>10.4g} {steps:>6}"
                     f"{'  <-- first divergence' if t.name == result.first_divergence else ''}")
        if t.name == result.first_divergence:
            break
    for problem in result.problems:
        lines.append(f"skipped {problem}")
    if result.unmatched_files:
        lines.append(f"{len(result.unmatched_files)} dump files name no tensor of the model "
                     f"(first: {result.unmatched_files[0]})")
    first = next((t for t in result.tensors if t.name == result.first_divergence), None)
    lines.append(f"first divergence: {first.file} ({first.op} output; simulated as '{first.name}')" if first
                 else "no divergence: every dumped tensor agrees with the simulation")
    return "\n".join(lines) + "\n"
