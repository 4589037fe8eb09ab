"""KL divergence of a quantized model from the float model, like llama.cpp's `--kl-divergence`.

The float model's log-probabilities over the full vocabulary are computed once for the first N evaluation windows
(the same non-overlapping `seqlen` windows as perplexity.py) and stored in a reference file that is reused across
runs. Any quantized model is then compared with it, per predicted position (logits at 0..seqlen-2 predict tokens
1..seqlen-1):

- KL(P_float || Q_quant) = sum_v p_v (log p_v - log q_v): its mean and 99th percentile;
- top-1 agreement: the share of positions where both models' most likely next token is the same;
- the quantized model's perplexity on the same positions (and the float model's, from the reference).

The reference is a safetensors file (`logprobs` (positions, vocab) in float16 | float32, `top1` (positions,)
int64, `token_ids` (windows, seqlen) int64, and string metadata). It is written window by window (never holding
the whole table in memory) to a temporary file in the same directory that is moved into place only when
complete, and carries a sha256 of its data, so a truncated or corrupted file is a `FormatError`, never a silently
wrong number.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import BinaryIO, Callable

import torch
import torch.nn as nn

from cmpq.atomic import atomic_write
from cmpq.config import check
from cmpq.data.sampling import eval_token_ids
from cmpq.errors import CmpqError, FormatError
from cmpq.progress import bar

logger = logging.getLogger(__name__)

FORMAT = "cmpq-kld-reference"
FORMAT_VERSION = "1"
CACHE_DIR_ENV = "CMPQ_CACHE_DIR"
KLD_DTYPES = ("float16", "float32")
_TORCH_DTYPES = {"float16": torch.float16, "float32": torch.float32}
_ST_DTYPES = {"float16": "F16", "float32": "F32"}
_ROWS = 256  # positions processed at a time: bounds the float32 temporaries to rows x vocab
_HASH_CHUNK = 1 << 24
_EMPTY_DIGEST = "0" * 64  # placeholder of the same length as a sha256 hex digest, overwritten when the data is done


@dataclass(frozen=True)
class KLDConfig:
    """Which positions the KL divergence is measured on, and how the float reference is stored.

    `windows` is the number of leading evaluation windows (fewer if the text is shorter). The default is small on
    purpose: the reference holds full-vocabulary log-probabilities, windows x (seqlen - 1) x vocab values, so 4
    windows of 2048 tokens (8,188 positions) of smollm2 (49,152 tokens) already take 805 MB in float16 (1.6 GB in
    float32). `dtype` is the storage of the reference log-probs; float16 halves the file, and the log-probs are
    renormalised on reading so the stored distribution stays self-consistent (self-KL below 1e-4).
    """

    dataset: str = "wikitext2"
    seqlen: int = 2048
    windows: int = 4
    dtype: str = "float16"

    def __post_init__(self) -> None:
        check(isinstance(self.dataset, str) and self.dataset != "", "kld.dataset", "must be a non-empty string",
              self.dataset)
        check(isinstance(self.seqlen, int) and self.seqlen >= 2, "kld.seqlen", "must be an integer >= 2", self.seqlen)
        check(isinstance(self.windows, int) and self.windows >= 1, "kld.windows", "must be an integer >= 1",
              self.windows)
        check(self.dtype in KLD_DTYPES, "kld.dtype", f"must be one of {KLD_DTYPES}", self.dtype)


@dataclass(frozen=True)
class Reference:
    """A validated reference file and the token windows it was built from (and is evaluated on)."""

    path: Path
    token_ids: torch.Tensor  # (windows, seqlen) int64
    config: KLDConfig
    model_id: str
    vocab: int

    @property
    def windows(self) -> int:
        return self.token_ids.shape[0]

    @property
    def positions(self) -> int:
        return self.token_ids.shape[0] * (self.token_ids.shape[1] - 1)


@dataclass(frozen=True)
class KLDResult:
    mean_kld: float        # mean over positions of KL(P_float || Q_quant), in nats
    p99_kld: float         # 99th percentile of the per-position KL
    top1_agreement: float  # fraction (0..1) of positions where the argmax tokens agree
    ppl: float             # the evaluated model's perplexity on these positions
    float_ppl: float       # the float model's perplexity on the same positions (from the reference)
    positions: int
    windows: int
    seqlen: int
    dataset: str
    dtype: str             # storage dtype of the reference log-probs
    reference: str         # the reference file
    seconds: float

    def as_dict(self) -> dict:
        return asdict(self)


def _sanitize(text: str, limit: int = 64) -> str:
    """A file-name-safe form of `text`, with a short hash of the original when anything was replaced or cut."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._") or "x"
    if safe == text and len(safe) <= limit:
        return safe
    return f"{safe[-limit:]}-{hashlib.sha256(text.encode()).hexdigest()[:8]}"


