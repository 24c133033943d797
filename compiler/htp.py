"""`qcc run-htp MODEL --data DIR`: run a QDQ model on the QNN HTP backend and compare it with CPU simulation.

The backend is the one onnxruntime-qnn ships (an optional dependency: ``pip install '.[qnn]'``);
on x86-64 it simulates the NPU's integer arithmetic. The session runs with CPU fallback disabled,
so a model that loads runs as a whole graph on HTP; one that does not raises QccError naming the
refused nodes and QNN's reason. The reference is onnxruntime's CPU provider with graph
optimisations off (compiler.runtime), i.e. the exact QDQ simulation.

Per output, over the samples: cosine (mean and min over samples), SQNR = 10 log10(Σ cpu² / Σ (htp -
cpu)²) in dB, the largest absolute difference, and that difference in quantization steps when the
output comes out of a per-tensor DequantizeLinear (its scale is the step). HTP's integer
arithmetic differs from the float simulation by a few steps; docs/htp-backend.md lists which QDQ
forms the backend accepts.
"""
from __future__ import annotations

import contextlib
import functools
import os
import re
import sys
import threading
import time
from dataclasses import asdict, dataclass

import numpy as np
import onnx
import onnxruntime as ort

from compiler.ir import QccError, fix_input_shapes
from compiler.layer_analysis import ErrorStats, GraphIndex, Reference, activation_quantizers, dq_params, is_dq, is_q
from compiler.runtime import expose_tensors, run_model

EP_NAME = "QNNExecutionProvider"
INSTALL_HINT = ("the QNN HTP backend needs the optional package onnxruntime-qnn: "
                "pip install 'qcc[qnn]' (or: pip install onnxruntime-qnn==2.7.0)")
