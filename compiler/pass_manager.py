"""Passes, their registry, textual pipelines and the manager that runs them.

Pipeline text is MLIR-like: ``quant{act-bits=16},fold-bn,pad-channels{multiple=32},calibrate,insert-qdq``
(the leading ``quant{...}`` is the compile's quantization config, compiler.config).
Option keys are the kebab-case spelling of the pass's ``Options`` dataclass fields
and are typed by it; ``str(pipeline)`` prints every option, so it round-trips.
"""
from __future__ import annotations

import dataclasses
import enum
import importlib
import importlib.util
import pkgutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, ClassVar

import numpy as np

from compiler.config import CONFIG_NAME, QuantConfig
from compiler.errors import PassFailure
from compiler.ir import Module, QccError


class PassKind(enum.Enum):
    FLOAT_PRESERVING = "float-preserving"  # rewrites whose float outputs must not change (--verify)
    ANNOTATING = "annotating"              # fill or adjust the encodings table
    LOWERING = "lowering"                  # materialise encodings as graph nodes


@dataclass
class PassResult:
    modified: bool
    stats: dict = field(default_factory=dict)


@dataclass
class Remark:
    pass_name: str
    where: str
    message: str

    def __str__(self) -> str:
        return f"remark [{self.pass_name}] {self.where}: {self.message}"


@dataclass
class PassContext:
    """What a pass may need besides the module: data, remarks, progress output."""
    calib_data: object = None           # compiler.data.Dataset or None
    eval_data: object = None
    # Calibration samples held back from calibration: what choices between candidates are judged on.
    judge_data: object = None
    seed: int = 0
    verbose: bool = False
    log: Callable[[str], None] = field(default=lambda message: print(message, file=sys.stderr))
    remarks: list = field(default_factory=list)
    current_pass: str = ""
    # The compile's quantization config and pipeline; PassManager.run sets both from its pipeline.
    config: QuantConfig = QuantConfig()
    pipeline: object = None
    # Where independent units of work run (compiler.cluster): this process, or Ray tasks (--workers).
    runner: object = field(default_factory=lambda: _local_runner())
    # The module as it was before the first pass that may change its float outputs (annotating or lowering:
    # bias correction and AdaRound rewrite weights), i.e. the FP32 reference; PassManager.run sets it.
    reference: object = None
    # The module as the first lowering pass (insert-qdq) received it: the float model its encodings describe, with
    # bias correction's and AdaRound's weights (what OUT.float.onnx holds); PassManager.run sets it.
    lowered_from: object = None

    def remark(self, where, message: str) -> None:
        outputs = getattr(where, "outputs", None)
        label = getattr(where, "name", None) or (outputs[0].name if outputs else str(where))  # unnamed: its output
        op = getattr(where, "op", None)
        self.remarks.append(Remark(self.current_pass, f"{label} ({op})" if op else label, message))


def _local_runner():
    from compiler.cluster import LocalRunner
    return LocalRunner()


class Pass:
    """Base class. Subclasses set ``name``, ``kind`` and ``run``, and a frozen ``Options`` dataclass when they
    have options (this empty one otherwise)."""
    name: ClassVar[str]
    kind: ClassVar[PassKind]
    # An optional extra's module the pass needs (brecq: "torch"); without it the pass declines with a remark.
    optional_module: ClassVar[str | None] = None
    # Contracts the pipeline parser checks: passes that must run earlier (``requires``), and passes that, when
    # the pipeline has them, must run earlier (``after``).
    requires: ClassVar[tuple[str, ...]] = ()
    after: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def available(cls) -> bool:
        return cls.optional_module is None or importlib.util.find_spec(cls.optional_module) is not None

    @dataclass(frozen=True)
    class Options:
        pass

    def __init__(self, options=None):
        self.options = options if options is not None else self.Options()

    def run(self, module: Module, ctx: PassContext) -> PassResult:
        raise NotImplementedError

    @classmethod
    def summary(cls) -> str:
        doc = (sys.modules[cls.__module__].__doc__ or cls.__doc__ or "").strip()
        return doc.splitlines()[0] if doc else ""

    def __str__(self) -> str:
        return _element_text(self.name, self.options)


REGISTRY: dict[str, type[Pass]] = {}


def register(cls: type[Pass]) -> type[Pass]:
    if cls.name in REGISTRY and REGISTRY[cls.name] is not cls:
        raise RuntimeError(f"pass name '{cls.name}' registered twice")
    if not dataclasses.is_dataclass(cls.Options) or not cls.Options.__dataclass_params__.frozen:
        raise RuntimeError(f"pass '{cls.name}': Options must be a frozen dataclass")
    REGISTRY[cls.name] = cls
    return cls


