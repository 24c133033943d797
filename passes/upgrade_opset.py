"""Convert the model to a newer default-domain opset (onnx.version_converter).

Per-channel QuantizeLinear/DequantizeLinear needs opset >= 13, HardSwish >= 14,
and 16-bit QDQ >= 21; older exports are lifted first. A model already at or above
``version`` is left unchanged (never downgraded). Model-local functions are kept as
they are, at the opsets their bodies import.
"""
from __future__ import annotations

from dataclasses import dataclass

from onnx import TensorProto, version_converter

from compiler.ir import MAX_OPSET, MIN_OPSET, Module, QccError, from_onnx, infer_shapes
from compiler.pass_manager import Pass, PassContext, PassKind, PassResult, register

FLOAT_TYPES = frozenset({TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE, TensorProto.BFLOAT16})


@register
class UpgradeOpset(Pass):
    name = "upgrade-opset"
    kind = PassKind.FLOAT_PRESERVING

    @dataclass(frozen=True)
    class Options:
        version: int = 13

        def __post_init__(self):
            if not MIN_OPSET <= self.version <= MAX_OPSET:
                raise QccError(f"pass 'upgrade-opset': option 'version' must be an opset qcc supports "
                               f"({MIN_OPSET}..{MAX_OPSET}), got {self.version}")

    def run(self, module: Module, ctx: PassContext) -> PassResult:
        old = module.opset
        if old >= self.options.version:
            return PassResult(False, {"opset": old})
        proto = module.to_onnx()
        weights = _take_float_weights(proto)
        try:
            converted = version_converter.convert_version(proto, self.options.version)
        except Exception as exc:
            first = next((l for l in str(exc).splitlines() if l.strip()), type(exc).__name__)
            raise QccError(f"upgrade-opset: cannot convert opset {old} to {self.options.version}: {first}") from None
        if not converted.functions:
            # The converter drops model-local functions; their bodies keep their own opset imports.
            converted.functions.extend(proto.functions)
        del proto
        for initializer in converted.graph.initializer:
            if initializer.name in weights:
                initializer.raw_data = weights.pop(initializer.name)
        module.graph = from_onnx(infer_shapes(converted)).graph
        return PassResult(True, {"opset-from": old, "opset-to": self.options.version})


def _take_float_weights(proto) -> dict[str, bytes]:
    """Move the float initializers' bytes out of ``proto`` (name -> bytes), leaving their type and shape.

    Upgrading adapters rewrite attributes and integer inputs, not float weights, but the converter copies the
    whole model several times over: converting a 321 MB model with its weights peaked at 2.8 GB."""
    weights = {}
    for initializer in proto.graph.initializer:
        if initializer.data_type in FLOAT_TYPES and initializer.raw_data:
            weights[initializer.name] = initializer.raw_data
            initializer.ClearField("raw_data")
    return weights
