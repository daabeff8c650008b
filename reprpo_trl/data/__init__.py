"""Preference datasets: the offline suite, hub/file loaders, validation and truncation checks."""

from .loading import check_truncation, load_preference_dataset, on_disk, truncated_fraction, validate_preferences
from .suite import FAMILIES, SUITE_SHIFTS, make_family, to_conversational
from .tokenize import tokenize_pair

__all__ = [
    "FAMILIES",
    "SUITE_SHIFTS",
    "check_truncation",
    "load_preference_dataset",
    "make_family",
    "on_disk",
    "to_conversational",
    "tokenize_pair",
    "truncated_fraction",
    "validate_preferences",
]
