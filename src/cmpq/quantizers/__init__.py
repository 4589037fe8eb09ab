"""Quantization methods behind one interface; importing this package registers all of them."""

from cmpq.quantizers.base import QUANTIZERS, BitBreakdown, QuantizedWeight, Quantizer, get_quantizer, register
from cmpq.quantizers.cmpq import CMPQ, CMPQConfig
from cmpq.quantizers.rtn import RTN, RTNConfig

__all__ = ["CMPQ", "CMPQConfig", "QUANTIZERS", "RTN", "BitBreakdown", "QuantizedWeight", "Quantizer", "RTNConfig", "get_quantizer",
           "register"]
