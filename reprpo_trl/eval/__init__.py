"""Evaluation: preference accuracy and coherence across distribution shifts."""

from .preference import evaluate_shifts, preference_metrics, score_pairs, tokenize_pair

__all__ = ["evaluate_shifts", "preference_metrics", "score_pairs", "tokenize_pair"]