# Elementwise ops whose constant inputs must be quantized too: a float constant there leaves a float
# tensor inside the HTP graph (docs/htp-backend.md, "Rejected").
_ELEMENTWISE = frozenset({"Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "MatMul", "Concat", "Where", "PRelu"})
_VALIDATION_FAILED = re.compile(r"Validation FAILED for \d+ nodes in OrtNodeUnit \((?P<unit>[^)]*)\)")
_UNIT_NODE = re.compile(r"Operator type: (?P<op>\S+) Node name: (?P<name>.*?) Node index: (?P<index>\d+)")
_UNSUPPORTED = re.compile(r"Unsupported nodes in QNN EP: (?P<nodes>.*)")


def qnn_module():
    try:
        import onnxruntime_qnn
    except ImportError:
        raise QccError(INSTALL_HINT) from None
    return onnxruntime_qnn


@functools.cache
def htp_devices() -> tuple:
    """Register onnxruntime-qnn's execution provider library (once per process) and return its devices."""
    qnn = qnn_module()
    if not any(d.ep_name == EP_NAME for d in ort.get_ep_devices()):
        try:
            ort.register_execution_provider_library(EP_NAME, qnn.get_library_path())
        except Exception as exc:
            if "already registered" not in str(exc):
                raise QccError(f"cannot load onnxruntime-qnn's execution provider: {_first_line(exc)}") from None
    devices = tuple(d for d in ort.get_ep_devices() if d.ep_name == EP_NAME)
    if not devices:
        raise QccError("onnxruntime-qnn is installed but onnxruntime lists no QNN device")
    return devices


def htp_session_options(log_severity: int = 3, provider_options: dict | None = None) -> ort.SessionOptions:
    """``provider_options``: the QNN EP's options, e.g. ``{"htp_arch": "73"}`` (the backend simulates v68 by default)."""
    options = ort.SessionOptions()
    options.log_severity_level = log_severity
    # Nodes HTP refuses would silently run on CPU; refuse the session instead.
    options.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
    options.add_provider_for_devices(list(htp_devices()), {**(provider_options or {}), "backend_path": qnn_module().get_qnn_htp_path()})
    return options


@contextlib.contextmanager
def _stdout_to_stderr():
    """File descriptor 1 points at stderr meanwhile: QNN's library prints a configuration notice on stdout
    when it loads, where run-htp's table (and tools/bench.py's) goes."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        os.dup2(2, 1)
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


class _CapturedLog:
    """onnxruntime's log messages while the block runs, instead of on stderr."""

    def __init__(self):
        self.messages: list[str] = []

    def __enter__(self):
        # Severity 2 is onnxruntime's default, so the default logger is as before after restoring it.
        ort.set_default_logger_callback(lambda severity, category, logid, where, message: self.messages.append(message), 2)
        return self

    def __exit__(self, *exc):
        ort.set_default_logger_callback(None, 2)
        return False


def htp_session(model: onnx.ModelProto, provider_options: dict | None = None) -> ort.InferenceSession:
    """An HTP session for ``model``; QccError naming what the backend refused when the graph does not fit."""
    data = model.SerializeToString()
    options = htp_session_options(provider_options=provider_options)
    with _CapturedLog(), _stdout_to_stderr():
        try:
            return ort.InferenceSession(data, options)
        except Exception as exc:
            error = exc
    raise QccError(diagnose(model, error, provider_options)) from None


def diagnose(model: onnx.ModelProto, error: Exception, provider_options: dict | None = None) -> str:
    """One line saying why HTP refused ``model``: QNN's per-node validation reasons, which onnxruntime only
    logs at verbose level (so the session is tried again with verbose logs captured), or for a graph
    that fails to finalize, the float tensors between quantized ops that cause it."""
    first = re.sub(r"^\[ONNXRuntimeError\] : \d+ : \w+ : ", "", _first_line(error))
    with _CapturedLog() as log, _stdout_to_stderr():
        try:
            ort.InferenceSession(model.SerializeToString(), htp_session_options(0, provider_options))
        except Exception:
            pass
    refused = refused_nodes(model, log.messages)
    if refused:
        more = f" (and {len(refused) - 3} more)" if len(refused) > 3 else ""
        return f"the QNN HTP backend cannot run the whole graph: {'; '.join(refused[:3])}{more}"
    if "finalize" in first.lower():
        suspects = float_tensors_between_quantized_ops(model)
        if suspects:
            more = f" (and {len(suspects) - 5} more)" if len(suspects) > 5 else ""
            return (f"the QNN HTP backend failed to build the graph ({first}); likely cause, float tensors "
                    f"between quantized ops: {', '.join(suspects[:5])}{more}")
    return f"the QNN HTP backend refused the model: {first}"


def refused_nodes(model: onnx.ModelProto, messages: list[str]) -> list[str]:
    """'Conv (output 'y'): REASON' for each node group QNN's validation failed, from its verbose log."""
    found = []
    for message in messages:
        failed = _VALIDATION_FAILED.search(message)
        if failed:
            unit_op = failed["unit"]
            members = list(_UNIT_NODE.finditer(message))
            main = next((m for m in members if m["op"] == unit_op), members[0] if members else None)
            reason = message.split("REASON :", 1)[1].strip().splitlines()[0] if "REASON :" in message else "refused"
            # QNN glues a second sentence on without a space ("... by QNN EP.Hardmax node ..."): keep the first.
            reason = re.split(r"(?<=\.)(?=[A-Z])", reason)[0]
            where = _describe(model, main["op"], main["name"].strip(), int(main["index"])) if main else unit_op
            found.append(f"{where}: {reason}")
    if not found:
        found = [f"unsupported nodes {m['nodes'].strip()}" for m in map(_UNSUPPORTED.search, messages) if m]
    return list(dict.fromkeys(found))


def _describe(model: onnx.ModelProto, op: str, name: str, index: int) -> str:
    # onnxruntime numbers the nodes it loads in file order; nodes it inserts (layout changes) come after.
    if index < len(model.graph.node) and model.graph.node[index].op_type == op:
        node = model.graph.node[index]
        return f"{op} '{node.name}'" if node.name else f"{op} (output '{node.output[0]}')"
    return f"{op} '{name}'" if name else op


def float_tensors_between_quantized_ops(model: onnx.ModelProto) -> list[str]:
    """Outputs of compute ops that no QuantizeLinear takes, and float constants read by elementwise ops."""
    g = GraphIndex(model)
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:
        inferred = model
    float_type = onnx.TensorProto.FLOAT
    types = {vi.name: vi.type.tensor_type.elem_type for vi in
             list(inferred.graph.value_info) + list(inferred.graph.output) + list(inferred.graph.input)}
    suspects = []
    for node in g.nodes:
        if is_q(node) or is_dq(node) or node.op_type == "Constant":
            continue
        for out in node.output:
            users = g.consumers.get(out, [])
            if types.get(out) == float_type and not all(is_q(g.nodes[i]) for i in users):
                suspects.append(f"{node.op_type} output '{out}' (not quantized)")
        if node.op_type in _ELEMENTWISE:
            for name in node.input:
                value = g.constant(name) if name else None
                if value is not None and value.dtype.kind == "f":
                    suspects.append(f"{node.op_type} (output '{node.output[0]}') reads float constant '{name}' without a DequantizeLinear")
    return suspects


class PreparedSession:
    """The HTP session of one model built on a background thread while the compile goes on: building it is one
    thread's work (det: 0.5-0.9 s) that overlaps the judge's second candidate; ``run_htp`` of the same model bytes
    on the same options takes it instead of building its own (any other run_htp drops it). One at a time
    (``prepare`` replaces the last); ``discard`` drops it."""
    current: "PreparedSession | None" = None

    def __init__(self, model: onnx.ModelProto, provider_options: dict):
        self.key = (model.SerializeToString(), tuple(sorted(provider_options.items())))
        self.session = self.error = None
        self.thread = threading.Thread(target=self._build, args=(model, provider_options), daemon=True)
        self.thread.start()

    def _build(self, model, provider_options) -> None:
        try:
            self.session = htp_session(model, provider_options)
        except QccError as exc:  # refused: raised where run_htp takes it, as building it there would
            self.error = exc

    @classmethod
    def prepare(cls, model: onnx.ModelProto, provider_options: dict) -> None:
        cls.discard()
        cls.current = cls(model, provider_options)

    @classmethod
    def take(cls, model: onnx.ModelProto, provider_options: dict | None):
        """The prepared session when it is ``model``'s on ``provider_options``, else None; either way the build is
        waited for and the slot emptied, so no two session builds overlap (each points fd 1 at stderr meanwhile)."""
        prepared, cls.current = cls.current, None
        if prepared is None:
            return None
        prepared.thread.join()
        if prepared.key != (model.SerializeToString(), tuple(sorted((provider_options or {}).items()))):
            return None
        if prepared.error is not None:
            raise prepared.error
        return prepared.session

    @classmethod
    def discard(cls) -> None:
        if cls.current is not None:
            cls.current.thread.join()
            cls.current = None


def run_htp(model: onnx.ModelProto, samples: list[dict], provider_options: dict | None = None) -> tuple[list[dict], float]:
    """Outputs of ``model`` on HTP for each sample, and the mean seconds per sample."""
    session = PreparedSession.take(model, provider_options) or htp_session(model, provider_options)
    names = [o.name for o in session.get_outputs()]
    results, start = [], time.perf_counter()
    for sample in samples:
        try:
            results.append(dict(zip(names, session.run(names, sample))))
        except Exception as exc:
            raise QccError(f"the QNN HTP backend failed to run the model: {_first_line(exc)}") from None
    return results, (time.perf_counter() - start) / max(len(samples), 1)


@dataclass
class OutputAgreement:
    name: str
    cos_mean: float
    cos_min: float
    sqnr_db: float | None   # None: identical
    max_abs_diff: float
    step: float | None       # the output's quantization step, when it comes out of a per-tensor DQ
    max_steps: float | None

    def to_dict(self) -> dict:
        return asdict(self)


def output_steps(model: onnx.ModelProto) -> dict[str, float | None]:
    """Graph output -> its quantization step (scale of the per-tensor DequantizeLinear producing it), else None."""
    g = GraphIndex(model)
    steps = {}
    for name in g.outputs:
        index = g.producer.get(name)
        params = dq_params(g, g.nodes[index]) if index is not None and is_dq(g.nodes[index]) else None
        steps[name] = float(params.scale.reshape(-1)[0]) if params is not None and params.scale.size == 1 else None
    return steps


def compare_outputs(reference: list[dict], candidate: list[dict], steps: dict | None = None) -> list[OutputAgreement]:
    """Agreement of ``candidate`` with ``reference`` per output name, over all samples."""
    steps = steps or {}
    rows = []
    for name in reference[0]:
        stats, max_abs = ErrorStats(), 0.0
        for ref, got in zip(reference, candidate):
            stats.update(Reference(ref[name]), got[name].astype(ref[name].dtype, copy=False))
            max_abs = max(max_abs, float(np.max(np.abs(got[name] - ref[name]))) if ref[name].size else 0.0)
        step = steps.get(name)
        rows.append(OutputAgreement(name, stats.cos, stats.cos_min, stats.sqnr, max_abs, step,
                                    max_abs / step if step else None))
    return rows


def compare_with_cpu(model: onnx.ModelProto, samples: list[dict],
                     provider_options: dict | None = None) -> tuple[list[OutputAgreement], float]:
    """Run ``model`` on HTP and on CPU simulation; per-output agreement and HTP seconds per sample."""
    htp_outputs, seconds = run_htp(model, samples, provider_options)
    cpu_outputs = run_model(model, samples)
    return compare_outputs(cpu_outputs, htp_outputs, output_steps(model)), seconds


def dynamic_inputs(model: onnx.ModelProto) -> set[str]:
    """The graph inputs with a dimension that is not a fixed positive number."""
    return {i.name for i in model.graph.input
            if any(not d.HasField("dim_value") or d.dim_value <= 0 for d in i.type.tensor_type.shape.dim)}


def pinned_to_samples(model: onnx.ModelProto, samples: list[dict]) -> onnx.ModelProto:
    """``model`` with each dynamic input pinned to the first sample's shape: QNN compiles for static shapes."""
    dynamic = dynamic_inputs(model)
    shapes = {name: list(value.shape) for name, value in samples[0].items() if name in dynamic}
    return fix_input_shapes(onnx.ModelProto.FromString(model.SerializeToString()), shapes, "the compiled model") \
        if shapes else model


def device_checks(model: onnx.ModelProto, reference: onnx.ModelProto, samples: list[dict], archs: list[str],
                  runner=None, search: bool = False, known: list[tuple] = ()) -> list[dict]:
    """The compiled ``model`` on the HTP backend of each of ``archs`` (CPU fallback off), per output: HTP and the
    CPU simulation each against the FP32 ``reference``, and HTP against the simulation (cosine mean and min,
    SQNR dB, largest difference in output steps); and, with ``search``, where HTP loses accuracy
    (``search_reason``), the first tensors where the two part (``first_divergences``, on the first sample).
    A model the backend refuses gives ``status`` "refused" and the backend's reason. The runs (generations and
    the CPU x chunks of samples, then each generation's divergence search) are ``runner``'s units of work
    (compiler.cluster); each sample's result does not depend on which chunk ran it. ``known``: (simulated outputs,
    FP32 outputs) of the first samples, computed already; when they cover ``samples`` the CPU runs are skipped."""
    from compiler.cluster import LocalRunner
    runner = runner or LocalRunner()
    static = pinned_to_samples(model, samples)
    cpu_runs = len(known) < len(samples)
    chunks = max(1, min(len(samples), runner.workers // (len(archs) + cpu_runs)))
    bounds = [(len(samples) * i // chunks, len(samples) * (i + 1) // chunks) for i in range(chunks)]
    shared = HtpInputs(static.SerializeToString(), reference.SerializeToString(), samples)
    runs = runner.map(check_chunk, [(arch, start, end) for arch in (*archs, *([None] if cpu_runs else []))
                                    for start, end in bounds], shared, "HTP check")
    cpu = runs[-chunks:] if cpu_runs else [([outputs for outputs, _ in known], [outputs for _, outputs in known])]
    simulated = [output for outputs, _ in cpu for output in outputs]
    fp32 = [output for _, outputs in cpu for output in outputs]
    steps = output_steps(model)
    checks, searched = [], []
    for index, arch in enumerate(archs):
        parts = runs[index * chunks:(index + 1) * chunks]
        refused = next((part for part in parts if isinstance(part, str)), None)
        if refused is not None:
            checks.append({"arch": arch, "status": "refused", "reason": refused})
            continue
        htp = [output for outputs, _ in parts for output in outputs]
        seconds = sum(sec * len(outputs) for outputs, sec in parts) / max(len(samples), 1)
        rows = {name: {} for name in fp32[0]}
        for label, got, against in (("htp_vs_fp32", htp, fp32), ("simulation_vs_fp32", simulated, fp32),
                                    ("htp_vs_simulation", htp, simulated)):
            for row in compare_outputs(against, got, steps if label == "htp_vs_simulation" else None):
                rows[row.name][label] = {"cosine_mean": row.cos_mean, "cosine_min": row.cos_min, "sqnr_db": row.sqnr_db,
                                         **({"max_steps": row.max_steps} if row.max_steps is not None else {})}
        search = search_reason(rows, search)
        checks.append({"arch": arch, "status": "ran", "samples": len(samples), "seconds_per_sample": seconds,
                       "outputs": rows, "divergence_search": search, "first_divergences": []})
        if search["ran"]:
            searched.append(arch)
    divergences = runner.map(divergence_search, searched, shared, "HTP divergence search")
    for check in checks:
        if check["arch"] in searched:
            check["first_divergences"] = divergences[searched.index(check["arch"])]
    return checks


def search_reason(rows: dict, wanted: bool = True) -> dict:
    """Whether the layer-by-layer search runs, and why: it runs when ``wanted`` (--htp-search) and on some
    output HTP's mean cosine to FP32 is more than DEVICE_GAP below the simulation's, i.e. the device loses
    accuracy the simulation promised. Not wanted, it is left out (it costs an HTP session and run per
    EXPOSED_PER_SESSION tensors, more than the check itself) and the loss is still stated.
    When HTP is as close to FP32 as the simulation (or closer: it rounds some fused ops more finely), the two
    still part by rounding, which ``htp_vs_simulation`` states, but there is no loss to locate, and the search
    would cost an HTP session and run per EXPOSED_PER_SESSION tensors. Returns {"ran": whether it runs,
    "why": the reason in words}."""
    cosines = {name: (row["htp_vs_fp32"]["cosine_mean"], row["simulation_vs_fp32"]["cosine_mean"])
               for name, row in rows.items()}
    losses = [name for name, (device, simulation) in cosines.items()
              if device is not None and simulation is not None and device < simulation - DEVICE_GAP]
    if not losses:
        return {"ran": False, "loss": False, "why": f"HTP's cosine to FP32 is at most {DEVICE_GAP} below the "
                                                    "simulation's on every output"}
    device, simulation = cosines[losses[0]]
    return {"ran": wanted, "loss": True, "why": f"on output {losses[0]} HTP's cosine to FP32 {device:.5f} is more "
                                                f"than {DEVICE_GAP} below the simulation's {simulation:.5f}"}


@dataclass
class HtpInputs:
    """What every run of a device check reads: the model (static shapes), the FP32 reference (serialized), the
    samples."""
    model: bytes
    reference: bytes
    samples: list


def check_chunk(shared: HtpInputs, item: tuple) -> tuple:
    """Samples [start, end) on generation ``arch``: (outputs, seconds per sample), or the reason when refused;
    ``arch`` None: (the CPU simulation's outputs, the FP32 reference's)."""
    arch, start, end = item
    samples = shared.samples[start:end]
    if arch is None:
        return run_model(shared.model, samples), run_model(shared.reference, samples)
    try:
        return run_htp(onnx.ModelProto.FromString(shared.model), samples, {"htp_arch": arch})
    except QccError as exc:
        return str(exc)


def divergence_search(shared: HtpInputs, arch: str) -> list[dict]:
    return first_divergences(onnx.ModelProto.FromString(shared.model), shared.samples[0], arch)


# HTP "loses accuracy" when its cosine to FP32 falls this far below the simulation's on an output (issue 16's
# bound for HTP against its simulation): the check says so and searches layer by layer where.
DEVICE_GAP = 0.002
DIVERGENCE_COSINE = 0.999  # a tensor whose HTP value agrees less with the simulation "parts" from it
DIVERGENCES_SHOWN = 3
# Activations exposed per HTP session while searching: each one exposed costs session build time (det: 30 add
# 0.3 s, all 198 add 3.7 s), and the first divergences are usually early.
EXPOSED_PER_SESSION = 30
SEARCHED_ACTIVATIONS = 90


def first_divergences(model: onnx.ModelProto, sample: dict, arch: str) -> list[dict]:
    """The first activations, in graph order among the first SEARCHED_ACTIVATIONS, whose HTP value on ``sample``
    parts from the CPU simulation's (cosine below DIVERGENCE_COSINE), with the op that writes them and the
    largest difference in their own quantization steps: each activation's DequantizeLinear output is exposed
    as a graph output on both sides, EXPOSED_PER_SESSION at a time. Exposing a tensor can change how HTP
    fuses the ops around it, so these sessions locate where the two part; the model's outputs are compared
    on the graph as written (device_checks)."""
    activations = _activations(model)[:SEARCHED_ACTIVATIONS]
    (simulated,) = run_model(expose_tensors(model, [name for name, *_ in activations]), [sample])
    parted = []
    for start in range(0, len(activations), EXPOSED_PER_SESSION):
        chunk = activations[start:start + EXPOSED_PER_SESSION]
        try:
            (htp,), _ = run_htp(expose_tensors(model, [name for name, *_ in chunk]), [sample], {"htp_arch": arch})
        except QccError:
            return parted  # the graph with these outputs may not map onto HTP where the model itself does
        for name, tensor, op, step in chunk:
            stats = ErrorStats()
            stats.update(Reference(simulated[name]), htp[name].astype(simulated[name].dtype, copy=False))
            steps = float(np.max(np.abs(htp[name] - simulated[name]))) / step if step and simulated[name].size else None
            if stats.cos is not None and stats.cos < DIVERGENCE_COSINE:
                parted.append({"tensor": tensor, "op": op, "cosine": stats.cos, "max_steps": steps})
                if len(parted) == DIVERGENCES_SHOWN:
                    return parted
    return parted


def _activations(model: onnx.ModelProto) -> list[tuple]:
    """(the DQ's output, the quantized tensor, the op writing it, its step) of every activation, in graph order."""
    g = GraphIndex(model)
    activations = []
    for q, dq in activation_quantizers(g):
        tensor = g.nodes[q].input[0]
        writer = g.producer.get(tensor)
        params = dq_params(g, g.nodes[dq])
        step = float(params.scale.reshape(-1)[0]) if params is not None and params.scale.size == 1 else None
        activations.append((g.nodes[dq].output[0], tensor, g.nodes[writer].op_type if writer is not None else "input", step))
    return activations


def check_lines(check: dict, data: str) -> list[str]:
    """The stderr summary of one ``device_checks`` entry."""
    if check["status"] == "refused":
        return [f"HTP v{check['arch']}: the backend refuses the model: {check['reason']}"]
    lines = []
    for name, row in check["outputs"].items():
        htp, sim, agree = row["htp_vs_fp32"], row["simulation_vs_fp32"], row["htp_vs_simulation"]
        steps = f", max {agree['max_steps']:.0f} steps" if "max_steps" in agree else ""
        lines.append(f"HTP v{check['arch']} on {check['samples']} {data}: output {name}: HTP vs FP32 cosine "
                     f"{htp['cosine_mean']:.5f} (min {htp['cosine_min']:.5f}), simulation vs FP32 {sim['cosine_mean']:.5f}; "
                     f"HTP vs simulation {agree['cosine_mean']:.5f}{steps}")
    search = check["divergence_search"]
    if not search["loss"]:
        lines.append(f"HTP v{check['arch']}: layer-by-layer search not run: {search['why']}")
        return lines
    lines.append(f"HTP v{check['arch']}: {search['why']}; --judge htp chooses calibration and bias correction on "
                 "the device" + ("" if search["ran"] else ", --htp-search finds where HTP parts from the simulation"))
    if not search["ran"]:
        return lines
    if check["first_divergences"]:
        parted = ", ".join(f"{d['tensor']} ({d['op']}, cosine {d['cosine']:.4f}"
                           + (f", {d['max_steps']:.0f} steps)" if d["max_steps"] is not None else ")")
                           for d in check["first_divergences"])
        lines.append(f"HTP v{check['arch']}: first tensors where HTP parts from the simulation (cosine < "
                     f"{DIVERGENCE_COSINE}, first sample): {parted}")
    else:
        lines.append(f"HTP v{check['arch']}: no tensor among the first {SEARCHED_ACTIVATIONS} parts from the "
                     f"simulation (cosine < {DIVERGENCE_COSINE})")
    return lines


def render(rows: list[OutputAgreement], count: int, seconds: float) -> str:
    lines = [f"QNN HTP backend vs CPU simulation, {count} sample(s), {seconds:.2f} s per sample on HTP",
             f"{'output':<40} {'cos mean':>9} {'cos min':>9} {'SQNR dB':>8} {'max |d|':>10} {'steps':>6}"]
    for r in rows:
        name = r.name if len(r.name) <= 40 else "…" + r.name[-39:]
        sqnr = "inf" if r.sqnr_db is None else f"{r.sqnr_db:.1f}"
        steps = "-" if r.max_steps is None else f"{r.max_steps:.1f}"
        lines.append(f"{name:<40} {r.cos_mean:>9.6f} {r.cos_min:>9.6f} {sqnr:>8} {r.max_abs_diff:>10.4g} {steps:>6}")
    return "\n".join(lines) + "\n"


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
