"""Preference datasets (offline suite, hub/file loaders, validation, truncation checks) and instruction data for
supervised fine-tuning (Commonsense-170K and its offline stand-in)."""

from .commonsense import load_sft_dataset, make_commonsense, make_mc_docs
from .loading import check_truncation, load_preference_dataset, on_disk, truncated_fraction, validate_preferences
from .suite import FAMILIES, SUITE_SEED, SUITE_SHIFTS, make_family, split_size, to_conversational
from .tokenize import tokenize_pair

__all__ = [
    "FAMILIES",
    "SUITE_SEED",
    "SUITE_SHIFTS",
    "check_truncation",
    "load_preference_dataset",
    "load_sft_dataset",
    "make_commonsense",
    "make_family",
    "make_mc_docs",
    "on_disk",
    "split_size",
    "to_conversational",
    "tokenize_pair",
    "truncated_fraction",
    "validate_preferences",
]
