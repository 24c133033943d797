"""The in-memory IR: an onnx-graphsurgeon Graph plus qcc's side tables.

Models are imported once at load and exported once at save; passes work on
``Module.graph`` directly and record quantization facts in ``Module.encodings``
(tensor name -> Encoding) and ``Module.annotations`` (tensor name -> hints such
as a fixed range), never as graph attributes.
"""
from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import shape_inference
from onnx_graphsurgeon.logger import G_LOGGER

from compiler.errors import QccError  # noqa: F401  (re-exported: passes raise it from here)

G_LOGGER.severity = G_LOGGER.ERROR

MIN_OPSET = 7
MAX_OPSET = 23
CONTROL_FLOW_OPS = frozenset({"If", "Loop", "Scan"})
INITIALIZERS_APART_IR = 4  # the first IR version whose initializers need not be graph inputs


@dataclass
class Module:
    graph: gs.Graph
    encodings: dict = field(default_factory=dict)
    annotations: dict = field(default_factory=dict)
    metadata: dict = field(default_factory=dict)
    # Expensive results (calibration statistics, ...) that passes share; see cache_get/cache_put.
    cache: dict = field(default_factory=dict)
    ir_version: int = onnx.IR_VERSION
    producer: str = ""

    @property
    def opset(self) -> int:
        return int(self.graph.opset)

    def clone(self) -> "Module":
        return Module(graph=self.graph.copy(), encodings=dict(self.encodings),
                      annotations=copy.deepcopy(self.annotations), metadata=dict(self.metadata),
                      cache=dict(self.cache), ir_version=self.ir_version, producer=self.producer)

    def tensors(self) -> dict:
        return self.graph.tensors()

    def annotate(self, tensor_name: str, **hints) -> None:
        self.annotations.setdefault(tensor_name, {}).update(hints)

    def infer_shapes(self) -> None:
        """Recompute every intermediate shape (after folding made reshape targets constant)."""
        self.graph = from_onnx(infer_shapes(self.to_onnx())).graph

    def to_onnx(self) -> onnx.ModelProto:
        remove_dead_nodes(self.graph).toposort()
        model = gs.export_onnx(self.graph, do_type_check=False)
        # Initializers are written apart from the graph inputs, which IR version 3 does not allow (old exports
        # list every weight as an input too); from 4 on it does, with any supported opset.
        model.ir_version = max(min(self.ir_version, onnx.IR_VERSION), INITIALIZERS_APART_IR)
        # Opset 21+ QDQ and the com.microsoft domain need a recent enough IR version.
        if any(op.domain in ("", "ai.onnx") and op.version >= 21 for op in model.opset_import):
            model.ir_version = max(model.ir_version, 10)
        model.producer_name = "qcc"
        del model.metadata_props[:]
        for key in sorted(self.metadata):
            model.metadata_props.add(key=key, value=str(self.metadata[key]))
        return model


def from_onnx(model: onnx.ModelProto) -> Module:
    graph = gs.import_onnx(model)
    metadata = {p.key: p.value for p in model.metadata_props}
    return Module(graph=graph, metadata=metadata, ir_version=model.ir_version,
                  producer=model.producer_name)


def _fail(path: Path, message: str) -> QccError:
    return QccError(f"{path}: {message}")


def _read_model(path: Path) -> onnx.ModelProto:
    if not path.exists():
        raise _fail(path, "no such file")
    if path.is_dir():
        raise _fail(path, "is a directory, expected an .onnx file")
    try:
        model = onnx.load(str(path))
    except Exception as exc:  # protobuf raises DecodeError, RuntimeWarning, ValueError...
        raise _fail(path, f"not a readable ONNX model ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else 'parse error'})") from None
    if not model.graph.node and not model.graph.output:
        raise _fail(path, "not an ONNX model (empty graph; is it truncated or another format?)")
    return model


def _default_opset(model: onnx.ModelProto) -> int | None:
    for op in model.opset_import:
        if op.domain in ("", "ai.onnx"):
            return op.version
    return None


def _validate(path: Path, model: onnx.ModelProto) -> None:
    opset = _default_opset(model)
    if opset is None:
        raise _fail(path, "model imports no default-domain opset")
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise _fail(path, f"opset {opset} is not supported (qcc supports {MIN_OPSET}..{MAX_OPSET})")
    for node in model.graph.node:
        if node.op_type in CONTROL_FLOW_OPS or any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute):
            raise _fail(path, f"node '{node.name or node.output[0]}' ({node.op_type}) has a subgraph; control flow is not supported yet")
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as exc:
        first = next((line for line in str(exc).splitlines() if line.strip()), "invalid model")
        raise _fail(path, f"invalid ONNX graph: {first}") from None


def parse_input_shape(text: str) -> tuple[str, list[int]]:
    """Parse ``NAME:1,3,48,192``; the name may itself contain colons (``input:0:1,3``)."""
    name, sep, dims = text.rpartition(":")
    if not sep or not name:
        raise QccError(f"--input-shape '{text}': expected NAME:D1,D2,... (e.g. x:1,3,48,192)")
    try:
        shape = [int(d) for d in dims.split(",")]
    except ValueError:
        raise QccError(f"--input-shape '{text}': dimensions must be positive integers") from None
    if any(d <= 0 for d in shape):
        raise QccError(f"--input-shape '{text}': dimensions must be positive integers")
    return name, shape


