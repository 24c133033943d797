"""Requantize activations between ops of different bit-widths, so each op reads its own width (HTP's rule).

QNN's HTP runs an op only when its activation inputs and its output have one integer type:
onnxruntime's QNN EP forms a node group from DequantizeLinear -> op -> QuantizeLinear only then, and
refuses the rest (docs/htp-backend.md, "Rejected"). Mixed precision (promote-16bit) therefore needs
an explicit conversion wherever a tensor of one width feeds an op of the other; the QNN EP turns a
DequantizeLinear -> QuantizeLinear pair between two groups into a Convert op.

After insert-qdq, an op whose output is quantized at w bits and whose activation input arrives
through a DequantizeLinear of another width reads it through a convert at w bits, over the input's
range (a fixed range at 16 bits on QNN's grid, compiler.encoding.range_encoding):

    %t_dq = DequantizeLinear(%t_q, @t_scale, @t_zero_point)           (uint8, other readers)
    %t_16bit_from = DequantizeLinear(%t_q, @t_scale, @t_zero_point)   (the convert's own)
    %t_16bit_q = com.microsoft.QuantizeLinear(%t_16bit_from, @t_16bit_scale, @t_16bit_zero_point)
    %t_16bit_dq = com.microsoft.DequantizeLinear(%t_16bit_q, @t_16bit_scale, @t_16bit_zero_point)
    %y = Conv(%t_16bit_dq, %w_dq, %b_dq)                               (output uint16)

Converting up is exact (the 8-bit grid lies on the 16-bit grid of the same range); converting down
rounds to the op's width, which is what the op computes with, over the tensor's 8-bit range where
promote-16bit recorded one (annotation ``narrow``: the clipped calibrated range, finer than the
16-bit min-max range on 8 bits). One convert per tensor and width,
shared by the ops of that width; each starts from a DequantizeLinear of its own (the QNN EP forms a
Convert only from a DQ -> Q pair nothing else reads). Activation-like constants (unsigned, per
tensor: Add/Mul/Div operands, which insert-qdq quantizes at the activation width) are stored again
at the op's width, over the same range. Weights stay as they are (HTP runs A16W8; LayerNormalization's
unsigned scale too: HTP refuses a uint16 one beside an int32 bias); an
int32 bias of an op whose input was converted is stored again with scale s_in * s_w for the new
input scale (HTP reads it on that grid: a bias left at the old scale broke an SE layer's Gemm on HTP,
docs/measurements.md). Ops without a quantized output, and
QuantizeLinear / DequantizeLinear themselves, are left alone; a second run finds nothing to do.
"""
from __future__ import annotations


import numpy as np
import onnx_graphsurgeon as gs

from compiler.encoding import Encoding, encoding_from_qdq, fixed_ranges, qdq_params
from compiler.ir import Module, const_value, unique_name
from compiler.qdq import WEIGHT_OPS, convert_encoding, rebiased, requantized_constant
from compiler.pass_manager import Pass, PassContext, PassKind, PassResult, register
from compiler.patterns import is_graph_output

MS_DOMAIN = "com.microsoft"
QDQ = ("QuantizeLinear", "DequantizeLinear")
# Ops with an int32 bias of scale s_in * s_w: the bias input's index (the weight is input 1).
BIAS_INPUT = {"Conv": 2, "ConvTranspose": 2, "Gemm": 2, "BatchNormalization": 2}


def _const(graph: gs.Graph, hint: str, values: np.ndarray) -> gs.Constant:
    # Not compiler.ir.make_const: np.ascontiguousarray turns a scalar scale into shape [1].
    return gs.Constant(unique_name(graph, hint), np.asarray(values))


def dq_encoding(dq: gs.Node) -> Encoding | None:
    """The per-tensor encoding of an activation's DequantizeLinear (None for a constant's or per-channel one)."""
    source = dq.inputs[0]
    if not source.inputs or source.inputs[0].op != "QuantizeLinear" or len(dq.inputs) < 3:
        return None
    scale, zero_point = const_value(dq.inputs[1]), const_value(dq.inputs[2])
    if scale is None or zero_point is None or np.size(scale) != 1:
        return None
    return encoding_from_qdq(np.asarray(scale), np.asarray(zero_point), None)


