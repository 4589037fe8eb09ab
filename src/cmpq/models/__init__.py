"""Model loading and the data tables that describe each supported architecture."""

from cmpq.models.arch import ARCHITECTURES, ArchSpec, find_arch
from cmpq.models.load import load_model
from cmpq.models.loaded import LoadedModel

__all__ = ["ARCHITECTURES", "ArchSpec", "LoadedModel", "find_arch", "load_model"]