def fix_input_shapes(model: onnx.ModelProto, shapes: dict[str, list[int]], path: Path | str = "model") -> onnx.ModelProto:
    """Pin dynamic input dimensions and re-run shape inference (intermediate shapes are recomputed)."""
    inputs = {i.name: i for i in model.graph.input}
    for name, shape in shapes.items():
        if name not in inputs:
            raise QccError(f"--input-shape: model has no input '{name}' (inputs: {', '.join(inputs) or 'none'})")
        dims = inputs[name].type.tensor_type.shape.dim
        if len(dims) != len(shape):
            raise QccError(f"--input-shape: input '{name}' has rank {len(dims)}, got {len(shape)} dimensions")
        for dim, size in zip(dims, shape):
            if dim.HasField("dim_value") and dim.dim_value > 0 and dim.dim_value != size:
                raise QccError(f"--input-shape: input '{name}' has fixed dimension {dim.dim_value}, got {size}")
            dim.Clear()
            dim.dim_value = size
    return infer_shapes(model, path)


def infer_shapes(model: onnx.ModelProto, path: Path | str = "model") -> onnx.ModelProto:
    del model.graph.value_info[:]
    try:
        inferred = shape_inference.infer_shapes(model, strict_mode=True, data_prop=True)
    except Exception as exc:
        first = next((line for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
        raise QccError(f"{path}: shape inference failed: {first}") from None
    return _with_contrib_types(inferred)


def _untyped_outputs(model: onnx.ModelProto) -> set:
    typed = {v.name for v in list(model.graph.value_info) + list(model.graph.output) if v.type.tensor_type.elem_type}
    return {name for node in model.graph.node for name in node.output if name and name not in typed}


def _with_contrib_types(model: onnx.ModelProto) -> onnx.ModelProto:
    """Types and shapes for the outputs of onnxruntime's contrib ops (com.microsoft Gelu, FastGelu, ...), which
    onnx's inference does not know; without a type a tensor is neither calibrated nor quantized. onnxruntime's
    symbolic inference knows them; where it fails too, the model stays as onnx inferred it."""
    untyped = _untyped_outputs(model)
    if not untyped:
        return model
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference
    try:
        symbolic = SymbolicShapeInference.infer_shapes(onnx.ModelProto.FromString(model.SerializeToString()), auto_merge=True)
    except Exception:  # an op neither knows: keep onnx's result
        return model
    model.graph.value_info.extend(v for v in symbolic.graph.value_info if v.name in untyped and v.type.tensor_type.elem_type)
    return model


def _sanitize_dims(model: onnx.ModelProto) -> None:
    # Some exporters (paddle2onnx) write -1 as a dim_value for a dynamic dimension.
    for vi in list(model.graph.input) + list(model.graph.output):
        for i, dim in enumerate(vi.type.tensor_type.shape.dim):
            if dim.HasField("dim_value") and dim.dim_value <= 0:
                dim.Clear()
                dim.dim_param = f"{vi.name}_dim{i}"


def load(path: str | os.PathLike, input_shapes: dict[str, list[int]] | None = None) -> Module:
    path = Path(path)
    model = _read_model(path)
    _validate(path, model)
    _sanitize_dims(model)
    model = fix_input_shapes(model, input_shapes, path) if input_shapes else infer_shapes(model, path)
    module = from_onnx(model)
    module.metadata.setdefault("qcc.source", path.name)
    return module


def const_value(tensor) -> np.ndarray | None:
    """The value of a tensor if it is a constant (initializer or Constant node output), else None."""
    if isinstance(tensor, gs.Constant):
        return tensor.values
    if isinstance(tensor, gs.Variable) and len(tensor.inputs) == 1 and tensor.inputs[0].op == "Constant":
        value = tensor.inputs[0].attrs.get("value")
        if isinstance(value, gs.Constant):
            return value.values
    return None


def remove_dead_nodes(graph: gs.Graph) -> gs.Graph:
    """``graph.cleanup()`` with its defaults (unused nodes removed, every graph input kept), in time linear in
    the graph: graphsurgeon's looks each graph input up in a list of the used tensors, which took 42 s on a
    simulation graph of 5,000 nodes with 2,000 inputs (bias correction's bias feeds)."""
    for subgraph in graph.subgraphs():
        subgraph.cleanup(recurse_functions=False)
    for function in graph.functions:
        function.cleanup(recurse_functions=False)
    with graph.node_ids():
        for tensor in graph.inputs:
            tensor.inputs.clear()
        used, _ = graph._get_used_node_ids()
        kept = []
        for node in graph.nodes:
            if graph._get_node_id(node) in used:
                kept.append(node)
            else:
                node.inputs.clear()
                node.outputs.clear()
        graph.nodes = kept
    return graph


def make_const(graph: gs.Graph, hint: str, values: np.ndarray, tensor_names: set | None = None) -> gs.Constant:
    """A new initializer with a name derived from ``hint`` that no tensor of ``graph`` has. A caller making many
    passes ``tensor_names`` (the graph's tensor names, kept up to date here and by the caller) so the graph is
    not rescanned: graphsurgeon's ``tensors()`` takes about 0.1 s on 5,000 nodes."""
    existing = graph.tensors() if tensor_names is None else tensor_names
    name, i = hint, 0
    while name in existing:
        i += 1
        name = f"{hint}_{i}"
    if tensor_names is not None:
        tensor_names.add(name)
    return gs.Constant(name, np.ascontiguousarray(values))


def unique_name(graph: gs.Graph, hint: str, taken: set | None = None) -> str:
    """``hint``, or ``hint_1``, ``hint_2``, ...: the first name no tensor or node of ``graph`` has. A caller naming
    many tensors passes ``taken`` (the names in use, kept up to date here) so the graph is not rescanned."""
    if taken is None:
        taken = set(graph.tensors()) | {n.name for n in graph.nodes}
    name, i = hint, 0
    while name in taken:
        i += 1
        name = f"{hint}_{i}"
    taken.add(name)
    return name