def load_passes() -> dict[str, type[Pass]]:
    """Import every module of the ``passes`` package so that each registers itself."""
    import passes
    for info in sorted(pkgutil.iter_modules(passes.__path__), key=lambda i: i.name):
        importlib.import_module(f"passes.{info.name}")
    return REGISTRY


def _kebab(name: str) -> str:
    return name.replace("_", "-")


def _format_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    return str(value)


def choices(*allowed, default):
    """A string option restricted to ``allowed``: ``method: str = choices("a", "b", default="a")``."""
    return field(default=default, metadata={"choices": tuple(allowed)})


def _convert(owner: str, fld: dataclasses.Field, text: str):
    kind = fld.type if isinstance(fld.type, type) else {"bool": bool, "int": int, "float": float, "str": str}.get(str(fld.type), str)
    key = _kebab(fld.name)
    try:
        if kind is bool:
            if text.lower() not in ("true", "false", "1", "0"):
                raise ValueError
            value = text.lower() in ("true", "1")
        elif kind is int:
            value = int(text)
        elif kind is float:
            value = float(text)
        else:
            value = text
    except ValueError:
        raise QccError(f"{owner}: option '{key}' expects {kind.__name__}, got '{text}'") from None
    allowed = fld.metadata.get("choices")
    if allowed and value not in allowed:
        raise QccError(f"{owner}: option '{key}' must be one of {', '.join(allowed)}, got '{text}'")
    return value


def _element_text(name: str, options) -> str:
    fields = dataclasses.fields(options)
    if not fields:
        return name
    body = " ".join(f"{_kebab(f.name)}={_format_value(getattr(options, f.name))}" for f in fields)
    return f"{name}{{{body}}}"


class Pipeline(list):
    """Passes in order, and the quantization config they read (printed first when the pipeline quantizes)."""

    def __init__(self, passes=(), config: QuantConfig | None = None):
        super().__init__(passes)
        self.config = config or QuantConfig()
        self.config_given = config is not None  # the text had a quant{...}, or the caller chose one

    @property
    def quantizes(self) -> bool:
        return any(p.kind is not PassKind.FLOAT_PRESERVING for p in self)

    def find(self, name: str):
        """The pass named ``name`` in this pipeline, or None."""
        return next((p for p in self if p.name == name), None)

    def __str__(self) -> str:
        head = [_element_text(CONFIG_NAME, self.config)] if self.quantizes else []
        return ",".join(head + [str(p) for p in self])


def _split_top_level(text: str) -> list[str]:
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth < 0:
                raise QccError(f"pipeline: unbalanced '}}' at column {i + 1} in '{text}'")
        elif ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    if depth:
        raise QccError(f"pipeline: missing '}}' in '{text}'")
    parts.append(text[start:])
    return parts


def make_pass(name: str, options: dict[str, str] | None = None) -> Pass:
    registry = load_passes()
    if name not in registry:
        raise QccError(f"pipeline: unknown pass '{name}'; valid passes: {', '.join(sorted(registry))}")
    cls = registry[name]
    return cls(parse_options(f"pass '{name}'", cls.Options, options))


def parse_options(owner: str, options_type, options: dict[str, str] | None):
    """An ``options_type`` dataclass from kebab-case ``options`` text; unknown keys and bad values refused."""
    fields = {_kebab(f.name): f for f in dataclasses.fields(options_type)}
    values = {}
    for key, text in (options or {}).items():
        if key not in fields:
            valid = ", ".join(fields) or "none"
            raise QccError(f"{owner}: unknown option '{key}'; valid options: {valid}")
        values[fields[key].name] = _convert(owner, fields[key], text)
    return options_type(**values)


