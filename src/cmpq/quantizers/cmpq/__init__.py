"""CMPQ: channel-wise mixed precision, per-column k-means codebooks, activation and quantization outliers."""

from cmpq.formats.cmpq import CMPQWeight
from cmpq.quantizers.cmpq.quantizer import CMPQ, CMPQConfig

__all__ = ["CMPQ", "CMPQConfig", "CMPQWeight"]
