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
    if threads:
        options.intra_op_num_threads = threads
    return options


def make_session(model: Module | onnx.ModelProto, extra_outputs: list[str] | None = None) -> ort.InferenceSession:
    """A CPU session; ``extra_outputs`` exposes intermediate tensors as graph outputs too."""
    proto = model.to_onnx() if isinstance(model, Module) else model
    if extra_outputs:
        proto = expose_tensors(proto, extra_outputs)
    try:
        return ort.InferenceSession(proto.SerializeToString(), session_options(), providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise QccError(f"onnxruntime cannot load the model: {str(exc).splitlines()[0]}") from None


def expose_tensors(proto: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    proto = onnx.ModelProto.FromString(proto.SerializeToString())
    present = {o.name for o in proto.graph.output}
    for name in names:
        if name not in present:
            proto.graph.output.append(onnx.ValueInfoProto(name=name))
            present.add(name)
    return proto


def run_model(model: Module | onnx.ModelProto, samples: list[dict], outputs: list[str] | None = None) -> list[dict]:
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