def parse_pipeline(text: str) -> Pipeline:
    """The passes of ``text``; an empty pipeline or one that breaks a contract (``check_contracts``) is refused."""
    if not text.strip():
        raise QccError("pipeline: no passes given (e.g. 'fold-constants,cleanup,fold-bn')")
    pipeline = Pipeline()
    for position, part in enumerate(_split_top_level(text.strip())):
        part = part.strip()
        if not part:
            raise QccError(f"pipeline: empty pass name in '{text}'")
        name, brace, rest = part.partition("{")
        options: dict[str, str] = {}
        if brace:
            if not rest.endswith("}"):
                raise QccError(f"pipeline: text after '}}' in '{part}'")
            for item in rest[:-1].replace(",", " ").split():
                key, eq, value = item.partition("=")
                if not eq or not key or not value:
                    raise QccError(f"pipeline: option '{item}' of pass '{name.strip()}' must be key=value")
                options[key] = value
        if name.strip() == CONFIG_NAME:
            if position:
                raise QccError(f"pipeline: '{CONFIG_NAME}{{...}}' (the quantization config) must come first, in '{text}'")
            pipeline.config, pipeline.config_given = parse_options(CONFIG_NAME, QuantConfig, options), True
            continue
        pipeline.append(make_pass(name.strip(), options))
    if not pipeline:
        raise QccError(f"pipeline: no passes given after the quantization config in '{text}'")
    check_contracts(pipeline)
    return pipeline


KIND_ORDER = (PassKind.FLOAT_PRESERVING, PassKind.ANNOTATING, PassKind.LOWERING)


def check_contracts(pipeline: list) -> None:
    """Refuse, naming both passes, an order that breaks a contract: float rewrites before annotating passes
    before lowering ones (a rewrite after calibrate changes the tensors it measured; an encoding after
    insert-qdq is never materialised), each pass's ``requires`` and ``after``, and an annotating or
    lowering pass named twice (a second calibrate would replace the first's encodings, a second
    insert-qdq quantize the QDQ nodes)."""
    names = [p.name for p in pipeline]
    for index, p in enumerate(pipeline):
        earlier = pipeline[:index]
        if p.kind is not PassKind.FLOAT_PRESERVING and p.name in names[:index]:
            raise QccError(f"pipeline: pass '{p.name}' appears more than once; an annotating or lowering pass runs once")
        later_kind = next((q for q in earlier if KIND_ORDER.index(q.kind) > KIND_ORDER.index(p.kind)), None)
        if later_kind is not None:
            raise QccError(f"pipeline: '{p.name}' ({p.kind.value}) cannot run after '{later_kind.name}' "
                           f"({later_kind.kind.value}): float-preserving passes run first, annotating ones next, lowering ones last")
        missing = next((name for name in p.requires if name not in names[:index]), None)
        if missing is not None:
            raise QccError(f"pipeline: '{p.name}' needs '{missing}' before it")
        late = next((name for name in p.after if name in names[index + 1:]), None)
        if late is not None:
            raise QccError(f"pipeline: '{p.name}' must run after '{late}', not before it")


VERIFY_ATOL = 1e-6


def verify_outputs(before: Module, after: Module, samples: list[dict], rtol: float, label: str,
                   atol: float = VERIFY_ATOL) -> float:
    """Max over outputs of max|Δ| / max|ref|; raises QccError naming ``label`` beyond ``rtol``.

    A difference within ``atol`` passes whatever the reference's scale: outputs that
    are ~0 on the samples (a detector's probability map on noise) would otherwise
    fail on float rounding alone.
    """
    from compiler.runtime import run_model
    ref = run_model(before, samples)
    got = run_model(after, samples)
    worst = 0.0
    beyond_atol = False
    for name in ref[0]:
        for r, g in zip(ref, got):
            if name not in g:
                raise QccError(f"verify: after {label}, output '{name}' is missing")
            if r[name].shape != g[name].shape:
                raise QccError(f"verify: after {label}, output '{name}' has shape {g[name].shape}, expected {r[name].shape}")
            scale = max(float(abs(r[name]).max()), 1e-12)
            diff = float(abs(r[name].astype("float64") - g[name]).max())
            worst = max(worst, diff / scale)
            beyond_atol |= diff > atol
    if worst > rtol and beyond_atol:
        raise QccError(f"verify: pass {label} changed the float outputs (max relative difference {worst:.3g} > {rtol:g})")
    return worst


@dataclass
class PassRecord:
    name: str
    text: str
    modified: bool
    stats: dict
    seconds: float
    verify_error: float | None = None


