"""Training dynamics (SPEC "Training dynamics"): weight statistics per checkpoint, an HMM of training phases over
them, and the local learning coefficient. hmmlearn and devinterp come with the `dynamics` extra."""

from .callbacks import LLCCallback, WeightStatsCallback, step_metrics
from .llc import LLCArguments, linear_regression_llc
from .stats import weight_statistics

__all__ = ["LLCArguments", "LLCCallback", "WeightStatsCallback", "linear_regression_llc", "step_metrics", "weight_statistics"]
