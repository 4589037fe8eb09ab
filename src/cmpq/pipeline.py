"""The streaming block-wise quantization engine (GPTQ's sequential loop, for any registered method).

Capture the inputs of block 0 for the calibration windows; then for each block: run the windows through it
with hooks gathering only the statistics the quantizer needs, quantize its linears, and recompute its
outputs with the quantized weights to feed the next block. Memory is the model plus two activation buffers
(nsamples x seqlen x hidden; three or four with fine-tuning), independent of the number of blocks.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from cmpq.calibration.capture import capture_block_inputs, run_block
from cmpq.calibration.gradients import gradient_statistics
from cmpq.calibration.stats import GRADIENT_STATISTICS, LayerStats, StatsRecorder
from cmpq.errors import CmpqError, ConfigError
from cmpq.formats.base import BitBreakdown, QuantizedWeight
from cmpq.head import install_head, quantize_head
from cmpq.models.arch import ArchSpec
from cmpq.progress import bar as progress_bar
from cmpq.progress import stage
from cmpq.threads import adapt
from cmpq.quantizers.base import Quantizer
from cmpq.resume import RunState, check_weights
from cmpq.training.finetune import FinetuneConfig, enabled, finetune_block


@dataclass
class QuantizationResult:
    """Quantized layers by full module name, with timing. The model itself now holds dequantized weights.
    `head`: the name of the quantized output head (`--quantize-head`) among `layers`, accounted apart."""

    method: str
    layers: dict[str, QuantizedWeight] = field(default_factory=dict)
    seconds: float = 0.0
    head: str | None = None
    hooks: list = field(default_factory=list)  # activation quantizers installed on the model (SmoothQuant)
    finetune: list = field(default_factory=list)  # per block: output error before and after fine-tuning
    finetune_config: FinetuneConfig | None = None  # the fine-tuning that produced `finetune`, if any
    distill: dict | None = None  # end-to-end distillation of the stored values (`cmpq.training.distill`), if it ran
    calibration: dict | None = None  # source, nsamples, seqlen, seed, dtype of the calibration windows, if used

    def remove_hooks(self) -> None:
        """Take the activation quantizers off the model (e.g. before restoring its float weights)."""
        for handle in self.hooks:
            handle.remove()
        self.hooks.clear()

    def storage(self) -> BitBreakdown:
        """Honest accounting summed over the quantized layers of the blocks (the head is reported apart)."""
        total = BitBreakdown()
        for name, qw in self.layers.items():
            if name != self.head:
                total = total + qw.storage()
        return total

    def head_storage(self) -> BitBreakdown | None:
        """Honest accounting of the quantized head, if there is one."""
        return None if self.head is None else self.layers[self.head].storage()


def quantize_model(model: nn.Module, arch: ArchSpec, quantizer: Quantizer, windows: torch.Tensor | None,
                   true_sequential: bool = False, progress: bool = True,
                   dtype: torch.dtype = torch.float32, head: Quantizer | None = None,
                   finetune: FinetuneConfig | None = None, state: RunState | None = None) -> QuantizationResult:
    """Quantize every linear in the blocks of `model` in place (weights replaced by their dequantized values),
    then the output head with `head` if given (`cmpq.head`; accounted apart, `result.head`).

    windows: calibration token ids (nsamples, seqlen), int64; None for methods that need no statistics.
    true_sequential: gather each group's statistics after the groups before it in the block are quantized
    (GPTQ's --true-sequential), at the cost of one forward pass per group.
    dtype: precision of the calibration forwards (`calibration.precision`); weights are quantized in float32.
    finetune: after each block is quantized, train the stored values of its lookup-quantized layers so that its
    outputs match the float block's (or the float model's states, `FinetuneConfig.target`; `cmpq.training.finetune`);
    needs calibration windows, and one more activation buffer (two for the model target).
    state: where finished steps are kept (`cmpq.resume`): the model-wide plan, each block's quantized layers and
    the head are saved as they finish, and those already there are taken instead of being computed again.
    """
    start = time.perf_counter()
    result = QuantizationResult(method=quantizer.name)
    blocks = arch.blocks(model)
    all_needs = quantizer.calibration_needs()
    needs = quantizer.needs() - set(GRADIENT_STATISTICS)  # gathered by hooks during the block-by-block pass
    head_needs = head.needs() if head is not None else frozenset()
    tune = enabled(finetune)
    result.finetune_config = finetune if tune else None
    feed = bool(needs or head_needs or tune)  # whether calibration activations flow through the blocks
    if (all_needs or head_needs) and windows is None:
        what = quantizer.name if all_needs else "the head's quantizer"
        raise ConfigError(f"{what} needs calibration statistics {sorted(all_needs or head_needs)}: pass "
                          f"calibration windows")
    if tune and windows is None:
        raise ConfigError("fine-tuning needs calibration windows")
    planned = _restore_plan(quantizer, state)
    if planned:  # the measuring pass is done: only what the quantizing pass itself reads is gathered
        all_needs = quantizer.needs()
    done = _finished_blocks(state, len(blocks))
    head_done = head is not None and state is not None and state.has("head")
    # calibration activations flow through the blocks while some block or the head still needs them
    feed = feed and (done < len(blocks) or (head_needs and not head_done))
    gradients: dict[str, dict[str, torch.Tensor]] = {}
    if all_needs & set(GRADIENT_STATISTICS) and done < len(blocks):  # one backward pass per window over the float model, first
        linears = {f"{arch.blocks_path}.{i}.{n}": m for i, b in enumerate(blocks)
                   for n, m in arch.block_linears(b).items()}
        gradients = gradient_statistics(model, linears, quantizer.gradient_windows(windows),
                                        all_needs & set(GRADIENT_STATISTICS), dtype, progress)
    if quantizer.measures_model() and not planned and done < len(blocks):
        _measure_model(model, arch, quantizer, windows, quantizer.measure_needs(), progress, dtype, gradients)
        plan = quantizer.plan_state()
        if state is not None and plan is not None:
            state.save("plan", plan)
    if not quantizer.needs() & set(GRADIENT_STATISTICS):
        gradients.clear()
    target = float_hidden = None
    if feed:
        inputs = capture_block_inputs(model, blocks[0], windows, dtype)
        hidden, spare = inputs.hidden, torch.empty_like(inputs.hidden)
        target = torch.empty_like(hidden) if tune else None  # what each fine-tuned block's outputs should match
        float_hidden = hidden.clone() if tune and finetune.target == "model" else None  # the float model's states
    try:
        bar = progress_bar(range(len(blocks)), desc=f"quantize [{quantizer.name}]", unit="block",
                           disable=not progress)
        for index in bar:
            adapt()
            block = blocks[index]
            linears = arch.block_linears(block)
            if index < done:  # finished by a run that was stopped: its layers in place, its outputs rebuilt
                _replay_block(state.load(f"block-{index}"), block, linears, f"{arch.blocks_path}.{index}.", result,
                              gradients, inputs if feed else None, float_hidden, target)
                if float_hidden is not None:
                    float_hidden, target = target, float_hidden
                if feed and (index + 1 < len(blocks) or head_needs):
                    run_block(block, inputs, hidden, spare)
                    hidden, spare = spare, hidden
                continue
            groups = arch.groups if true_sequential else (arch.linear_names,)
            if float_hidden is not None:
                run_block(block, inputs, float_hidden, target)
            elif tune and not needs:
                run_block(block, inputs, hidden, target)
            for number, group in enumerate(groups):
                # the float block's outputs on these inputs: the first pass still runs the float block
                out = target if tune and float_hidden is None and number == 0 else None
                stats = _gather(block, {n: linears[n] for n in group}, needs, inputs, hidden, out) if needs else {}
                for name in group:
                    bar.set_postfix_str(name)
                    linear = linears[name]
                    full_name = f"{arch.blocks_path}.{index}.{name}"
                    layer_stats = stats.get(name, LayerStats())
                    layer_stats.values.update(gradients.pop(full_name, {}))
                    try:
                        with stage("quantize layers"):
                            qw = quantizer.quantize(linear.weight.data, layer_stats, full_name)
                    except CmpqError as exc:  # say which layer: targets can be unreachable for one shape only
                        raise type(exc)(f"{full_name} {tuple(linear.weight.shape)}: {exc}") from exc
                    _install(linear, qw, full_name, result)
            if tune:
                _finetune(block, linears, index, f"{arch.blocks_path}.{index}.", result, inputs, hidden, target,
                          finetune, bar)
                if float_hidden is not None:  # the float states after this block feed the next one's target
                    float_hidden, target = target, float_hidden
            if state is not None:
                prefix = f"{arch.blocks_path}.{index}."
                state.save(f"block-{index}", {
                    "layers": {n: result.layers[prefix + n] for n in linears},
                    "finetune": result.finetune[-1] if tune else None})
            # Feed the next block. A method that reads no statistics gives the same weights whatever the inputs,
            # and the last block's outputs feed only the head's statistics: skip the passes nothing reads.
            if feed and (index + 1 < len(blocks) or head_needs):
                run_block(block, inputs, hidden, spare)
                hidden, spare = spare, hidden
        bar.close()
        if head_done:
            qw = check_weights({"head": state.load("head")["layer"]})["head"]
            name = install_head(model, qw)
            result.layers[name], result.head = qw, name
        elif head is not None:
            with stage("head"):
                name, qw = quantize_head(model, arch.final_modules(model), head, hidden if head_needs else None,
                                         dtype)
            result.layers[name], result.head = qw, name
            if state is not None:
                state.save("head", {"layer": qw})
    except BaseException:
        result.remove_hooks()  # a failed run leaves no activation quantizers on the model
        raise
    result.seconds = time.perf_counter() - start
    return result


def _install(linear: nn.Linear, qw: QuantizedWeight, full_name: str, result: QuantizationResult) -> None:
    """A quantized layer in the model (its dequantized weight, and its activation quantizer if it has one: later
    blocks are calibrated on the quantized activations, as they run) and in `result`."""
    with torch.no_grad():
        linear.weight.copy_(qw.dequantize().to(linear.weight.dtype))
    hook = qw.activation_hook()
    if hook is not None:
        result.hooks.append(linear.register_forward_pre_hook(hook))
    result.layers[full_name] = qw


def _restore_plan(quantizer: Quantizer, state: RunState | None) -> bool:
    """Take the model-wide plan of a stopped run, if it saved one; whether there was one."""
    if state is None or not quantizer.measures_model() or not state.has("plan"):
        return False
    quantizer.restore_plan(state.load("plan"))
    return True


def _finished_blocks(state: RunState | None, count: int) -> int:
    """How many blocks, from the first, a stopped run finished."""
    done = 0
    while state is not None and done < count and state.has(f"block-{done}"):
        done += 1
    return done


def _replay_block(saved: dict, block: nn.Module, linears: dict[str, nn.Linear], prefix: str,
                  result: QuantizationResult, gradients: dict, inputs, float_hidden: torch.Tensor | None,
                  target: torch.Tensor | None) -> None:
    """Put a block quantized by a stopped run back as that run left it: its layers in the model and `result`
    (activation hooks included) and its fine-tuning entry; with the model as fine-tuning target, the float
    block's outputs into `target` first, as the run computed them."""
    if float_hidden is not None and inputs is not None:
        run_block(block, inputs, float_hidden, target)
    for name, qw in check_weights(saved["layers"]).items():
        gradients.pop(prefix + name, None)
        _install(linears[name], qw, prefix + name, result)
    if saved.get("finetune") is not None:
        result.finetune.append(saved["finetune"])


