"""Quantization methods behind one interface; importing this package registers all of them."""

from cmpq.formats.base import BitBreakdown, QuantizedWeight
from cmpq.quantizers.awq import AWQ, AWQConfig
from cmpq.quantizers.base import QUANTIZERS, Quantizer, get_quantizer, register
from cmpq.quantizers.cmpq import CMPQ, CMPQConfig
from cmpq.quantizers.gptq import GPTQ, GPTQConfig
from cmpq.quantizers.llmmq import LLMMQ, LLMMQConfig
from cmpq.quantizers.quip import QuIP, QuIPConfig
from cmpq.quantizers.rtn import RTN, RTNConfig
from cmpq.quantizers.smoothquant import SmoothQuant, SmoothQuantConfig
from cmpq.quantizers.squeezellm import SqueezeLLM, SqueezeLLMConfig

__all__ = ["AWQ", "AWQConfig", "CMPQ", "CMPQConfig", "GPTQ", "GPTQConfig", "LLMMQ", "LLMMQConfig", "QUANTIZERS", "QuIP",
           "QuIPConfig", "RTN", "RTNConfig", "SmoothQuant", "SmoothQuantConfig", "SqueezeLLM", "SqueezeLLMConfig",
           "BitBreakdown", "QuantizedWeight", "Quantizer", "get_quantizer", "register"]
