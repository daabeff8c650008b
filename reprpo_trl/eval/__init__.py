"""Evaluation: preference accuracy and coherence across distribution shifts."""

from .preference import evaluate_shifts, preference_metrics, score_pairs

__all__ = ["evaluate_shifts", "preference_metrics", "score_pairs"]