def _finetune(block: nn.Module, linears: dict[str, nn.Linear], index: int, prefix: str, result: QuantizationResult,
              inputs, hidden: torch.Tensor, target: torch.Tensor, config: FinetuneConfig, bar) -> None:
    """Fine-tune the stored values of block `index`, whose layers are named `prefix` + name (`cmpq.training.finetune`),
    and put the kept ones in the model and `result`."""
    layers = {name: result.layers[prefix + name] for name in linears}
    bar.set_postfix_str("fine-tune")
    with stage("fine-tuning"):
        kept, before, after, improved = finetune_block(block, layers, inputs, hidden, target, config, seed=index)
    result.finetune.append({"block": index, "error_before": before, "error_after": after, "kept": improved})
    for name, qw in kept.items():
        result.layers[prefix + name] = qw
        with torch.no_grad():
            linears[name].weight.copy_(qw.dequantize().to(linears[name].weight.dtype))


def _gather(block: nn.Module, linears: dict[str, nn.Linear], needs: frozenset[str], inputs, hidden,
            out: torch.Tensor | None = None) -> dict[str, LayerStats]:
    """Statistics of `linears` over one pass of the windows through `block` (outputs into `out` if given;
    without `out` each window's forward stops once every linear has seen its input)."""
    recorder = StatsRecorder(linears, needs, stop_early=out is None)
    try:
        run_block(block, inputs, hidden, out, after_each=recorder.flush)
    finally:
        stats = recorder.close()
    return stats


