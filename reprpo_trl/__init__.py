"""reprpo_trl: representation-level training methods as HuggingFace TRL trainer subclasses."""

from .trainers import ReprPOConfig, ReprPOTrainer

__all__ = ["ReprPOConfig", "ReprPOTrainer"]
__version__ = "0.1.0"
