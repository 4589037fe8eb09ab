"""Tiny randomly initialised models built in code, for tests: they check mechanics, never quality.

Each family gets odd-ish sizes (not multiples of 64) so shape bugs surface, and a seeded initialisation so
every run sees the same weights.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

TINY_FAMILIES = ("llama", "mistral", "qwen2", "opt")
TINY_VOCAB = 256 + 3  # one token per byte plus bos/eos/unk


def tiny_config(family: str, vocab_size: int = TINY_VOCAB, blocks: int = 2):
    """A small transformers config of `family` (`blocks` blocks, hidden 48, MLP 80)."""
    import transformers as tf

    common = dict(vocab_size=vocab_size, hidden_size=48, num_hidden_layers=blocks, num_attention_heads=4,
                  max_position_embeddings=2048, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    if family == "llama":
        return tf.LlamaConfig(intermediate_size=80, num_key_value_heads=2, tie_word_embeddings=True, **common)
    if family == "mistral":
        return tf.MistralConfig(intermediate_size=80, num_key_value_heads=2, **common)
    if family == "qwen2":
        return tf.Qwen2Config(intermediate_size=80, num_key_value_heads=2, **common)
    if family == "opt":
        common.pop("max_position_embeddings")
        return tf.OPTConfig(ffn_dim=80, word_embed_proj_dim=48, max_position_embeddings=2048, **common)
    raise ValueError(f"no tiny config for '{family}'; choose from {TINY_FAMILIES}")


def tiny_model(family: str = "llama", seed: int = 0, blocks: int = 2) -> nn.Module:
    """A seeded, randomly initialised causal LM of `family` in float32 eval mode."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = tiny_config(family, blocks=blocks)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # HF's init is tiny (std 0.02); widen it so quantization error is visible in outputs
        for module in model.modules():
            if isinstance(module, nn.Linear):
                module.weight.normal_(0.0, 0.2)
    model.eval()
    model.config.use_cache = False
    return model


def tiny_tokenizer():
    """A byte-level tokenizer (one token per byte) that needs no files and no network."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    byte_chars = pre_tokenizers.ByteLevel.alphabet()
    vocab = {"<s>": 0, "</s>": 1, "<unk>": 2}
    for char in sorted(byte_chars):
        vocab[char] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="</s>")


def save_tiny(directory: str | Path, family: str = "llama", seed: int = 0, blocks: int = 2) -> Path:
    """Write a tiny model and its tokenizer as a Hugging Face directory (for CLI and loader tests)."""
    directory = Path(directory)
    tiny_model(family, seed, blocks).save_pretrained(directory)
    tiny_tokenizer().save_pretrained(directory)
    return directory