def quantized_tensor(graph: gs.Graph, dq: gs.Node) -> str:
    """The name of the activation a DequantizeLinear restores: its QuantizeLinear's input, or for a
    graph output (insert-qdq keeps the output's name on the DQ) the DQ's output."""
    return dq.outputs[0].name if is_graph_output(graph, dq.outputs[0]) else dq.inputs[0].inputs[0].inputs[0].name


def constant_at_width(dq: gs.Node, width: int) -> tuple[np.ndarray, Encoding] | None:
    """(stored values, encoding) of an activation-like constant (unsigned, per tensor: an Add/Mul/Div
    operand) requantized at ``width`` bits over its range; None when ``dq`` is no such constant or
    already has that width. Weights (signed) and biases (int32) are not activation-like."""
    if len(dq.inputs) < 3:
        return None
    return requantized_constant(const_value(dq.inputs[0]), const_value(dq.inputs[1]), const_value(dq.inputs[2]), width)


def output_width(node: gs.Node) -> int | None:
    """The width of the QuantizeLinear reading ``node``'s first output; None when it is not quantized."""
    if not node.outputs:
        return None
    for user in node.outputs[0].outputs:
        if user.op == "QuantizeLinear" and len(user.inputs) > 2:
            zero_point = const_value(user.inputs[2])
            if zero_point is not None:
                return np.dtype(zero_point.dtype).itemsize * 8
    return None


