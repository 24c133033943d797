"""Block reconstruction in PyTorch for passes/brecq.py (the math is in that pass's docstring)."""
from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs
import torch

from compiler.encoding import MIN_RANGE, fixed_ranges
from compiler.ir import Module, const_value
from compiler.linear import set_input_const, uses
from compiler.pass_manager import PassContext, PassResult
from compiler.progress import Progress
from compiler.torch_graph import TorchGraph, UnsupportedOp, WeightRounding
from compiler.qdq import QDQ_CONSTANTS_KEY
from compiler.quantsim import QuantSim

WEIGHTED_OPS = {"Conv", "ConvTranspose", "Gemm", "MatMul"}
WARMUP = 0.2
BETA_START, BETA_END = 20.0, 2.0


def reconstruct(module: Module, ctx: PassContext, samples: list[dict], opts) -> PassResult:
    with torch.random.fork_rng():
        torch.manual_seed(opts.seed)
        return _reconstruct(module, ctx, samples, opts)


def _reconstruct(module: Module, ctx: PassContext, samples: list[dict], opts) -> PassResult:
    simulation = QuantSim.of_pipeline(module, ctx)
    shared, sim = simulation.propagated, simulation.qdq
    try:
        model = TorchGraph(sim.graph)
    except UnsupportedOp as exc:
        ctx.remark(exc.node, f"brecq: {exc}; nothing learned")
        return PassResult(False, {"blocks": 0})
    learned = _roundings(module, shared, sim, model)
    if not learned:
        return PassResult(False, {"blocks": 0})
    blocks = _blocks(sim.graph, model, set(learned), opts.block_layers)
    scale_groups = _scale_groups(shared, model) if opts.learn_scales else []
    start = time.perf_counter()
    feeds = [{name: torch.from_numpy(np.asarray(value)) for name, value in sample.items()} for sample in samples]
    boundaries = {name for block in blocks for name in block.inputs + block.outputs}
    batched = model.batched = _batches(model, feeds, boundaries)
    # FP32 targets come from one sample at a time, as onnxruntime computes them (a batched convolution sums
    # in another order, and the learned rounding is sensitive to that); the quantized side runs stacked.
    float_samples = [dict(feed) for feed in feeds]
    quantized = [_stack(feeds)] if batched else [dict(feed) for feed in feeds]
    # A boundary tensor is kept until the last block that reads it: memory is bounded by what is alive
    # between blocks, not by every block's inputs and outputs at once.
    last_reader = {name: index for index, block in enumerate(blocks) for name in block.inputs}
    ratios, kept = [], 0
    learning = sum(any(name in learned for name in block.weights) for block in blocks)
    with Progress(learning * opts.iterations, "brecq") as bar:  # one step per iteration: det's blocks take a minute
        for index, block in enumerate(blocks):
            _propagate(model, block, float_samples, boundaries, quantize=False)
            float_values = [_stack(float_samples, block.inputs + block.outputs)] if batched else float_samples
            names = [name for name in block.weights if name in learned]
            if names:
                nearest, error = _learn(model, block, names, float_values, quantized, opts, bar)
                kept += error >= nearest
                if nearest > 0:
                    ratios.append(min(error, nearest) / nearest)
            _propagate(model, block, quantized, boundaries, quantize=True)
            for values in float_samples + quantized:
                for name in [name for name in values if last_reader.get(name, -1) <= index]:
                    del values[name]
    flipped, total = _write_weights(module, sim, learned)
    changes = _write_scales(module, shared, scale_groups)
    stats = {"blocks": len(blocks), "layers": len(learned), "batched": int(batched), "kept-nearest": int(kept),
             "flipped-percent": 100.0 * flipped / max(total, 1), "optimize-seconds": time.perf_counter() - start}
    if opts.learn_scales:
        stats["scales-learned"] = len(changes)
        stats["scale-change-percent"] = 100.0 * float(np.mean(changes)) if changes else 0.0
    if ratios:
        stats["error-ratio-mean"] = float(np.mean(ratios))  # learned / nearest block output error
    return PassResult(True, stats)


