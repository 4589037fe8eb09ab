"""Evaluation: perplexity per PROTOCOL, and the JSON records every benchmark writes."""
