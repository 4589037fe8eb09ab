"""Architectures as data: where the transformer blocks live and in what order their linears are quantized.

Adding a family means adding one `ArchSpec` row, never a copy of the quantization loop (GPTQModel's
`module_tree` idea). The `groups` order is GPTQ's "true sequential" order: a group is quantized after the
groups before it, and with `true_sequential` its statistics are gathered with those already quantized.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn as nn

from cmpq.errors import UnsupportedArchitectureError


@dataclass(frozen=True)
class ArchSpec:
    """Where a family keeps its blocks and which linear layers each block holds."""

    name: str
    model_types: tuple[str, ...]          # values of `config.model_type` this spec covers
    blocks_path: str                      # dotted attribute path from the *ForCausalLM model to the ModuleList
    groups: tuple[tuple[str, ...], ...]   # linear layer names inside a block, in quantization order
    final: tuple[str, ...] = ()           # modules between the last block and the output head (absent: skipped)

    @property
    def linear_names(self) -> tuple[str, ...]:
        return tuple(name for group in self.groups for name in group)

    def blocks(self, model: nn.Module) -> nn.ModuleList:
        """The ModuleList of transformer blocks of `model`."""
        module: nn.Module = model
        for attr in self.blocks_path.split("."):
            module = getattr(module, attr)
        return module  # type: ignore[return-value]

    def final_modules(self, model: nn.Module) -> list[nn.Module]:
        """The modules that turn the last block's output into the head's input (final norm, projection)."""
        modules = []
        for path in self.final:
            module: nn.Module | None = model
            for attr in path.split("."):
                module = getattr(module, attr, None)
            if module is not None:
                modules.append(module)
        return modules

    def block_linears(self, block: nn.Module) -> dict[str, nn.Linear]:
        """Name -> nn.Linear for one block, checking the table matches the block exactly.

        A linear that the table does not list would silently stay in float and falsify the accounting, so
        both a missing and an unlisted linear are errors.
        """
        found = {name: mod for name, mod in block.named_modules() if isinstance(mod, nn.Linear)}
        missing = [n for n in self.linear_names if n not in found]
        extra = [n for n in found if n not in self.linear_names]
        if missing or extra:
            raise UnsupportedArchitectureError(
                f"block layout does not match the '{self.name}' spec: missing {missing}, unlisted {extra}")
        return {name: found[name] for name in self.linear_names}


_ATTN_QKV = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")

ARCHITECTURES: tuple[ArchSpec, ...] = (
    ArchSpec(
        name="llama",
        model_types=("llama", "mistral", "qwen2"),
        blocks_path="model.layers",
        groups=(_ATTN_QKV, ("self_attn.o_proj",), ("mlp.gate_proj", "mlp.up_proj"), ("mlp.down_proj",)),
        final=("model.norm",),
    ),
    ArchSpec(
        name="opt",
        model_types=("opt",),
        blocks_path="model.decoder.layers",
        groups=(_ATTN_QKV, ("self_attn.out_proj",), ("fc1",), ("fc2",)),
        final=("model.decoder.final_layer_norm", "model.decoder.project_out"),
    ),
)


def supported_model_types() -> list[str]:
    return sorted(t for spec in ARCHITECTURES for t in spec.model_types)


def find_arch(model_or_type: nn.Module | str) -> ArchSpec:
    """The ArchSpec for a model (or a `config.model_type` string); a clear error for anything else."""
    if isinstance(model_or_type, str):
        model_type = model_or_type
    else:
        config = getattr(model_or_type, "config", None)
        model_type = getattr(config, "model_type", type(model_or_type).__name__)
    for spec in ARCHITECTURES:
        if model_type in spec.model_types:
            return spec
    raise UnsupportedArchitectureError(
        f"unsupported architecture '{model_type}'; supported model types: {', '.join(supported_model_types())}")
