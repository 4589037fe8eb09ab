"""The streaming engine: block-0 capture, statistics hooks, sequential propagation, every family."""

from dataclasses import dataclass

import pytest
import torch

from cmpq.calibration.capture import capture_block_inputs, run_block
from cmpq.calibration.precision import native_bfloat16, resolve_dtype
from cmpq.calibration.stats import LayerStats, StatsRecorder
from cmpq.config import CalibConfig
from cmpq.errors import ConfigError
from cmpq.models.arch import find_arch
from cmpq.models.tiny import TINY_VOCAB, tiny_model
from cmpq.pipeline import quantize_model
from cmpq.quantizers import BitBreakdown, QuantizedWeight, Quantizer, get_quantizer
from cmpq.quantizers.rtn import quantize_uniform


@dataclass(frozen=True)
class _Cfg:
    bits: int = 2


@dataclass
class Unchanged(QuantizedWeight):
    weight: torch.Tensor

    def dequantize(self):
        return self.weight.clone()

    def storage(self):
        return BitBreakdown(weights=self.weight.numel(), codes=32 * self.weight.numel())

    def column_widths(self):
        return torch.full((self.weight.shape[1],), 32)


class RecordingRTN(Quantizer):
    """Test method: asks for statistics, records what it receives, rounds like RTN (or not at all)."""

    name = "recording"
    Config = _Cfg

    def __init__(self, config=None, needs=("col_sq_sum", "hessian"), identity=False):
        super().__init__(config)
        self._needs = frozenset(needs)
        self.identity = identity
        self.seen: list[LayerStats] = []

    def needs(self):
        return self._needs

    def quantize(self, weight, stats, name="") -> QuantizedWeight:
        self.seen.append(stats)
        return Unchanged(weight.clone()) if self.identity else quantize_uniform(weight, self.config.bits, None)


def windows(n=3, seqlen=24, seed=0):
    return torch.randint(3, TINY_VOCAB, (n, seqlen), generator=torch.Generator().manual_seed(seed))


def test_capture_returns_the_embedding_output(tiny_llama):
    calib = windows()
    arch = find_arch(tiny_llama)
    inputs = capture_block_inputs(tiny_llama, arch.blocks(tiny_llama)[0], calib)
    with torch.no_grad():
        expected = tiny_llama(calib, output_hidden_states=True).hidden_states[0]
    torch.testing.assert_close(inputs.hidden, expected)


