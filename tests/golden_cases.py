"""Golden cases: ``golden/<pass>/<case>/{input.onnxtxt, pipeline.txt, expected.txt}``.

A case's input is ONNX text syntax (onnx.parser) whose first line is a ``#`` comment saying what the
case checks. Running a case compiles the pipeline and prints the module (compiler.printer) followed by
the remarks the passes made, so a case where a pass declines records why.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx.parser

from compiler.ir import Module, from_onnx, infer_shapes
from compiler.pass_manager import PassContext, PassKind, PassManager, parse_pipeline
from compiler.printer import print_module
from compiler.runtime import sample_inputs

GOLDEN_ROOT = Path(__file__).resolve().parent.parent / "golden"


@dataclass
class GoldenCase:
    path: Path

    @property
    def id(self) -> str:
        return f"{self.path.parent.name}/{self.path.name}"

    def load_input(self) -> Module:
        model = onnx.parser.parse_model((self.path / "input.onnxtxt").read_text())
        return from_onnx(infer_shapes(model, self.path / "input.onnxtxt"))

    def pipeline_text(self) -> str:
        return (self.path / "pipeline.txt").read_text().strip()

    @property
    def expected_path(self) -> Path:
        return self.path / "expected.txt"


def discover(root: Path = GOLDEN_ROOT) -> list[GoldenCase]:
    return [GoldenCase(p.parent) for p in sorted(root.glob("*/*/pipeline.txt"))]


def golden_context(module: Module, count: int = 4) -> PassContext:
    """Seeded random calibration samples, so annotating passes are deterministic in golden runs."""
    ctx = PassContext(seed=0, log=lambda message: None)
    ctx.calib_data = sample_inputs(module, PassContext(seed=0), count=count)
    return ctx


def run_case(case: GoldenCase):
    """Returns (original module, compiled module, dump text, pass manager)."""
    original = case.load_input()
    module = original.clone()
    pipeline = parse_pipeline(case.pipeline_text())
    manager = PassManager(pipeline, quiet=True)
    ctx = golden_context(original)
    manager.run(module, ctx)
    return original, module, print_module(module) + "".join(f"{remark}\n" for remark in ctx.remarks), manager


def all_float_preserving(manager: PassManager) -> bool:
    return all(p.kind is PassKind.FLOAT_PRESERVING for p in manager.pipeline)


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    denom = np.linalg.norm(a) * np.linalg.norm(b)
    return float(a @ b / denom) if denom else float(np.allclose(a, b))
