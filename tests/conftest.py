"""Shared fixtures: tiny seeded models built in code, and the real model for tests marked `real_model`."""

from __future__ import annotations

import pytest
import torch

from cmpq.models.tiny import tiny_model


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _exact_tables(monkeypatch) -> None:
    """Tests compare kernels with the reference to float tolerance, so one-token calls keep the exact float
    tables; the tests of the int8 tables (the default where the CPU has them) choose them, or auto, explicitly."""
    monkeypatch.setenv("CMPQ_TABLES", "float")


@pytest.fixture(params=["llama", "mistral", "qwen2", "opt"])
def family(request) -> str:
    return request.param


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """A tiny llama saved as a Hugging Face directory (config, weights, tokenizer)."""
    from cmpq.models.tiny import save_tiny

    return save_tiny(tmp_path_factory.mktemp("tiny") / "tiny-llama", "llama")


@pytest.fixture
def tiny_llama():
    return tiny_model("llama", seed=0)


@pytest.fixture(scope="session")
def smollm2():
    from cmpq.models import load_model

    return load_model("smollm2-135m")
