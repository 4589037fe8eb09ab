"""Where this package runs from: the checkout root (for data beside it and the git commit in records)."""

from pathlib import Path

# src/cmpq/paths.py -> the checkout root when installed editable from a clone (the supported setup)
CHECKOUT = Path(__file__).resolve().parents[2]