def default_cache_dir() -> Path:
    """`$CMPQ_CACHE_DIR/kld`, else `~/.cache/cmpq/kld`."""
    root = os.environ.get(CACHE_DIR_ENV)
    return (Path(root).expanduser() if root else Path.home() / ".cache" / "cmpq") / "kld"


def reference_path(model_id: str, config: KLDConfig, cache_dir: Path | None = None) -> Path:
    """Where the float reference of `model_id` under `config` is kept (the name encodes everything it depends on
    but the text itself, whose token ids are checked on loading)."""
    directory = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    name = (f"{_sanitize(model_id)}__{_sanitize(config.dataset)}__s{config.seqlen}_w{config.windows}_"
            f"{config.dtype}.safetensors")
    return directory / name


def eval_windows(ids: torch.Tensor, config: KLDConfig) -> torch.Tensor:
    """The first `config.windows` non-overlapping windows of `ids` (1, n) as (windows, seqlen) int64, remainder
    dropped (fewer windows if the text is shorter)."""
    if ids.dim() == 1:
        ids = ids[None]
    available = ids.shape[1] // config.seqlen
    if available == 0:
        raise CmpqError(f"text has {ids.shape[1]} tokens, fewer than one window of {config.seqlen}")
    n = min(config.windows, available)
    return ids[0, :n * config.seqlen].reshape(n, config.seqlen).to(torch.int64).cpu().contiguous()