@register
class InsertConverts(Pass):
    name = "insert-converts"
    kind = PassKind.LOWERING
    requires = ("insert-qdq",)

    def run(self, module: Module, ctx: PassContext) -> PassResult:
        graph = module.graph
        fixed = fixed_ranges(module)
        converts: dict[tuple[str, int], gs.Variable] = {}
        stats = {"up": 0, "down": 0, "constants": 0, "biases": 0}
        for node in list(graph.nodes):
            if node.op in QDQ:
                continue
            width = output_width(node)
            if width is None:
                continue
            for index, tensor in enumerate(node.inputs):
                dq = tensor.inputs[0] if tensor.inputs else None
                if dq is None or dq.op != "DequantizeLinear":
                    continue
                key = (tensor.name, width)
                enc = dq_encoding(dq)
                if enc is not None and enc.bw != width:
                    if key not in converts:
                        name = quantized_tensor(graph, dq)
                        target = convert_encoding(enc, width, fixed.get(name), module.annotations.get(name, {}).get("narrow"))
                        converts[key] = self._convert(module, dq, name, target)
                        stats["up" if width > enc.bw else "down"] += 1
                    node.inputs[index] = converts[key]
                    if index == 0 and self._rebias(module, node, float(converts[key].inputs[0].inputs[1].values)):
                        stats["biases"] += 1
                    continue
                # A weight keeps its storage: LayerNormalization's unsigned scale is not an activation-like
                # constant, and HTP refuses it at uint16 beside the int32 bias (rec's 16-bit LayerNorms).
                stored = constant_at_width(dq, width) if not (node.op in WEIGHT_OPS and index == 1) else None
                if stored is not None:
                    if key not in converts:
                        converts[key] = self._constant(module, dq, *stored)
                        stats["constants"] += 1
                    node.inputs[index] = converts[key]
        if converts:
            graph.cleanup(remove_unused_graph_inputs=False).toposort()
        return PassResult(bool(converts), {"converts": stats["up"] + stats["down"], **{k: v for k, v in stats.items() if v}})

    @staticmethod
    def _rebias(module: Module, node: gs.Node, input_scale: float) -> bool:
        """Give a node whose input was converted an int32 bias with scale s_in * s_w for its new input scale:
        HTP reads the bias on that grid (the conversion is otherwise visible as a bias 257 times off)."""
        if node.op not in BIAS_INPUT or len(node.inputs) <= BIAS_INPUT[node.op]:
            return False
        bias_dq, weight_dq = (node.inputs[i].inputs[0] if node.inputs[i].inputs else None for i in (BIAS_INPUT[node.op], 1))
        if bias_dq is None or weight_dq is None or "DequantizeLinear" not in (bias_dq.op, weight_dq.op):
            return False
        stored, scale, weight_scale = (const_value(t) for t in (bias_dq.inputs[0], bias_dq.inputs[1], weight_dq.inputs[1]))
        if stored is None or scale is None or weight_scale is None or stored.dtype != np.int32:
            return False
        values, new_scale = rebiased(stored, scale, weight_scale, input_scale)
        hint = f"{bias_dq.outputs[0].name}_rebiased"
        inputs = [_const(module.graph, f"{hint}_quantized", values), _const(module.graph, f"{hint}_scale", new_scale),
                  bias_dq.inputs[2]]
        restored = gs.Variable(unique_name(module.graph, hint), dtype=bias_dq.outputs[0].dtype, shape=bias_dq.outputs[0].shape)
        module.graph.nodes.append(gs.Node("DequantizeLinear", inputs=inputs, outputs=[restored], attrs=dict(bias_dq.attrs),
                                          domain=bias_dq.domain))
        node.inputs[BIAS_INPUT[node.op]] = restored
        return True

    @staticmethod
    def _constant(module: Module, dq: gs.Node, stored: np.ndarray, enc: Encoding) -> gs.Variable:
        """A DequantizeLinear of the constant requantized at ``enc``'s width."""
        graph = module.graph
        scale, zero_point = qdq_params(enc)
        hint = f"{dq.outputs[0].name}_{enc.bw}bit"
        inputs = [_const(graph, f"{hint}_quantized", stored)]
        inputs.append(_const(graph, f"{hint}_scale", scale))
        inputs.append(_const(graph, f"{hint}_zero_point", zero_point))
        restored = gs.Variable(unique_name(graph, hint), dtype=dq.outputs[0].dtype, shape=dq.outputs[0].shape)
        graph.nodes.append(gs.Node("DequantizeLinear", inputs=inputs, outputs=[restored],
                                   domain="" if enc.bw == 8 or module.opset >= 21 else MS_DOMAIN))
        return restored

    @staticmethod
    def _convert(module: Module, dq: gs.Node, name: str, enc: Encoding) -> gs.Variable:
        """quantized -> DequantizeLinear (its own) -> QuantizeLinear -> DequantizeLinear at ``enc``'s width.
        The convert starts from a DequantizeLinear of its own: the QNN EP pairs a DQ with a following Q
        into a Convert only when nothing else reads the DQ (else the Q is left alone with a float input,
        which HTP refuses at finalize)."""
        graph = module.graph
        tensor = dq.outputs[0]
        own = gs.Variable(unique_name(graph, f"{name}_{enc.bw}bit_from"), dtype=tensor.dtype, shape=tensor.shape)
        graph.nodes.append(gs.Node("DequantizeLinear", inputs=list(dq.inputs), outputs=[own], attrs=dict(dq.attrs),
                                   domain=dq.domain))
        scale, zero_point = qdq_params(enc)
        domain = "" if enc.bw == 8 or module.opset >= 21 else MS_DOMAIN
        hint = f"{name}_{enc.bw}bit"
        scale_const = _const(graph, f"{hint}_scale", scale)
        zero_const = _const(graph, f"{hint}_zero_point", zero_point)
        quantized = gs.Variable(unique_name(graph, f"{hint}_q"), dtype=zero_point.dtype, shape=tensor.shape)
        graph.nodes.append(gs.Node("QuantizeLinear", inputs=[own, scale_const, zero_const], outputs=[quantized],
                                   domain=domain))
        restored = gs.Variable(unique_name(graph, f"{hint}_dq"), dtype=tensor.dtype, shape=tensor.shape)
        graph.nodes.append(gs.Node("DequantizeLinear", inputs=[quantized, scale_const, zero_const], outputs=[restored],
                                   domain=domain))
        return restored
