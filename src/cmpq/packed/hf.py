"""Hugging Face integration: `quant_method: "cmpq"` in a config.json, understood by transformers.

After `import cmpq` (see `cmpq/__init__.py`), `AutoModelForCausalLM.from_pretrained(dir)` on a directory saved by
`cmpq.packed.model_io.save_quantized` replaces each quantized nn.Linear by the module of its stored format
(`cmpq.formats`: `CMPQLinear`, or `UniformLinear` for RTN and GPTQ) before the weights load (shapes read from the safetensors headers), lets transformers fill its buffers with the stored tensors
as they are, and validates every layer afterwards, so a corrupt file is a `FormatError` naming the layer.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
from safetensors import safe_open
from transformers.quantizers import HfQuantizer, register_quantization_config, register_quantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from cmpq import formats
from cmpq.errors import FormatError
from cmpq.formats import LAYER_TENSORS, QUANTIZED_MODULES

QUANT_METHOD = "cmpq"
FORMAT_VERSION = 2  # the version of docs/format.md this cmpq writes and reads
_DTYPES = {"BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "U16": torch.uint16, "I16": torch.int16,
           "U32": torch.uint32, "I32": torch.int32, "U64": torch.uint64, "I64": torch.int64, "F16": torch.float16,
           "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64}


@register_quantization_config(QUANT_METHOD)
class CmpqHfConfig(QuantizationConfigMixin):
    """The `quantization_config` of a saved cmpq model: method, its options, targets, format version."""

    def __init__(self, format_version: int = FORMAT_VERSION, method: str = "cmpq", config: dict | None = None,
                 target_bits: float | None = None, bpw: float | None = None, layers: list[str] | None = None,
                 checksum: str | None = None, head: dict | None = None, base_model: str | None = None,
                 finetune: dict | None = None, distill: dict | None = None, calibration: dict | None = None,
                 **kwargs: Any) -> None:
        self.quant_method = QUANT_METHOD
        self.format_version = format_version
        self.method = method
        self.config = config or {}
        self.target_bits = target_bits
        self.bpw = bpw
        self.layers = layers or []
        self.checksum = checksum
        self.head = head  # `describe_head`: name, method, config, target and honest bpw, bits, bytes, when the output head is quantized too
        self.base_model = base_model  # the float model it was quantized from (the KLD reference of `cmpq eval`)
        self.finetune = finetune  # {"epochs", "lr", "target", "blocks_kept"} when the stored values were fine-tuned
        self.distill = distill  # {"epochs", "lr", "topk", "holdout", "epoch_kept", "held_out_kl_kept"} when distilled
        self.calibration = calibration  # {"source", "nsamples", "seqlen", "seed", "dtype"} of the calibration windows


def checkpoint_layout(files: list[str]) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """{tensor name: (shape, dtype)} from the safetensors headers (no tensor data is read)."""
    layout = {}
    for file in files:
        if not str(file).endswith(".safetensors"):
            continue
        try:
            with safe_open(str(file), framework="pt") as handle:
                for key in handle.keys():
                    part = handle.get_slice(key)
                    layout[key] = (tuple(part.get_shape()), part.get_dtype())
        except Exception as exc:  # safetensors raises its own error types for truncated or garbled headers
            raise FormatError(f"{file}: not a readable safetensors file ({exc})") from None
    for key, (shape, dtype) in layout.items():
        if dtype not in _DTYPES:
            raise FormatError(f"tensor '{key}' has dtype {dtype}, which cmpq does not read")
        layout[key] = (shape, _DTYPES[dtype])
    return layout


def replace_linears(model: nn.Module, layout: dict[str, tuple[tuple[int, ...], torch.dtype]], layers: list[str],
                    where: str, method: str = "cmpq", options: dict | None = None) -> None:
    """Put an empty quantized module (buffers shaped as in the file) in place of every listed nn.Linear."""
    for name in layers:
        try:
            linear = model.get_submodule(name)
        except AttributeError:
            raise FormatError(f"{where}: quantized layer '{name}' does not exist in this model") from None
        if not isinstance(linear, (nn.Linear, *QUANTIZED_MODULES)):
            raise FormatError(f"{where}: '{name}' is a {type(linear).__name__}, not a linear layer")
        present = {t: layout[f"{name}.{t}"] for t in LAYER_TENSORS if f"{name}.{t}" in layout}
        if "codes" not in present:
            raise FormatError(f"{where}: the tensors of quantized layer '{name}' are missing")
        tensors = {t: torch.empty(shape, dtype=dtype) for t, (shape, dtype) in present.items()}
        bias = torch.empty(linear.out_features) if linear.bias is not None else None
        parent, _, child = name.rpartition(".")
        module = formats.for_method(method, where).empty_module(linear, tensors, bias, options or {})
        setattr(model.get_submodule(parent) if parent else model, child, module)


def check_config(config: Any, where: str) -> None:
    """Refuse other formats and versions with a message that says what was found."""
    method = getattr(config, "quant_method", None)
    if method != QUANT_METHOD:
        raise FormatError(f"{where}: quant_method is {method!r}, not '{QUANT_METHOD}'")
    version = getattr(config, "format_version", None)
    if version != FORMAT_VERSION:
        raise FormatError(f"{where}: format version {version!r}; this cmpq reads version {FORMAT_VERSION} "
                          f"(re-quantize, or use the cmpq release that wrote it)")


@register_quantizer(QUANT_METHOD)
class CmpqHfQuantizer(HfQuantizer):
    """Loads pre-quantized cmpq checkpoints (quantizing happens in cmpq, with calibration)."""

    requires_calibration = True

    def validate_environment(self, *args: Any, **kwargs: Any) -> None:
        check_config(self.quantization_config, "config.json")

    def _process_model_before_weight_loading(self, model: nn.Module, checkpoint_files: list[str] | None = None,
                                             **kwargs: Any) -> nn.Module:
        files = list(checkpoint_files or [])
        where = files[0] if files else "checkpoint"
        config = self.quantization_config
        layout = checkpoint_layout(files)
        head = config.head or {}
        body = [name for name in config.layers if name != head.get("name")]
        replace_linears(model, layout, body, where, config.method, config.config)
        if head:
            replace_linears(model, layout, [head["name"]], where, head.get("method", "cmpq"), head.get("config"))
        return model

    def param_needs_quantization(self, model: nn.Module, param_name: str, **kwargs: Any) -> bool:
        module, _, tensor = param_name.rpartition(".")
        return tensor in LAYER_TENSORS and isinstance(model.get_submodule(module), QUANTIZED_MODULES)

    def _process_model_after_weight_loading(self, model: nn.Module, **kwargs: Any) -> nn.Module:
        for name, module in model.named_modules():
            if isinstance(module, QUANTIZED_MODULES):
                module.validate(where=name)  # raises FormatError on any inconsistency
        from cmpq.engine.hf import route

        return route(model)  # generate's steps through the native engine where it covers the model

    def is_serializable(self, **kwargs: Any) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return False
