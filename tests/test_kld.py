import copy
import math

import pytest
import torch
import torch.nn.functional as F

from cmpq.errors import ConfigError, FormatError
from cmpq.eval import kld
from cmpq.eval.kld import KLDConfig, build_reference, kl_divergence, kld_against_float, load_reference, reference_path
from cmpq.models.tiny import TINY_VOCAB, tiny_model, tiny_tokenizer

SEQLEN = 32
CONFIG = KLDConfig(dataset="test", seqlen=SEQLEN, windows=3, dtype="float32")


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama", seed=0)


@pytest.fixture(scope="module")
def ids():
    generator = torch.Generator().manual_seed(1)
    return torch.randint(3, TINY_VOCAB, (1, 4 * SEQLEN + 5), generator=generator)


@pytest.fixture(scope="module")
def reference32(model, ids, tmp_path_factory):
    path = build_reference(model, ids, CONFIG, tmp_path_factory.mktemp("ref") / "ref.safetensors", "tiny",
                           progress=False)
    return load_reference(path, ids, CONFIG)


def perturbed(model, std=0.05):
    other = copy.deepcopy(model)
    with torch.no_grad():
        weight = other.model.layers[0].mlp.down_proj.weight
        weight.add_(torch.randn(weight.shape, generator=torch.Generator().manual_seed(2)) * std)
    return other


def test_self_kld_is_zero_with_float32_storage(model, reference32):
    result = kl_divergence(model, reference32, progress=False)
    assert result.windows == 3 and result.positions == 3 * (SEQLEN - 1)  # 4 windows available, 3 asked
    assert abs(result.mean_kld) < 1e-6 and abs(result.p99_kld) < 1e-6
    assert result.top1_agreement == 1.0
    assert result.ppl == pytest.approx(result.float_ppl, rel=1e-6)
    assert set(result.as_dict()) >= {"mean_kld", "p99_kld", "top1_agreement", "ppl", "float_ppl", "positions",
                                     "windows", "dataset", "dtype", "seconds"}


def test_perturbed_model_kld_matches_kl_div(model, ids, reference32):
    other = perturbed(model)
    result = kl_divergence(other, reference32, progress=False)
    assert result.mean_kld > 1e-4 and result.p99_kld >= result.mean_kld
    assert result.top1_agreement < 1.0
    per_position = []
    agree = 0
    with torch.no_grad():
        for w in range(3):
            x = ids[:, w * SEQLEN:(w + 1) * SEQLEN]
            p_logits = model(x).logits[0, :-1].double()
            q_logits = other(x).logits[0, :-1].double()
            logp, logq = F.log_softmax(p_logits, -1), F.log_softmax(q_logits, -1)
            per_position.append(F.kl_div(logq, logp, log_target=True, reduction="none").sum(-1))
            agree += int((p_logits.argmax(-1) == q_logits.argmax(-1)).sum())
    direct = torch.cat(per_position)
    assert result.mean_kld == pytest.approx(direct.mean().item(), abs=1e-5)
    assert result.p99_kld == pytest.approx(torch.quantile(direct, 0.99).item(), abs=1e-5)
    assert result.top1_agreement == agree / direct.numel()


def test_float16_storage_is_self_consistent(model, ids, tmp_path):
    config = KLDConfig(dataset="test", seqlen=SEQLEN, windows=3, dtype="float16")
    path = build_reference(model, ids, config, tmp_path / "ref16.safetensors", "tiny", progress=False)
    result16 = kl_divergence(model, load_reference(tmp_path / "ref16.safetensors", ids, config), progress=False)
    assert 0 <= result16.mean_kld < 1e-4 and result16.p99_kld < 1e-4
    assert result16.top1_agreement == 1.0
    assert result16.dtype == "float16"
    assert path.stat().st_size < 3 * (SEQLEN - 1) * TINY_VOCAB * 4  # half the float32 table, plus small tensors


def test_perplexities_match_direct_computation(model, ids, reference32):
    other = perturbed(model)
    result = kl_divergence(other, reference32, progress=False)

    def direct_ppl(m):
        nll = 0.0
        with torch.no_grad():
            for w in range(3):
                x = ids[:, w * SEQLEN:(w + 1) * SEQLEN]
                nll += F.cross_entropy(m(x).logits[0, :-1].double(), x[0, 1:], reduction="sum").item()
        return math.exp(nll / (3 * (SEQLEN - 1)))

    assert result.ppl == pytest.approx(direct_ppl(other), rel=1e-5)
    assert result.float_ppl == pytest.approx(direct_ppl(model), rel=1e-5)
    assert result.ppl != pytest.approx(result.float_ppl, rel=1e-4)


def test_reference_from_other_token_ids_is_rejected(ids, reference32):
    other_ids = ids.clone()
    other_ids[0, SEQLEN + 5] = (other_ids[0, SEQLEN + 5] + 1) % TINY_VOCAB
    with pytest.raises(FormatError, match="token ids") as info:
        load_reference(reference32.path, other_ids, CONFIG)
    assert str(reference32.path) in str(info.value) and "window 1, position 5" in str(info.value)