def _write_weights(module: Module, sim: Module, learned: dict) -> tuple[int, int]:
    """Each learned weight into the module, exactly on its grid, with the encoding that grid belongs to;
    returns how many weights round otherwise than to nearest, and how many there are."""
    flipped = total = 0
    for node, rounding in learned.values():
        codes = rounding.codes().detach()
        flipped += int((codes != rounding.nearest).sum())
        total += codes.numel()
        encoding = sim.encodings[node.inputs[1].name]
        set_input_const(module.graph, node, 1, (codes * rounding.scale).numpy().astype(np.float32))
        module.encodings[node.inputs[1].name] = encoding
    return flipped, total


def _write_scales(module: Module, shared: Module, scale_groups: list) -> list[float]:
    """Each learned activation scale into the encodings of the tensors that share it (zero point kept,
    range at least MIN_RANGE); returns the relative change of each scale that moved."""
    changes = []
    for log_scale, names in scale_groups:
        factor = math.exp(float(log_scale.detach()))
        if factor == 1.0:
            continue
        changes.append(abs(factor - 1.0))
        for name in names:
            encoding = shared.encodings[name]
            scale = max(encoding.scale[0] * factor, MIN_RANGE / (2 ** encoding.bw - 1))
            module.encodings[name] = dataclasses.replace(encoding, scale=(float(np.float32(scale)),))
    return changes


def _roundings(module: Module, shared: Module, sim: Module, model: TorchGraph) -> dict:
    """Stored weight DQ output -> (the module's node using the weight, its WeightRounding); also gives
    the model every stored constant's FP32 value for its float runs."""
    stored_of = json.loads(sim.metadata.get(QDQ_CONSTANTS_KEY, "{}"))   # constant -> stored initializer
    originals = shared.graph.tensors()
    dq_of_stored = {dq.inputs[0].name: out for out, dq in model.stored_weights.items()}
    nodes = {node.inputs[1].name: node for node in module.graph.nodes
             if node.op in WEIGHTED_OPS and len(node.inputs) > 1 and const_value(node.inputs[1]) is not None}
    learned = {}
    for constant, stored in stored_of.items():
        out = dq_of_stored.get(stored)
        value = const_value(originals[constant]) if constant in originals else None
        if out is None or value is None:
            continue
        model.float_values[out] = torch.from_numpy(np.ascontiguousarray(value, dtype=np.float32))
        node = nodes.get(constant)
        enc = sim.encodings.get(constant)
        if node is None or enc is None or not enc.symmetric or constant in module.encodings:
            continue  # not a layer's weight, or rounded already (adaround, a loaded encoding)
        if uses(module.graph, node.inputs[1]) != 1:
            continue
        dq = model.stored_weights[out]
        zero_point = const_value(dq.inputs[2]) if len(dq.inputs) > 2 else np.zeros(1, np.int8)
        info = np.iinfo(zero_point.dtype)
        axis = int(dq.attrs.get("axis", 1)) % value.ndim if enc.per_channel else None
        rounding = WeightRounding(value, np.asarray(enc.scale), axis, int(info.min), int(info.max))
        model.roundings[out] = rounding
        learned[out] = (node, rounding)
    return learned


def _learn(model: TorchGraph, block: Block, names: list[str], float_values: list[dict], quantized: list[dict],
           opts, bar: Progress) -> tuple[float, float]:
    """Learn the rounding of ``names`` on ``block``; returns the block's error with nearest and with the
    learned (hard) rounding. The learned one is kept only if it is lower."""
    roundings = [model.roundings[name] for name in names]
    parameters = [rounding.v for rounding in roundings] + _block_scales(model, block)
    initial = [parameter.detach().clone() for parameter in parameters]
    optimizer = torch.optim.Adam([{"params": [rounding.v for rounding in roundings], "lr": opts.lr},
                                  {"params": parameters[len(roundings):], "lr": opts.scale_lr}])
    count = len(quantized) if len(quantized) > 1 else len(next(iter(quantized[0].values())))
    batch = min(opts.batch, count)
    warmup = int(WARMUP * opts.iterations)
    generator = np.random.default_rng(opts.seed)
    for rounding in roundings:
        rounding.soft = True
    model.drop = opts.drop
    for step in range(opts.iterations):
        chosen = np.sort(generator.choice(count, size=batch, replace=False))
        loss = sum(_block_error(model, block, f, q, opts.drop) for f, q in _rows(float_values, quantized, chosen, block)) / batch
        if step >= warmup:
            progress = (step - warmup) / max(opts.iterations - warmup, 1)
            beta = BETA_END + (BETA_START - BETA_END) * (1.0 - progress)
            loss = loss + opts.reg * sum(rounding.regularizer(beta) for rounding in roundings)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        bar.advance()
    model.drop = 0.0
    for rounding in roundings:
        rounding.soft = False
    chunks = [np.arange(first, min(first + batch, count)) for first in range(0, count, batch)]
    with torch.no_grad():
        error = sum(float(_block_error(model, block, f, q, 0.0))
                    for rows in chunks for f, q in _rows(float_values, quantized, rows, block))
        learned_values = [parameter.detach().clone() for parameter in parameters]
        for parameter, value in zip(parameters, initial):
            parameter.copy_(value)
        nearest = sum(float(_block_error(model, block, f, q, 0.0))
                      for rows in chunks for f, q in _rows(float_values, quantized, rows, block))
        if error < nearest:
            for parameter, value in zip(parameters, learned_values):
                parameter.copy_(value)
    return nearest, error


