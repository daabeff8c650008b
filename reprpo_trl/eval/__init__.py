"""Evaluation: preference accuracy and coherence across distribution shifts."""

from .preference import add_coherence_ratio, evaluate_shifts, load_shifts, preference_metrics, score_pairs
from .shifts import REPORTED_SHIFTS, SELECTION_SHIFT, check_shift_spec, load_shift_spec

__all__ = [
    "REPORTED_SHIFTS",
    "SELECTION_SHIFT",
    "add_coherence_ratio",
    "check_shift_spec",
    "evaluate_shifts",
    "load_shift_spec",
    "load_shifts",
    "preference_metrics",
    "score_pairs",
]
