"""One file per trainer and its config."""

from .projbp import ProjBPConfig, ProjBPTrainer
from .projgrad import ProjGradConfig, ProjGradTrainer
from .reprpo import ReprPOConfig, ReprPOTrainer

__all__ = ["ProjBPConfig", "ProjBPTrainer", "ProjGradConfig", "ProjGradTrainer", "ReprPOConfig", "ReprPOTrainer"]