def _scale_groups(shared: Module, model: TorchGraph) -> list[tuple[torch.Tensor, list[str]]]:
    """One learnable log-scale per activation encoding the simulation quantizes with: the Q/DQ pairs of
    tensors that share an encoding (propagate-encodings) share it. Each comes with the names of the tensors
    whose encodings it sets. Fixed ranges (Sigmoid, Softmax, annotated ones) stay."""
    fixed = fixed_ranges(shared)
    groups: dict[tuple, tuple[torch.Tensor, list[str]]] = {}
    for node in model.nodes:
        if node.op != "QuantizeLinear":
            continue
        source, dequantized = node.inputs[0].name, node.outputs[0].outputs[0].outputs[0].name
        name = source if source in shared.encodings else dequantized  # a graph output keeps its name on the DQ
        if name not in shared.encodings or name in fixed or dequantized in fixed:
            continue
        fake = model.fake_quants[node.outputs[0].name]
        key = (fake.scale, fake.zero_point, fake.qmin, fake.qmax)
        if key not in groups:
            groups[key] = (torch.zeros(1, requires_grad=True), [])
        fake.log_scale = groups[key][0]
        groups[key][1].append(name)
    return list(groups.values())


def _block_scales(model: TorchGraph, block: Block) -> list[torch.Tensor]:
    """The learnable log-scales of the activation encodings the block's nodes quantize with."""
    found = {}
    for node in block.nodes:
        fake = model.fake_quants.get(node.inputs[0].name) if node.op == "DequantizeLinear" else None
        if fake is not None and fake.log_scale is not None:
            found[id(fake.log_scale)] = fake.log_scale
    return list(found.values())


def _block_error(model: TorchGraph, block: Block, float_values: dict, quantized: dict, drop: float):
    """Sum over the block's outputs of the squared error, summed over channels and averaged elsewhere."""
    values = {}
    for name in block.inputs:
        value = quantized[name]
        if drop > 0.0 and value.is_floating_point():
            value = torch.where(torch.rand_like(value) < drop, float_values[name], value)
        values[name] = value
    model.run(values, block.nodes)
    error = 0.0
    for name in block.outputs:
        if not values[name].is_floating_point():
            continue
        diff = (values[name] - float_values[name]) ** 2
        if diff.dim() > 1:  # summed over channels, averaged over positions, summed over the rows (samples)
            error = error + diff.sum(dim=1).reshape(diff.shape[0], -1).mean(dim=1).sum()
        else:
            error = error + diff.mean()
    return error


def _rows(float_values: list[dict], quantized: list[dict], rows: np.ndarray, block: Block) -> list[tuple[dict, dict]]:
    """(float, quantized) values of the block's inputs and outputs for the samples ``rows``: one stacked
    pair, or one pair per sample."""
    if len(quantized) > 1:
        return [(float_values[i], quantized[i]) for i in rows]
    index = torch.from_numpy(rows)
    return [({name: float_values[0][name][index] for name in block.inputs + block.outputs},
             {name: quantized[0][name][index] for name in block.inputs})]


def _stack(values: list[dict], names: list[str] | None = None) -> dict:
    return {name: torch.cat([v[name] for v in values]) for name in (values[0] if names is None else names)}