def _device(model: nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def _logits(model: nn.Module, window: torch.Tensor) -> torch.Tensor:
    """float32 logits (seqlen - 1, vocab) predicting tokens 1..seqlen-1 of one window."""
    return model(window[None].to(_device(model)), use_cache=False).logits[0, :-1].float().cpu()


def _tensor_bytes(tensor: torch.Tensor) -> bytes:
    return tensor.contiguous().numpy().tobytes()  # little-endian on every platform torch supports


def _header(rows: int, seqlen: int, vocab: int, dtype: str, metadata: dict[str, str]) -> bytes:
    """The safetensors header (8-byte length + JSON, padded to 8 bytes) for the reference's three tensors."""
    n = rows // (seqlen - 1)
    logprobs = rows * vocab * _TORCH_DTYPES[dtype].itemsize
    top1 = logprobs + rows * 8
    end = top1 + n * seqlen * 8
    tensors = {"logprobs": {"dtype": _ST_DTYPES[dtype], "shape": [rows, vocab], "data_offsets": [0, logprobs]},
               "top1": {"dtype": "I64", "shape": [rows], "data_offsets": [logprobs, top1]},
               "token_ids": {"dtype": "I64", "shape": [n, seqlen], "data_offsets": [top1, end]}}
    text = json.dumps({"__metadata__": metadata, **tensors}, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text


def _write_reference(handle: BinaryIO, model: nn.Module, windows: torch.Tensor, config: KLDConfig, model_id: str,
                     progress: bool) -> None:
    """Stream the reference into `handle`: header (with a placeholder data digest), then each window's
    log-probs as it is computed, then top1 and token ids; finally the header again with the real digest."""
    n, seqlen = windows.shape
    rows = n * (seqlen - 1)
    digest = hashlib.sha256()
    top1: list[torch.Tensor] = []
    metadata: dict[str, str] = {}
    with torch.no_grad():
        for w in bar(range(n), desc=f"kld reference {config.dataset}", unit="window", disable=not progress):
            logits = _logits(model, windows[w])
            if w == 0:
                metadata = {"format": FORMAT, "format_version": FORMAT_VERSION, "model_id": model_id,
                            "dataset": config.dataset, "seqlen": str(seqlen), "windows": str(n),
                            "dtype": config.dtype, "vocab": str(logits.shape[1]),
                            "token_ids_sha256": hashlib.sha256(_tensor_bytes(windows)).hexdigest(),
                            "data_sha256": _EMPTY_DIGEST}
                handle.write(_header(rows, seqlen, logits.shape[1], config.dtype, metadata))
            elif logits.shape[1] != int(metadata["vocab"]):
                raise CmpqError(f"window {w}: logits over {logits.shape[1]} tokens, window 0 had {metadata['vocab']}")
            top1.append(logits.argmax(-1))
            for start in range(0, logits.shape[0], _ROWS):
                chunk = torch.log_softmax(logits[start:start + _ROWS], -1).to(_TORCH_DTYPES[config.dtype])
                data = _tensor_bytes(chunk)
                digest.update(data)
                handle.write(data)
            del logits
    for tensor in (torch.cat(top1).to(torch.int64), windows):
        data = _tensor_bytes(tensor)
        digest.update(data)
        handle.write(data)
    metadata["data_sha256"] = digest.hexdigest()
    handle.seek(0)
    handle.write(_header(rows, seqlen, int(metadata["vocab"]), config.dtype, metadata))  # same length


def build_reference(model: nn.Module, ids: torch.Tensor, config: KLDConfig, path: str | Path, model_id: str,
                    progress: bool = True) -> Path:
    """Run the float `model` on the first `config.windows` windows of `ids` (1, n) and store its log-probs at
    `path` atomically: the file under that name is either absent (or the previous one) or complete."""
    path = Path(path)
    windows = eval_windows(ids, config)
    return atomic_write(path, lambda handle: _write_reference(handle, model, windows, config, model_id, progress))


def _read_header(path: Path) -> tuple[dict, int]:
    """(parsed safetensors header, offset of the data section), with FormatError on anything unreadable."""
    try:
        with open(path, "rb") as handle:
            raw = handle.read(8)
            if len(raw) < 8:
                raise FormatError(f"{path}: truncated (no safetensors header)")
            length = int.from_bytes(raw, "little")
            if length > 100_000_000:
                raise FormatError(f"{path}: not a safetensors file (header length {length})")
            text = handle.read(length)
            if len(text) < length:
                raise FormatError(f"{path}: truncated inside the header")
            header = json.loads(text)
    except OSError as exc:
        raise FormatError(f"{path}: cannot be read ({exc})") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FormatError(f"{path}: corrupted header, not valid JSON ({exc})") from None
    if not isinstance(header, dict) or not isinstance(header.get("__metadata__"), dict):
        raise FormatError(f"{path}: not a KLD reference (no metadata in the safetensors header)")
    return header, 8 + length


def _data_digest(path: Path, offset: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        handle.seek(offset)
        while chunk := handle.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def load_reference(path: str | Path, ids: torch.Tensor, config: KLDConfig, model_id: str | None = None) \
        -> Reference:
    """Open and validate a reference for evaluating the windows of `ids` under `config`.

    FormatError (naming the file and what differs) if it is truncated or corrupted, of another format version,
    built under another dataset / seqlen / window count / dtype / model id (when given), or from other token ids.
    """
    path = Path(path)
    if not path.is_file():
        raise FormatError(f"{path}: no such reference file")
    header, offset = _read_header(path)
    meta = header["__metadata__"]
    rebuild = "; delete it to rebuild"
    if meta.get("format") != FORMAT:
        raise FormatError(f"{path}: not a KLD reference (format {meta.get('format')!r})")
    if meta.get("format_version") != FORMAT_VERSION:
        raise FormatError(f"{path}: format version {meta.get('format_version')!r}; this cmpq reads version "
                          f"{FORMAT_VERSION}{rebuild}")
    try:
        end = max(int(t["data_offsets"][1]) for k, t in header.items() if k != "__metadata__")
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        raise FormatError(f"{path}: corrupted header ({exc!r})") from None
    size = path.stat().st_size
    if size != offset + end:
        raise FormatError(f"{path}: {size} bytes, the header describes {offset + end}: the file is truncated or "
                          f"corrupted{rebuild}")
    windows = eval_windows(ids, config)
    expected = {"dataset": config.dataset, "seqlen": str(config.seqlen), "windows": str(windows.shape[0]),
                "dtype": config.dtype}
    if model_id is not None:
        expected["model_id"] = model_id
    for key, value in expected.items():
        if meta.get(key) != value:
            raise FormatError(f"{path}: built with {key} {meta.get(key)!r}, this evaluation uses {value!r}{rebuild}")
    if _data_digest(path, offset) != meta.get("data_sha256"):
        raise FormatError(f"{path}: checksum mismatch: the file is corrupted or was modified{rebuild}")
    with _open(path) as handle:
        stored = _read(path, lambda: handle.get_tensor("token_ids"))
        vocab = _read(path, lambda: handle.get_slice("logprobs").get_shape()[1])
        rows = _read(path, lambda: handle.get_slice("top1").get_shape()[0])
    if tuple(stored.shape) != tuple(windows.shape) or rows != windows.shape[0] * (config.seqlen - 1) \
            or str(vocab) != meta.get("vocab"):
        raise FormatError(f"{path}: tensor shapes disagree with the metadata{rebuild}")
    if not torch.equal(stored, windows):
        w, i = (stored != windows).nonzero()[0].tolist()
        raise FormatError(f"{path}: token ids differ from the evaluation windows (first at window {w}, position "
                          f"{i}: stored {stored[w, i].item()}, now {windows[w, i].item()}): the reference was built "
                          f"from other text or with another tokenizer{rebuild}")
    return Reference(path=path, token_ids=windows, config=config, model_id=meta.get("model_id", ""), vocab=vocab)


def _open(path: Path):
    from safetensors import safe_open

    return _read(path, lambda: safe_open(str(path), framework="pt"))


def _read(path: Path, read: Callable):
    """`read()`, with any failure of safetensors reported as a FormatError naming the file."""
    try:
        return read()
    except Exception as exc:  # safetensors raises its own error types on damaged files
        raise FormatError(f"{path}: cannot be read ({type(exc).__name__}: {exc})") from None


def _quantile(values: torch.Tensor, q: float) -> float:
    if values.numel() <= 1 << 24:  # torch.quantile's input limit
        return torch.quantile(values, q).item()
    import numpy as np

    return float(np.quantile(values.numpy(), q))


def kl_divergence(model: nn.Module, reference: Reference, progress: bool = True) -> KLDResult:
    """KL(P_float || Q_model) per position, top-1 agreement and perplexities of `model` against `reference`,
    one window (of logits) at a time."""
    start = time.perf_counter()
    kls: list[torch.Tensor] = []
    agree = 0
    nll = 0.0
    float_nll = 0.0
    rows = reference.token_ids.shape[1] - 1
    with _open(reference.path) as handle, torch.no_grad():
        stored = _read(reference.path, lambda: handle.get_slice("logprobs"))
        top1 = _read(reference.path, lambda: handle.get_tensor("top1"))
        for w in bar(range(reference.windows), desc=f"kld {reference.config.dataset}", unit="window",
                      disable=not progress):
            window = reference.token_ids[w]
            logits = _logits(model, window)
            if logits.shape[1] != reference.vocab:
                raise CmpqError(f"the model predicts over {logits.shape[1]} tokens, the reference {reference.path} "
                                f"over {reference.vocab}: not the same vocabulary")
            agree += int((logits.argmax(-1) == top1[w * rows:(w + 1) * rows]).sum())
            for lo in range(0, rows, _ROWS):
                hi = min(lo + _ROWS, rows)
                target = window[lo + 1:hi + 1, None]
                logp = _read(reference.path, lambda: stored[w * rows + lo:w * rows + hi]).float()
                logp = logp - torch.logsumexp(logp, -1, keepdim=True)  # renormalise (float16 storage)
                logq = torch.log_softmax(logits[lo:hi], -1)
                p = logp.exp()
                kls.append(torch.where(p > 0, p * (logp - logq), torch.zeros((), dtype=p.dtype)).sum(-1))
                nll -= logq.gather(1, target).double().sum().item()
                float_nll -= logp.gather(1, target).double().sum().item()
            del logits
    values = torch.cat(kls).double()
    positions = values.numel()
    return KLDResult(mean_kld=values.mean().item(), p99_kld=_quantile(values, 0.99), top1_agreement=agree / positions,
                     ppl=math.exp(nll / positions), float_ppl=math.exp(float_nll / positions), positions=positions,
                     windows=reference.windows, seqlen=reference.config.seqlen, dataset=reference.config.dataset,
                     dtype=reference.config.dtype, reference=str(reference.path),
                     seconds=time.perf_counter() - start)


def ensure_reference(tokenizer, model_id: str, float_loader: Callable[[], nn.Module], config: KLDConfig,
                     cache_dir: Path | None = None, progress: bool = True) -> Reference:
    """The float model's reference for `config.dataset` (wikitext2 | c4 | a text file), built with
    `float_loader()` only when its file is missing, else reused (and checked against the evaluation windows)."""
    ids, _ = eval_token_ids(tokenizer, config.dataset)
    path = reference_path(model_id, config, cache_dir)
    if path.is_file():
        logger.info("reusing %s", path)
        if progress:
            print(f"kld: reusing {path}", file=sys.stderr)
    else:
        float_model = float_loader()
        build_reference(float_model, ids, config, path, model_id, progress=progress)
        del float_model
    return load_reference(path, ids, config, model_id=model_id)


def kld_against_float(model: nn.Module, tokenizer, model_id: str, float_loader: Callable[[], nn.Module],
                      config: KLDConfig, cache_dir: Path | None = None, progress: bool = True) -> KLDResult:
    """KL divergence of `model` from the float model `model_id` (`ensure_reference`, then `kl_divergence`)."""
    reference = ensure_reference(tokenizer, model_id, float_loader, config, cache_dir, progress)
    return kl_divergence(model, reference, progress=progress)
