"""The supervised baseline (`trainer: sft`, the PEFT-baselines study): TRL's SFTConfig and SFTTrainer with their
math unchanged, plus the run guard every trainer of this package has (reprpo_trl.trainers.guard: the non-finite
guard, complete-marked checkpoints that resume finds)."""

from dataclasses import dataclass

import trl

from .guard import GuardedTrainer, check_nonfinite_policy, nonfinite_field


@dataclass
class SFTConfig(trl.SFTConfig):
    """TRL's SFTConfig plus `on_nonfinite`."""

    on_nonfinite: str = nonfinite_field()

    def __post_init__(self):
        super().__post_init__()
        check_nonfinite_policy(self.on_nonfinite)


class SFTTrainer(GuardedTrainer, trl.SFTTrainer):
    """TRL's SFTTrainer with the run guard; see the module docstring."""