def _measure_model(model: nn.Module, arch: ArchSpec, quantizer: Quantizer, windows: torch.Tensor,
                   needs: frozenset[str], progress: bool, dtype: torch.dtype,
                   gradients: dict[str, dict[str, torch.Tensor]]) -> None:
    """Show the quantizer every layer of the float model (one pass per block, float outputs passed on), then
    let it plan model-wide; the sequential quantization pass follows. `gradients`: statistics from the
    backward pass, by layer name."""
    blocks = arch.blocks(model)
    needs = needs - set(GRADIENT_STATISTICS)
    keep = bool(quantizer.needs() & set(GRADIENT_STATISTICS))  # else free each layer's gradients once measured
    take = gradients.get if keep else gradients.pop
    if not needs:  # everything comes from the backward pass: no forward needed
        for index, block in enumerate(blocks):
            for name, linear in arch.block_linears(block).items():
                full_name = f"{arch.blocks_path}.{index}.{name}"
                with stage("measure layers"):
                    quantizer.measure(full_name, linear.weight.data, LayerStats(values=dict(take(full_name, {}))))
        with stage("width allocation"):
            quantizer.plan()
        return
    inputs = capture_block_inputs(model, blocks[0], windows, dtype)
    hidden, spare = inputs.hidden, torch.empty_like(inputs.hidden)
    for index in progress_bar(range(len(blocks)), desc=f"measure [{quantizer.name}]", unit="block",
                              disable=not progress):
        adapt()
        linears = arch.block_linears(blocks[index])
        stats = _gather(blocks[index], linears, needs, inputs, hidden, out=spare)
        for name, linear in linears.items():
            full_name = f"{arch.blocks_path}.{index}.{name}"
            stats[name].values.update(take(full_name, {}))
            with stage("measure layers"):
                quantizer.measure(full_name, linear.weight.data, stats[name])
        hidden, spare = spare, hidden
    with stage("width allocation"):
        quantizer.plan()
