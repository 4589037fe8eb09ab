import math

import pytest
import torch
import torch.nn.functional as F

from cmpq.config import EvalConfig
from cmpq.errors import ConfigError
from cmpq.eval.perplexity import window_nll


def test_window_nll_matches_a_direct_computation(tiny_llama):
    ids = torch.randint(3, 200, (1, 5 * 32 + 7))
    nll, windows, tokens = window_nll(tiny_llama, ids, seqlen=32, progress=False)
    assert windows == 5 and tokens == 5 * 31  # the remainder of 7 tokens is dropped
    expected = 0.0
    with torch.no_grad():
        for w in range(5):
            x = ids[:, w * 32:(w + 1) * 32]
            logp = F.log_softmax(tiny_llama(x).logits[0].double(), -1)
            expected -= logp[:-1].gather(1, x[0, 1:, None]).sum().item()
    assert nll == pytest.approx(expected, rel=1e-5)
    assert math.exp(nll / tokens) > 1


def test_quick_protocol_limits_windows(tiny_llama):
    ids = torch.randint(3, 200, (1, 40 * 16))
    _, windows, _ = window_nll(tiny_llama, ids, 16, EvalConfig(seqlen=16, quick_windows=3).max_windows, progress=False)
    assert windows == 3
    assert EvalConfig(protocol="full").max_windows is None


def test_eval_config_validates():
    with pytest.raises(ConfigError, match="eval.protocol"):
        EvalConfig(protocol="fast")
    with pytest.raises(ConfigError, match="eval.datasets"):
        EvalConfig(datasets=("ptb",))
