"""Training dynamics (docs/methods.md "Training dynamics"): weight statistics per checkpoint, an HMM of training
phases over them, and the local learning coefficient. hmmlearn and devinterp come with the `dynamics` extra. The
names below load on first use, so that the settings (reprpo_trl.dynamics.arguments) import without torch."""

import importlib

_LAZY = {"LLCArguments": ".arguments", "LLCCallback": ".callbacks", "WeightStatsCallback": ".callbacks",
         "step_metrics": ".callbacks", "linear_regression_llc": ".llc", "weight_statistics": ".stats"}  # fmt: skip
__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
