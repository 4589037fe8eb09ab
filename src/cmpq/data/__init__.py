"""Evaluation text and calibration windows, following ../shared/PROTOCOL.md."""

from cmpq.data.sampling import calibration_windows, eval_token_ids
from cmpq.data.sources import data_dir_candidates, load_eval_text

__all__ = ["calibration_windows", "data_dir_candidates", "eval_token_ids", "load_eval_text"]
