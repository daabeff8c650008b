"""reprpo_trl: representation-level training methods as HuggingFace TRL trainer subclasses."""

from .trainers import IA2Config, IA2Trainer, ProjBPConfig, ProjBPTrainer, ProjGradConfig, ProjGradTrainer, ReprPOConfig, ReprPOTrainer
from .transforms import SiteTransforms

__all__ = [
    "IA2Config",
    "IA2Trainer",
    "ProjBPConfig",
    "ProjBPTrainer",
    "ProjGradConfig",
    "ProjGradTrainer",
    "ReprPOConfig",
    "ReprPOTrainer",
    "SiteTransforms",
]
__version__ = "0.1.0"
