"""onnxruntime sessions for qcc: float references, QDQ simulation and sample inputs.

Sessions run with graph optimisations off, so a QDQ model is simulated exactly
(dequantize, then the float op) instead of through ORT's x86 integer kernels,
whose saturation no NPU shares (design.md, Measuring accuracy).
"""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort

from compiler.ir import Module, QccError

_ONNX_TO_NUMPY = {
    onnx.TensorProto.FLOAT: np.float32, onnx.TensorProto.FLOAT16: np.float16,
    onnx.TensorProto.DOUBLE: np.float64, onnx.TensorProto.INT64: np.int64,
    onnx.TensorProto.INT32: np.int32, onnx.TensorProto.UINT8: np.uint8,
    onnx.TensorProto.INT8: np.int8, onnx.TensorProto.BOOL: np.bool_,
}


def session_options(threads: int = 0) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if threads:
        options.intra_op_num_threads = threads
    return options


def make_session(model: Module | onnx.ModelProto | bytes, extra_outputs: list[str] | None = None) -> ort.InferenceSession:
    """A CPU session; ``extra_outputs`` exposes intermediate tensors as graph outputs too. A serialized model
    (what Ray tasks receive) goes to onnxruntime as it is."""
    if isinstance(model, bytes) and not extra_outputs:
        data = model
    else:
        owned = isinstance(model, Module)
        proto = model.to_onnx() if owned else onnx.ModelProto.FromString(model) if isinstance(model, bytes) else model
        if extra_outputs:
            proto = expose_tensors(proto, extra_outputs, copy=not owned)
        # The proto goes before onnxruntime copies the bytes: each copy of the weights alive at once costs the
        # model's size again (calibrating a 321 MB model peaked 350 MB above the model's other copies).
        data = proto.SerializeToString()
        del proto
    try:
        return ort.InferenceSession(data, session_options(), providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise QccError(f"onnxruntime cannot load the model: {str(exc).splitlines()[0]}") from None


def loadable_bytes(proto: onnx.ModelProto, path) -> bytes:
    """The serialized model, refused when onnxruntime cannot load it (every output of qcc must run there)."""
    data = proto.SerializeToString()
    try:
        ort.InferenceSession(data, session_options(), providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise QccError(f"{path}: not written: the compiled model does not load in onnxruntime "
                       f"({str(exc).splitlines()[0]})") from None
    return data


def expose_tensors(proto: onnx.ModelProto, names: list[str], copy: bool = True) -> onnx.ModelProto:
    """``proto`` with ``names`` as graph outputs too: a copy, or ``proto`` itself changed when not ``copy``."""
    if copy:
        proto = onnx.ModelProto.FromString(proto.SerializeToString())
    present = {o.name for o in proto.graph.output}
    for name in names:
        if name not in present:
            proto.graph.output.append(onnx.ValueInfoProto(name=name))
            present.add(name)
    return proto


def run_model(model: Module | onnx.ModelProto | bytes, samples: list[dict], outputs: list[str] | None = None) -> list[dict]:
    session = make_session(model, extra_outputs=outputs)
    names = outputs or [o.name for o in session.get_outputs()]
    return [dict(zip(names, session.run(names, sample))) for sample in samples]


def input_specs(module: Module) -> list[tuple[str, list, type]]:
    """(name, shape with None for dynamic dims, numpy dtype) of each graph input."""
    specs = []
    for tensor in module.graph.inputs:
        shape = [d if isinstance(d, int) and d > 0 else None for d in (tensor.shape or [])]
        dtype = np.dtype(tensor.dtype).type if tensor.dtype is not None else np.float32
        specs.append((tensor.name, shape, dtype))
    return specs


def sample_inputs(module: Module, ctx=None, count: int = 2) -> list[dict]:
    """Inputs for numeric checks: calibration samples if the context has them, else seeded noise."""
    data = getattr(ctx, "calib_data", None)
    if data is not None:
        return [sample for _, sample in zip(range(count), data)]
    rng = np.random.default_rng(getattr(ctx, "seed", 0))
    samples = []
    for _ in range(count):
        sample = {}
        for name, shape, dtype in input_specs(module):
            if any(d is None for d in shape):
                raise QccError(f"input '{name}' has dynamic dimensions {['?' if d is None else d for d in shape]}; "
                               f"give them with --input-shape {name}:D1,D2,... or pass sample data")
            if np.issubdtype(dtype, np.floating):
                sample[name] = rng.standard_normal(shape).astype(dtype)
            else:
                sample[name] = rng.integers(0, 2, size=shape).astype(dtype)
        samples.append(sample)
    return samples


def _node_reads(node: onnx.NodeProto) -> set[str]:
    """Tensor names ``node`` reads: its inputs and, for If/Loop/Scan bodies, the outer-scope names they use."""
    names = {name for name in node.input if name}
    for attribute in node.attribute:
        bodies = [attribute.g] if attribute.type == onnx.AttributeProto.GRAPH else list(attribute.graphs)
        for body in bodies:
            inner = ({out for n in body.node for out in n.output} | {t.name for t in body.input}
                     | {t.name for t in body.initializer})
            names |= {name for n in body.node for name in _node_reads(n)} - inner
    return names


class StagedRun:
    """A model run in stages, each producing some tensors from the tensors earlier stages left behind.

    Between two stages the caller may change graph inputs (a feed that only later stages read), yet every node
    runs once per sample: stage k runs the nodes its tensors need that no earlier stage ran, and reads what
    it needs from a per-sample cache, which drops each tensor after the last stage that reads it. (Sequential
    bias correction corrects a layer's bias after its inputs are measured, before anything downstream runs.)
    """

    def __init__(self, model: onnx.ModelProto, stages: list[list[str]]):
        self.model = model
        self.stages = [list(dict.fromkeys(targets)) for targets in stages]
        nodes = list(model.graph.node)
        producer = {out: i for i, node in enumerate(nodes) for out in node.output if out}
        reads = [_node_reads(node) for node in nodes]
        owner: list[int | None] = [None] * len(nodes)
        for stage, targets in enumerate(self.stages):
            pending = [producer[t] for t in targets if t in producer]
            while pending:
                i = pending.pop()
                if owner[i] is None:
                    owner[i] = stage
                    pending.extend(producer[name] for name in reads[i] if name in producer)
        self.initializers = {init.name: init for init in model.graph.initializer}
        self.nodes = [[] for _ in stages]
        stage_reads = [set() for _ in stages]
        for i, node in enumerate(nodes):
            if owner[i] is not None:
                self.nodes[owner[i]].append(node)
                stage_reads[owner[i]] |= reads[i]
        made = [{out for node in stage_nodes for out in node.output if out} for stage_nodes in self.nodes]
        self.reads = [sorted(name for name in stage_reads[stage] - made[stage] if name not in self.initializers)
                      for stage in range(len(stages))]
        last_read: dict[str, int] = {}
        for stage in range(len(stages)):
            for name in self.reads[stage] + self.stages[stage]:
                last_read[name] = stage
        self.writes = [sorted({name for name in made[stage] if last_read.get(name, -1) >= stage})
                       for stage in range(len(stages))]
        self.last_read = last_read
        # The last stage's session only: callers run a stage on every sample before the next stage, and a
        # session per stage kept alive grew with the model (1,500 stages on a 5,000-node model).
        self.session: tuple[int, ort.InferenceSession] | None = None

    def run(self, stage: int, cache: dict, feeds: dict | None = None) -> dict:
        """Stage ``stage``'s tensors for one sample; ``cache`` holds that sample's graph inputs at first and is
        updated in place; ``feeds`` are graph inputs shared by all samples."""
        available = {**cache, **(feeds or {})}
        if self.writes[stage]:
            session = self._session(stage, available)
            cache.update(zip(self.writes[stage], session.run(self.writes[stage],
                                                             {name: available[name] for name in self.reads[stage]})))
        result = {name: cache[name] if name in cache else available[name] for name in self.stages[stage]}
        for name in [name for name in cache if self.last_read.get(name, -1) <= stage]:
            del cache[name]
        return result

    def _session(self, stage: int, available: dict) -> ort.InferenceSession:
        if self.session is None or self.session[0] != stage:
            self.session = None
            nodes = self.nodes[stage]
            used = {name for node in nodes for name in _node_reads(node)}
            dtype = onnx.helper.np_dtype_to_tensor_dtype
            inputs = [onnx.helper.make_tensor_value_info(name, dtype(available[name].dtype), None)
                      for name in self.reads[stage]]
            outputs = [onnx.ValueInfoProto(name=name) for name in self.writes[stage]]
            graph = onnx.helper.make_graph(nodes, f"stage{stage}", inputs, outputs,
                                           [self.initializers[name] for name in sorted(used) if name in self.initializers])
            model = onnx.helper.make_model(graph, opset_imports=self.model.opset_import, ir_version=self.model.ir_version)
            self.session = (stage, ort.InferenceSession(model.SerializeToString(), session_options(threads=1),
                                                        providers=["CPUExecutionProvider"]))
        return self.session[1]
