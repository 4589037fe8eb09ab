"""Calibration: capturing block inputs and gathering per-layer activation statistics."""
