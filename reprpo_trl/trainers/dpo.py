"""The DPO baseline: TRL's DPOConfig and DPOTrainer with their math unchanged, plus the run guard every trainer of
this package has (reprpo_trl.trainers.guard: one host sync per step, the non-finite guard, complete-marked
checkpoints). ReprPO, ProjGrad and ProjBP build on these two classes."""

from dataclasses import dataclass

import trl

from .guard import GuardedTrainer, check_nonfinite_policy, nonfinite_field


@dataclass
class DPOConfig(trl.DPOConfig):
    """TRL's DPOConfig plus `on_nonfinite`."""

    on_nonfinite: str = nonfinite_field()

    def __post_init__(self):
        super().__post_init__()
        check_nonfinite_policy(self.on_nonfinite)


class DPOTrainer(GuardedTrainer, trl.DPOTrainer):
    """TRL's DPOTrainer with the run guard; see the module docstring."""