def test_stats_recorder_matches_direct_computation(tiny_llama):
    arch = find_arch(tiny_llama)
    block = arch.blocks(tiny_llama)[0]
    linears = arch.block_linears(block)
    seen = {}
    hooks = [lin.register_forward_hook(lambda m, i, o, n=n: seen.setdefault(n, []).append(i[0].detach().clone()))
             for n, lin in linears.items()]
    recorder = StatsRecorder(linears, frozenset({"col_sq_sum", "hessian"}))
    calib = windows()
    inputs = capture_block_inputs(tiny_llama, block, calib)
    with torch.no_grad():
        for i in range(calib.shape[0]):
            block(inputs.hidden[i:i + 1], *inputs.args, **inputs.kwargs)
            recorder.flush()
    stats = recorder.close()
    for h in hooks:
        h.remove()
    for name, xs in seen.items():
        x = torch.cat([t.reshape(-1, t.shape[-1]) for t in xs]).double()
        assert stats[name].tokens == x.shape[0]
        torch.testing.assert_close(stats[name]["col_sq_sum"], (x**2).sum(0), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(stats[name]["hessian"], x.T @ x, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(stats["self_attn.q_proj"]["hessian"], stats["self_attn.v_proj"]["hessian"])
    with pytest.raises(KeyError, match="col_abs_sum.*not collected"):
        stats["self_attn.q_proj"]["col_abs_sum"]


def _block_stats(model, needs, dtype=torch.float32, stop_early=False):
    arch = find_arch(model)
    block = arch.blocks(model)[0]
    inputs = capture_block_inputs(model, block, windows(), dtype)
    recorder = StatsRecorder(arch.block_linears(block), needs, stop_early=stop_early)
    run_block(block, inputs, inputs.hidden, None, after_each=recorder.flush)
    return recorder.close()


def test_stopping_early_gives_the_same_statistics(tiny_llama):
    """The stats pass may end each forward once every linear has its input; nothing it records changes."""
    needs = frozenset({"col_sq_sum", "hessian"})
    full, early = _block_stats(tiny_llama, needs), _block_stats(tiny_llama, needs, stop_early=True)
    for name in full:
        assert early[name].tokens == full[name].tokens > 0
        for stat in needs:
            torch.testing.assert_close(early[name][stat], full[name][stat])


def test_bfloat16_calibration_stays_close_to_float32(tiny_llama):
    """bfloat16 forwards: statistics within bfloat16 rounding of the float32 ones, Hessians still PSD (their
    products run in float32: summed bfloat16 products are not PSD)."""
    needs = frozenset({"col_sq_sum", "hessian"})
    ref, low = _block_stats(tiny_llama, needs), _block_stats(tiny_llama, needs, dtype=torch.bfloat16)
    assert not torch.equal(low["mlp.down_proj"]["hessian"], ref["mlp.down_proj"]["hessian"])  # bf16 was used
    for name in ref:
        for stat in needs:
            scale = ref[name][stat].abs().max()
            assert (low[name][stat] - ref[name][stat]).abs().max() <= 0.05 * scale, (name, stat)
        assert torch.linalg.eigvalsh(low[name]["hessian"])[0] >= -1e-6 * low[name]["hessian"].diag().max()


def test_a_stopped_forward_whose_outputs_are_needed_is_an_error(tiny_llama):
    arch = find_arch(tiny_llama)
    block = arch.blocks(tiny_llama)[0]
    inputs = capture_block_inputs(tiny_llama, block, windows())
    recorder = StatsRecorder(arch.block_linears(block), frozenset({"col_sq_sum"}), stop_early=True)
    with pytest.raises(RuntimeError, match="outputs are needed"):
        run_block(block, inputs, inputs.hidden, torch.empty_like(inputs.hidden), after_each=recorder.flush)
    recorder.close()


def test_calibration_dtype_is_validated_and_resolved():
    with pytest.raises(ConfigError, match="calib.dtype"):
        CalibConfig(dtype="float16")
    assert resolve_dtype("float32") == torch.float32
    assert resolve_dtype("bfloat16") == torch.bfloat16
    assert resolve_dtype("auto") == (torch.bfloat16 if native_bfloat16() else torch.float32)


def test_identity_quantizer_leaves_every_family_unchanged(family):
    model = tiny_model(family)
    calib = windows()
    with torch.no_grad():
        before = model(calib).logits
    quantizer = RecordingRTN(identity=True)
    result = quantize_model(model, find_arch(model), quantizer, calib, progress=False)
    with torch.no_grad():
        after = model(calib).logits
    arch = find_arch(model)
    assert len(result.layers) == len(arch.blocks(model)) * len(arch.linear_names)
    assert torch.equal(before, after)
    assert result.storage().bpw == 32
    assert all(s.tokens == calib.numel() for s in quantizer.seen)


def test_rtn_through_the_engine_equals_rtn_of_each_weight(tiny_llama):
    originals = {n: m.weight.detach().clone() for n, m in tiny_llama.named_modules() if isinstance(m, torch.nn.Linear)}
    result = quantize_model(tiny_llama, find_arch(tiny_llama), get_quantizer("rtn", bits=3, group_size=16), None,
                            progress=False)
    for name, qw in result.layers.items():
        expected = quantize_uniform(originals[name], 3, 16).dequantize()
        assert torch.equal(dict(tiny_llama.named_modules())[name].weight, expected)
        assert torch.equal(qw.dequantize(), expected)
    assert "lm_head" not in result.layers and torch.equal(tiny_llama.lm_head.weight, originals["lm_head"])


def _manual_hessian(model, block_index, linear_name, calib):
    arch = find_arch(model)
    linear = arch.block_linears(arch.blocks(model)[block_index])[linear_name]
    acc = []
    handle = linear.register_forward_hook(lambda m, i, o: acc.append(i[0].reshape(-1, i[0].shape[-1]).double()))
    with torch.no_grad():
        for i in range(calib.shape[0]):
            model(calib[i:i + 1])
    handle.remove()
    x = torch.cat(acc)
    return x.T @ x


def test_statistics_of_a_block_see_the_quantized_blocks_before_it():
    calib = windows()
    model = tiny_model("llama")
    reference = tiny_model("llama")
    quantizer = RecordingRTN()
    quantize_model(model, find_arch(model), quantizer, calib, progress=False)
    # Reproduce by hand: quantize block 0 of a fresh copy, then measure block 1's q_proj input.
    arch = find_arch(reference)
    for lin in arch.block_linears(arch.blocks(reference)[0]).values():
        with torch.no_grad():
            lin.weight.copy_(quantize_uniform(lin.weight, 2, None).dequantize())
    expected = _manual_hessian(reference, 1, "self_attn.q_proj", calib)
    got = quantizer.seen[len(arch.linear_names)]["hessian"]  # first layer of block 1
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    float_h = _manual_hessian(tiny_model("llama"), 1, "self_attn.q_proj", calib)
    assert not torch.allclose(got, float_h, rtol=1e-3, atol=1e-3)  # the test can tell the two apart


def test_true_sequential_sees_earlier_groups_quantized():
    calib = windows()
    model = tiny_model("llama")
    quantizer = RecordingRTN()
    quantize_model(model, find_arch(model), quantizer, calib, true_sequential=True, progress=False)
    reference = tiny_model("llama")
    arch = find_arch(reference)
    linears = arch.block_linears(arch.blocks(reference)[0])
    for name in arch.groups[0]:  # q, k, v quantized; o_proj's input must reflect that
        with torch.no_grad():
            linears[name].weight.copy_(quantize_uniform(linears[name].weight, 2, None).dequantize())
    expected = _manual_hessian(reference, 0, "self_attn.o_proj", calib)
    torch.testing.assert_close(quantizer.seen[3]["hessian"], expected, rtol=1e-4, atol=1e-4)