@pytest.mark.parametrize("field, value", [("seqlen", 16), ("windows", 2), ("dtype", "float16"), ("dataset", "c4")])
def test_reference_built_under_another_config_is_rejected(ids, reference32, field, value):
    config = KLDConfig(**{**CONFIG.__dict__, field: value})
    with pytest.raises(FormatError, match=field):
        load_reference(reference32.path, ids, config)


def test_truncated_or_corrupted_reference_is_rejected(ids, reference32, tmp_path):
    data = reference32.path.read_bytes()
    for name, content in [("cut.safetensors", data[:-100]), ("header.safetensors", data[:50]),
                          ("empty.safetensors", b""), ("flipped.safetensors",
                                                       data[:-1000] + bytes([data[-1000] ^ 1]) + data[-999:])]:
        path = tmp_path / name
        path.write_bytes(content)
        with pytest.raises(FormatError) as info:
            load_reference(path, ids, CONFIG)
        assert str(path) in str(info.value), name


def test_reference_is_a_plain_safetensors_file(reference32):
    from safetensors import safe_open

    with safe_open(str(reference32.path), framework="pt") as handle:
        assert handle.metadata()["model_id"] == "tiny"
        assert handle.metadata()["vocab"] == str(TINY_VOCAB)
        assert handle.get_tensor("logprobs").shape == (3 * (SEQLEN - 1), TINY_VOCAB)
        assert torch.equal(handle.get_tensor("token_ids"), reference32.token_ids)
        logp = handle.get_tensor("logprobs")
    assert torch.allclose(logp.exp().sum(-1), torch.ones(logp.shape[0]), atol=1e-5)


class FailsOnSecondWindow(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model, self.calls = model, 0

    def forward(self, *args, **kwargs):
        self.calls += 1
        if self.calls == 2:
            raise RuntimeError("boom")
        return self.model(*args, **kwargs)


def test_failed_write_leaves_no_file(model, ids, reference32, tmp_path, monkeypatch):
    path = tmp_path / "ref.safetensors"
    with pytest.raises(RuntimeError, match="boom"):  # fails after the header and one window were written
        build_reference(FailsOnSecondWindow(model), ids, CONFIG, path, "tiny", progress=False)
    assert list(tmp_path.iterdir()) == []

    def broken(handle, *args, **kwargs):
        handle.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(kld, "_write_reference", broken)
    path.write_bytes(reference32.path.read_bytes())  # an existing good reference survives a failed rebuild
    with pytest.raises(OSError, match="disk full"):
        build_reference(model, ids, CONFIG, path, "tiny", progress=False)
    assert [p.name for p in tmp_path.iterdir()] == ["ref.safetensors"]
    assert path.read_bytes() == reference32.path.read_bytes()


def test_kld_against_float_builds_once_then_reuses(model, tmp_path):
    text = tmp_path / "text.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 6, encoding="utf-8")
    config = KLDConfig(dataset=str(text), seqlen=SEQLEN, windows=2, dtype="float32")
    cache = tmp_path / "cache"
    calls = []

    def loader():
        calls.append(1)
        return model

    tokenizer = tiny_tokenizer()
    first = kld_against_float(perturbed(model), tokenizer, "org/tiny model", loader, config, cache_dir=cache,
                              progress=False)
    assert len(calls) == 1
    path = reference_path("org/tiny model", config, cache)
    assert path.is_file() and path.parent == cache and " " not in path.name
    assert first.windows == 2 and first.mean_kld > 0
    second = kld_against_float(perturbed(model), tokenizer, "org/tiny model", loader, config, cache_dir=cache,
                               progress=False)
    assert len(calls) == 1  # reused, not rebuilt
    assert second.mean_kld == first.mean_kld and second.ppl == first.ppl
    with pytest.raises(FormatError, match="model_id"):  # a reference of another model under the same name
        load_reference(path, tokenizer(text.read_text(), return_tensors="pt").input_ids, config, model_id="other")


def test_reference_path_and_config(tmp_path, monkeypatch):
    monkeypatch.setenv("CMPQ_CACHE_DIR", str(tmp_path))
    path = reference_path("smollm2-135m", KLDConfig())
    assert path == tmp_path / "kld" / "smollm2-135m__wikitext2__s2048_w4_float16.safetensors"
    assert reference_path("a/b", KLDConfig()) != reference_path("a_b", KLDConfig())
    assert reference_path("m", KLDConfig(windows=8)) != reference_path("m", KLDConfig())
    monkeypatch.delenv("CMPQ_CACHE_DIR")
    assert reference_path("m", KLDConfig()).parent.parts[-3:] == (".cache", "cmpq", "kld")
    for field, value in [("dtype", "bfloat16"), ("windows", 0), ("seqlen", 1), ("dataset", "")]:
        with pytest.raises(ConfigError, match=f"kld.{field}"):
            KLDConfig(**{field: value})
