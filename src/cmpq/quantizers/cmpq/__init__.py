"""CMPQ: channel-wise mixed precision, per-column k-means codebooks, activation and quantization outliers."""

from cmpq.quantizers.cmpq.quantizer import CMPQ, CMPQConfig, CMPQWeight

__all__ = ["CMPQ", "CMPQConfig", "CMPQWeight"]
