"""Targets: a named pipeline plus the quantization defaults QNN's backend expects.

CPU and GPU take float models; DSP, HTP and HTA take quantized ones (QNN's rules).
``--passes`` replaces a target's pipeline entirely.
"""
from __future__ import annotations

from dataclasses import dataclass

from compiler.ir import QccError

CANONICALIZE = "fold-constants,cleanup,upgrade-opset{version=13}"


@dataclass(frozen=True)
class Target:
    name: str
    description: str
    pipeline: str
    quantized: bool


TARGETS = {
    "cpu": Target("cpu", "QNN CPU backend: float model, canonicalized", CANONICALIZE, quantized=False),
    "gpu": Target("gpu", "QNN GPU backend: float model, canonicalized", CANONICALIZE, quantized=False),
}


def get_target(name: str) -> Target:
    if name not in TARGETS:
        raise QccError(f"unknown target '{name}'; valid targets: {', '.join(TARGETS)}")
    return TARGETS[name]
