import pytest
import torch.nn as nn

from cmpq.errors import UnsupportedArchitectureError
from cmpq.models.arch import find_arch
from cmpq.models.tiny import tiny_model


def test_every_tiny_family_has_a_spec_matching_its_blocks(family):
    model = tiny_model(family)
    arch = find_arch(model)
    blocks = arch.blocks(model)
    assert len(blocks) == model.config.num_hidden_layers
    linears = arch.block_linears(blocks[0])
    assert list(linears) == list(arch.linear_names)
    assert all(isinstance(m, nn.Linear) for m in linears.values())


def test_unsupported_architecture_names_the_supported_ones():
    with pytest.raises(UnsupportedArchitectureError, match="gpt2.*llama.*opt"):
        find_arch("gpt2")


def test_unlisted_linear_in_a_block_is_an_error():
    model = tiny_model("llama")
    arch = find_arch(model)
    block = arch.blocks(model)[0]
    block.mlp.extra_proj = nn.Linear(4, 4)
    with pytest.raises(UnsupportedArchitectureError, match="mlp.extra_proj"):
        arch.block_linears(block)
