"""Exceptions a user can act on: each message says what was wrong and what to do about it."""

from __future__ import annotations


class CmpqError(Exception):
    """Base class: the CLI prints these as one-line errors instead of tracebacks."""


class ConfigError(CmpqError, ValueError):
    """A configuration field has an invalid value; the message names the field."""


class UnsupportedArchitectureError(CmpqError):
    """The model's family is not described in `cmpq.models.arch`."""


class ModelNotFoundError(CmpqError):
    """A model spec points at nothing loadable (missing path, unreachable hub, corrupt file)."""


class DataNotFoundError(CmpqError):
    """An evaluation or calibration dataset could not be found in any of the places searched."""


class FormatError(CmpqError):
    """A saved quantized model is truncated, corrupted, of another format version, or inconsistent; the message
    names the file (and tensor) and what is wrong."""