class PassManager:
    def __init__(self, pipeline: Pipeline, *, verify: bool = False, verify_rtol: float = 1e-4,
                 dump_after: str | None = None, dump_dir: str | Path | None = None, quiet: bool = False):
        self.pipeline = pipeline
        self.verify = verify
        self.verify_rtol = verify_rtol
        self.dump_after = dump_after
        self.dump_dir = Path(dump_dir) if dump_dir else None
        self.quiet = quiet
        self.records: list[PassRecord] = []

    def run(self, module: Module, ctx: PassContext | None = None, first: int = 0) -> Module:
        """Run the pipeline's passes from index ``first`` on (the module has been through the ones before, e.g.
        by another manager whose records this one was given)."""
        from compiler.printer import print_module
        ctx = ctx or PassContext()
        ctx.config, ctx.pipeline = self.pipeline.config, self.pipeline
        check_quantizable(module, self.pipeline)
        samples = None
        if self.verify and any(p.kind is PassKind.FLOAT_PRESERVING for p in self.pipeline[first:]):
            from compiler.runtime import sample_inputs
            samples = sample_inputs(module, ctx, count=2)
            if ctx.calib_data is None and not self.quiet:
                # A model whose outputs stay ~0 on noise (a text detector's map) shows float rounding as relative error.
                ctx.log("--verify: on 2 random-noise inputs; give --calib-data for real ones")
        for index, p in enumerate(self.pipeline):
            if index < first:
                continue
            ctx.current_pass = p.name
            if ctx.reference is None and p.kind is not PassKind.FLOAT_PRESERVING:
                ctx.reference = module.clone()
            if ctx.lowered_from is None and p.kind is PassKind.LOWERING:
                ctx.lowered_from = module.clone()
            check = self.verify and p.kind is PassKind.FLOAT_PRESERVING
            before = module.clone() if check else None
            start = time.perf_counter()
            remarks_before = len(ctx.remarks)
            try:
                result = p.run(module, ctx)
            except QccError:
                raise
            except Exception as exc:
                raise PassFailure(p.name, str(Pipeline(self.pipeline[:index])), exc) from exc
            seconds = time.perf_counter() - start
            error = verify_outputs(before, module, samples, self.verify_rtol, f"'{p.name}'") if check and result.modified else None
            self.records.append(PassRecord(p.name, str(p), result.modified, dict(result.stats), seconds, error))
            if not self.quiet:
                stats = " ".join(f"{k}={_format_stat(v)}" for k, v in result.stats.items())
                checked = f" verified (max rel diff {error:.2g})" if error is not None else ""
                ctx.log(f"[{index + 1}/{len(self.pipeline)}] {p.name}: {seconds:.2f}s {'modified' if result.modified else 'unchanged'}"
                        f"{' ' + stats if stats else ''}{checked}")
                for line in remark_lines(ctx.remarks[remarks_before:]):
                    ctx.log(f"    {line}")
            if self.dump_dir and self.dump_after in ("all", p.name):
                self.dump_dir.mkdir(parents=True, exist_ok=True)
                (self.dump_dir / f"{index + 1:02d}-{p.name}.txt").write_text(print_module(module))
        module.metadata["qcc.pipeline"] = str(self.pipeline)
        return module


def check_quantizable(module: Module, pipeline: Pipeline) -> None:
    """Refuse, before the first pass, to quantize a model that computes in another float type than float32:
    the quantizing passes simulate and write float32 QuantizeLinear/DequantizeLinear around float32 tensors."""
    quantizing = [p.name for p in pipeline if p.kind is not PassKind.FLOAT_PRESERVING]
    if not quantizing:
        return
    for tensor in module.graph.inputs + [t for node in module.graph.nodes for t in node.outputs]:
        dtype = np.dtype(tensor.dtype) if tensor.dtype is not None else None
        if dtype is not None and dtype.kind == "f" and dtype != np.float32:
            raise QccError(f"{module.metadata.get('qcc.source', 'model')}: tensor '{tensor.name}' is {dtype.name}; "
                           f"{quantizing[0]} quantizes float32 models only (convert the model to float32, or compile "
                           f"it for a float target: cpu, gpu)")


REMARKS_SHOWN = 3  # a message on more nodes than this is logged once, with the count


def remark_lines(remarks: list[Remark]) -> list[str]:
    """The log lines for one pass's remarks, in order of first appearance: a message on at most REMARKS_SHOWN
    nodes once per node, one on more as a single line naming the first few and the count (qcc compile's
    report.json keeps them all; cle on a PicoDet detector remarked on 71 HardSwish pairs one by one)."""
    by_message: dict[str, list[Remark]] = {}
    for remark in remarks:
        by_message.setdefault(remark.message, []).append(remark)
    lines = []
    for message, group in by_message.items():
        if len(group) <= REMARKS_SHOWN:
            lines += [str(remark) for remark in group]
        else:
            first = ", ".join(remark.where for remark in group[:REMARKS_SHOWN])
            lines.append(f"remark [{group[0].pass_name}] {len(group)} nodes ({first}, ...): {message}")
    return lines


def _format_stat(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
