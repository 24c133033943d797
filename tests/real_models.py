"""Compile the real PP-OCR models on real text images, as the float-preserving pass tests need.

Verification uses real images, not the pass manager's default noise: on noise the det model's
sigmoid output stays below 1e-4 everywhere, so a relative check would measure onnxruntime's
sigmoid approximation near saturation instead of the pass.
"""
from __future__ import annotations

from pathlib import Path

from compiler.data import Dataset, ImageOptions, specs_of
from compiler.ir import Module, load
from compiler.pass_manager import PassContext, PassManager, parse_pipeline

CANONICALIZE = "fold-constants,cleanup,upgrade-opset{version=17}"  # the quantized targets'

MODELS = {
    # name: (input shape, image folder, normalisation PP-OCR's preprocessing uses)
    "cls": ([1, 3, 48, 192], "text_cls", ImageOptions(mean=(0.5,) * 3, std=(0.5,) * 3)),
    "det": ([1, 3, 320, 320], "text_det", ImageOptions(mean=(0.5,) * 3, std=(0.5,) * 3)),
    "rec": ([1, 3, 48, 320], "text_cls", ImageOptions(mean=(0.5,) * 3, std=(0.5,) * 3)),
}


def load_canonical(assets: Path, name: str) -> tuple[Module, PassContext]:
    shape, folder, image = MODELS[name]
    module = load(assets / "models" / f"ppocr_{name}.onnx", {"x": shape})
    ctx = PassContext(calib_data=list(Dataset(assets / folder, specs_of(module), count=2, image=image)), log=lambda m: None)
    PassManager(parse_pipeline(CANONICALIZE), quiet=True).run(module, ctx)
    return module, ctx


def run_verified(module: Module, ctx: PassContext, pipeline: str) -> PassManager:
    """Run ``pipeline`` with --verify semantics (raises beyond 1e-4 relative) and return the manager."""
    manager = PassManager(parse_pipeline(pipeline), verify=True, quiet=True)
    manager.run(module, ctx)
    return manager


def op_count(module: Module, op: str) -> int:
    return sum(1 for node in module.graph.nodes if node.op == op)
