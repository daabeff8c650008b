"""reprpo_trl: representation-level training methods as HuggingFace TRL trainer subclasses."""

from .trainers import ProjBPConfig, ProjBPTrainer, ProjGradConfig, ProjGradTrainer, ReprPOConfig, ReprPOTrainer
from .transforms import SiteTransforms

__all__ = [
    "ProjBPConfig",
    "ProjBPTrainer",
    "ProjGradConfig",
    "ProjGradTrainer",
    "ReprPOConfig",
    "ReprPOTrainer",
    "SiteTransforms",
]
__version__ = "0.1.0"
