"""One file per trainer and its config."""

from .dpo import DPOConfig, DPOTrainer
from .ia2 import IA2Config, IA2Trainer
from .projbp import ProjBPConfig, ProjBPTrainer
from .projgrad import ProjGradConfig, ProjGradTrainer
from .reprpo import ReprPOConfig, ReprPOTrainer
from .sft import SFTConfig, SFTTrainer

__all__ = ["DPOConfig", "DPOTrainer", "IA2Config", "IA2Trainer", "ProjBPConfig", "ProjBPTrainer", "ProjGradConfig", "ProjGradTrainer", "ReprPOConfig", "ReprPOTrainer", "SFTConfig", "SFTTrainer"]
