"""Save a quantized model as a Hugging Face style directory, and load it back (`cmpq.load`).

The directory holds `config.json` (the model's config with a `quantization_config`: method, options, target
and honest bpw, format version, the list of quantized layers and the SHA-256 of the weights file), the
tokenizer files, and `model.safetensors`: every unquantized tensor as it was in the model, and per quantized
layer the packed tensors of its format (`cmpq.formats`, docs/format.md). It is written into a temporary directory next to the target and
renamed into place, so an interrupted save never leaves a half-written model under the target name.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from cmpq.atomic import ordinary_mode
from cmpq.config import config_to_dict
from cmpq.errors import CmpqError, FormatError, ModelNotFoundError
from cmpq.formats import SAVEABLE_METHODS, for_weight
from cmpq.head import describe_head
from cmpq.models.arch import find_arch
from cmpq.models.loaded import LoadedModel
from cmpq.packed.hf import FORMAT_VERSION, QUANT_METHOD, CmpqHfConfig, check_config
from cmpq.pipeline import QuantizationResult
from cmpq.quantizers.base import Quantizer

WEIGHTS = "model.safetensors"


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync_tree(directory: Path, files: bool = True) -> None:
    """Flush the files of `directory` (and the directory entry itself) to disk before it is renamed."""
    paths = [p for p in directory.iterdir() if p.is_file()] if files else []
    for path in paths:
        with open(path, "rb") as handle:
            os.fsync(handle.fileno())
    handle = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


def check_saveable(method: str) -> None:
    """Fail before any long work when `--out` is asked of a method the packed format cannot store."""
    if method not in SAVEABLE_METHODS:
        raise CmpqError(f"--out: the packed format stores {', '.join(SAVEABLE_METHODS)} layers; {method} models "
                        f"are evaluated in memory only (drop --out)")


def check_target(directory: Path, overwrite: bool) -> None:
    """Fail before any long work if the target exists (without `overwrite`) or its parent is not writable."""
    directory = Path(directory)
    if directory.exists() and not overwrite:
        raise CmpqError(f"{directory} exists; pass --overwrite to replace it")
    parent = directory.resolve().parent
    parent.mkdir(parents=True, exist_ok=True)
    if not os.access(parent, os.W_OK):
        raise CmpqError(f"cannot write into {parent}")


def packed_state(loaded: LoadedModel, result: QuantizationResult) -> dict[str, torch.Tensor]:
    """Every tensor to store: unquantized ones as they are (a tied copy once), quantized layers packed."""
    state: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, tensor in loaded.model.state_dict().items():
        module, _, leaf = name.rpartition(".")
        if module in result.layers and leaf == "weight":
            continue
        if tensor.data_ptr() in seen:  # tied weights (lm_head = embeddings): transformers re-ties on load
            continue
        seen.add(tensor.data_ptr())
        state[name] = tensor.detach().contiguous()
    for name, qw in result.layers.items():
        try:
            packed = for_weight(qw).pack(qw)
        except FormatError as exc:
            raise CmpqError(f"saving {result.method} layers: {exc}") from None
        for tensor_name, tensor in packed.items():
            state[f"{name}.{tensor_name}"] = tensor
    return state


def _head_entry(result: QuantizationResult, head: Quantizer | None) -> dict[str, Any] | None:
    if result.head is None:
        return None
    if head is None:
        raise CmpqError("the result holds a quantized head: pass its quantizer to save_quantized(head=...)")
    return describe_head(result.head, result.layers[result.head], head)


def _finetune_entry(result: QuantizationResult) -> dict | None:
    """How the stored values were fine-tuned (`cmpq.training.finetune`), or None."""
    if result.finetune_config is None:
        return None
    return {**config_to_dict(result.finetune_config), "blocks_kept": sum(b["kept"] for b in result.finetune)}


def _distill_entry(result: QuantizationResult) -> dict | None:
    """How the stored values were distilled end to end (`cmpq.training.distill`), or None."""
    if result.distill is None:
        return None
    keys = ("epochs", "lr", "topk", "holdout", "tokens", "train_windows", "held_out_windows", "epoch_kept",
            "diverged_at_epoch")
    return {**{key: result.distill[key] for key in keys if key in result.distill},
            "held_out_kl_kept": result.distill["held_out_kl"][result.distill["epoch_kept"]]}


def save_quantized(loaded: LoadedModel, result: QuantizationResult, quantizer: Quantizer, directory: Path,
                   overwrite: bool = False, head: Quantizer | None = None) -> Path:
    """Write the quantized model to `directory` atomically; returns the directory. `head`: the quantizer of
    the output head when `result` holds one (`--quantize-head`)."""
    directory = Path(directory)
    check_target(directory, overwrite)
    storage = result.storage()
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.partial-", dir=directory.resolve().parent))
    try:
        save_file(packed_state(loaded, result), str(tmp / WEIGHTS), metadata={"format": "pt"})
        config = copy.deepcopy(loaded.model.config)
        config.use_cache = True  # off while quantizing (load_model); generation with the saved model wants it
        config.quantization_config = CmpqHfConfig(
            method=result.method, config=json.loads(json.dumps(config_to_dict(quantizer.config))),
            target_bits=quantizer.target_bits(), bpw=storage.bpw, layers=sorted(result.layers),
            checksum=sha256(tmp / WEIGHTS), head=_head_entry(result, head), base_model=loaded.spec,
            finetune=_finetune_entry(result), distill=_distill_entry(result),
            calibration=result.calibration).to_dict()
        config.dtype = str(next(loaded.model.parameters()).dtype).removeprefix("torch.")
        config.save_pretrained(tmp)
        if loaded.tokenizer is not None:
            loaded.tokenizer.save_pretrained(tmp)
        for path in tmp.rglob("*"):
            os.chmod(path, ordinary_mode(path.is_dir()))
        os.chmod(tmp, ordinary_mode(directory=True))
        _fsync_tree(tmp)
        if directory.exists():
            old = directory.with_name(f".{directory.name}.old-{os.getpid()}")
            directory.rename(old)
            try:
                tmp.rename(directory)
            except BaseException:
                old.rename(directory)  # put the previous model back
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(directory)
        _fsync_tree(directory.resolve().parent, files=False)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return directory


def read_quantization_config(directory: Path) -> dict[str, Any]:
    """The `quantization_config` of a saved model, checked for method and format version."""
    path = Path(directory) / "config.json"
    if not path.is_file():
        raise ModelNotFoundError(f"{directory}: no config.json; is this a directory saved by cmpq?")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise FormatError(f"{path}: not valid JSON ({exc})") from None
    quant = config.get("quantization_config")
    if not isinstance(quant, dict):
        raise FormatError(f"{path}: no quantization_config; not a quantized model")
    check_config(CmpqHfConfig(**quant), str(path))
    return quant


def load(directory: str | Path, verify: bool = True, engine: str = "native") -> LoadedModel:
    """A model saved by `save_quantized`, with `CMPQLinear` layers, its tokenizer and architecture table.
    With `verify`, the weights file's SHA-256 is checked first (any corruption is a clear error). With `engine`
    "native", `loaded.engine` runs it natively where the engine covers it (`cmpq.engine`; `cmpq.generate.generate`
    uses it), else None (the PyTorch path); "torch" leaves it None."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory = Path(directory)
    quant = read_quantization_config(directory)
    weights = directory / WEIGHTS
    if not weights.is_file():
        raise FormatError(f"{weights}: missing")
    if verify and quant.get("checksum") and sha256(weights) != quant["checksum"]:
        raise FormatError(f"{weights}: checksum mismatch: the file is truncated, corrupted or was modified")
    try:
        model = AutoModelForCausalLM.from_pretrained(str(directory))
    except (FormatError, ModelNotFoundError):
        raise
    except Exception as exc:  # safetensors / transformers errors on a damaged file
        raise FormatError(f"{weights}: cannot be loaded ({type(exc).__name__}: {exc})") from None
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(str(directory)) if (directory / "tokenizer_config.json").exists() \
        else None
    loaded = LoadedModel(model=model, tokenizer=tokenizer, arch=find_arch(model), spec=str(directory),
                         source=str(directory))
    if engine == "torch":
        route = getattr(model, "_cmpq_route", None)
        if route is not None:
            route.enabled = False  # transformers' generate on this model stays on the PyTorch path too
    else:
        from cmpq.engine import attach

        attach(loaded, engine, quiet=True)
    return loaded


__all__ = ["FORMAT_VERSION", "QUANT_METHOD", "load", "save_quantized"]
