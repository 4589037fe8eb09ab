"""Quantization methods behind one interface; importing this package registers all of them."""

from cmpq.quantizers.base import QUANTIZERS, BitBreakdown, QuantizedWeight, Quantizer, get_quantizer, register
from cmpq.quantizers.rtn import RTN, RTNConfig

__all__ = ["QUANTIZERS", "RTN", "BitBreakdown", "QuantizedWeight", "Quantizer", "RTNConfig", "get_quantizer",
           "register"]
