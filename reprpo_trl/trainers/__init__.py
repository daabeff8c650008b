"""One file per trainer and its config."""

from .reprpo import ReprPOConfig, ReprPOTrainer

__all__ = ["ReprPOConfig", "ReprPOTrainer"]
