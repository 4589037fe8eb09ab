"""`LoadedModel`: what loading any model gives (float or saved quantized), shared by the loaders of both so
that neither imports the other for it."""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn as nn

from cmpq.models.arch import ArchSpec


@dataclass
class LoadedModel:
    """A causal LM in eval mode with its tokenizer and architecture table."""

    model: nn.Module
    tokenizer: object
    arch: ArchSpec
    spec: str          # what the user asked for
    source: str        # the file, directory or hub id it was loaded from
    engine: object | None = None  # a `cmpq.engine` Engine that runs this model natively, or None (PyTorch)