def _batches(model: TorchGraph, feeds: list[dict], boundaries: set) -> bool:
    """Whether the samples can run as one batch: same shapes, batch dimension 1, and two of them stacked
    give what they give one at a time (a Reshape to a fixed batch of 1 would not)."""
    shapes = {name: value.shape for name, value in feeds[0].items()}
    if len(feeds) < 2 or any(len(shape) == 0 or shape[0] != 1 for shape in shapes.values()):
        return False
    if any({name: value.shape for name, value in feed.items()} != shapes for feed in feeds):
        return False
    model.quantize = False
    try:
        with torch.no_grad():
            single = [model.run(dict(feed)) for feed in feeds[:2]]
            model.batched = True
            stacked = model.run(_stack(feeds[:2]))
    except (RuntimeError, IndexError, ValueError):
        return False
    finally:
        model.quantize, model.batched = True, False
    return all(name in stacked and _same(stacked[name], torch.cat([single[0][name], single[1][name]]))
               for name in boundaries if name in single[0])


def _propagate(model: TorchGraph, block: Block, chunks: list[dict], boundaries: set, quantize: bool) -> None:
    """Run ``block`` on each chunk of values (FP32 or quantized), keeping only the boundary tensors."""
    model.quantize = quantize
    with torch.no_grad():
        for values in chunks:
            model.run(values, block.nodes)
            for name in [name for name in values if name not in boundaries]:
                del values[name]
    model.quantize = True


@dataclass
class Block:
    nodes: list
    inputs: list[str]     # tensors the block reads that an earlier block (or the graph input) produced
    outputs: list[str]    # tensors it produces that a later block reads, or graph outputs
    weights: list[str]    # stored weight DQ outputs its nodes read


def _blocks(graph: gs.Graph, model: TorchGraph, learnable: set, block_layers: int) -> list[Block]:
    """Split the simulation's nodes at quantized activations that are the only tensor alive there, then
    merge runs until each holds ``block_layers`` learnable weights (the last run joins the block before)."""
    nodes = model.nodes
    produced, last_use = {}, {}
    for tensor in graph.inputs:
        produced[tensor.name] = -1
    for index, node in enumerate(nodes):
        for tensor in node.inputs:
            if tensor.name in produced:
                last_use[tensor.name] = index
        for tensor in node.outputs:
            produced[tensor.name] = index
    for tensor in graph.outputs:
        last_use[tensor.name] = len(nodes)
    closing = {}
    for name, index in last_use.items():
        closing.setdefault(index, []).append(name)
    live = {tensor.name for tensor in graph.inputs if tensor.name in last_use}
    runs, current = [], []
    for index, node in enumerate(nodes):
        current.append(node)
        live.difference_update(closing.get(index, []))
        live.update(t.name for t in node.outputs if last_use.get(t.name, -1) > index)
        if len(live) == 1 and node.op == "DequantizeLinear" and node.outputs[0].name in live:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    blocks, pending = [], []
    for run in runs:
        pending += run
        if _weights_read(pending, model, learnable)[1] >= block_layers:
            blocks.append(pending)
            pending = []
    if pending:
        if blocks:
            blocks[-1] += pending
        else:
            blocks.append(pending)
    position = {id(node): index for index, node in enumerate(nodes)}
    result = []
    for block_nodes in blocks:
        inside = {t.name for node in block_nodes for t in node.outputs}
        reads = [t.name for node in block_nodes for t in node.inputs if t.name]
        inputs = sorted({name for name in reads if name in produced and name not in inside})
        end = position[id(block_nodes[-1])]
        outputs = sorted(name for name in inside if last_use.get(name, -1) > end)  # graph outputs: last use past the end
        result.append(Block(block_nodes, inputs, outputs, _weights_read(block_nodes, model, learnable)[0]))
    return result


def _weights_read(nodes: list, model: TorchGraph, learnable: set) -> tuple[list[str], int]:
    names = [t.name for node in nodes for t in node.inputs if t.name in model.stored_weights]
    return names, sum(name in learnable for name in names)


def _same(got: torch.Tensor, expected: torch.Tensor) -> bool:
    """Equal up to float accumulation order (a batched convolution sums in another order)."""
    if got.shape != expected.shape or got.dtype != expected.dtype:
        return False
    if not expected.is_floating_point() or not expected.numel():
        return torch.equal(got, expected)
    return bool(torch.allclose(got, expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max())))
