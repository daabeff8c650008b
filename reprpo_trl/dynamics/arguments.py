"""Settings of the LLC estimate and of the HMM fit, as dataclasses whose fields are YAML keys and flags (kept apart
from the code that uses them, so that the command line can list them without importing torch)."""

import math
from dataclasses import dataclass, field

from ..errors import InputError

COVARIANCES = ("diag", "full")


@dataclass
class LLCArguments:
    """SGLD settings of the LLC estimate (devinterp's `llc()`), as YAML keys and flags. The defaults (eps 3e-4,
    n_beta 100, gamma 1000) are those docs/dynamics.md's example checked on the embedded model's DPO loss; check
    the traces (`bounded`) on any other model or loss."""

    llc_epsilon: float = field(default=3e-4, metadata={"help": "SGLD step size eps."})
    llc_nbeta: float | None = field(
        default=100.0, metadata={"help": "Inverse temperature n*beta; unset (null): n / log(n), n the probe pairs."}
    )
    llc_gamma: float = field(default=1000.0, metadata={"help": "Localisation gamma: pull of the chain toward w*."})
    llc_chains: int = field(default=2, metadata={"help": "Independent SGLD chains."})
    llc_draws: int = field(default=40, metadata={"help": "SGLD steps per chain whose losses enter the estimate."})
    llc_burnin: int = field(default=0, metadata={"help": "SGLD steps per chain before the draws (devinterp counts them too)."})
    llc_probe_size: int = field(default=32, metadata={"help": "Training pairs in the fixed probe set."})
    llc_batch_size: int = field(default=8, metadata={"help": "Probe pairs per SGLD step."})
    llc_seed: int = field(default=0, metadata={"help": "Seed of the probe set and of the chains."})

    def __post_init__(self):
        if self.llc_epsilon <= 0:
            raise InputError(f"llc_epsilon={self.llc_epsilon} must be > 0")
        if self.llc_gamma < 0:
            raise InputError(f"llc_gamma={self.llc_gamma} must be >= 0 (0: no localisation)")
        if self.llc_nbeta is not None and self.llc_nbeta <= 0:
            raise InputError(f"llc_nbeta={self.llc_nbeta} must be > 0 (or unset for n / log n)")
        for name in ("llc_chains", "llc_draws", "llc_probe_size", "llc_batch_size"):
            if getattr(self, name) < 1:
                raise InputError(f"{name}={getattr(self, name)} must be >= 1")
        if self.llc_burnin < 0:
            raise InputError(f"llc_burnin={self.llc_burnin} must be >= 0")
        if self.llc_batch_size > self.llc_probe_size:
            raise InputError(f"llc_batch_size={self.llc_batch_size} exceeds llc_probe_size={self.llc_probe_size}")

    def nbeta(self, n: int) -> float:
        """n_beta for a probe of n examples: the setting, or n / log n (the WBIC temperature beta = 1 / log n)."""
        return self.llc_nbeta if self.llc_nbeta is not None else n / math.log(max(n, 3))


@dataclass
class FitArguments:
    """Settings of `reprpo dynamics fit`."""

    max_states: int = field(default=8, metadata={"help": "Fit 1..max_states hidden states."})
    covariance: str = field(default="both", metadata={"help": "GaussianHMM covariance: diag, full or both."})
    restarts: int = field(default=4, metadata={"help": "Seeded restarts per model; the best train likelihood is kept."})
    test_fraction: float = field(default=0.2, metadata={"help": "Fraction of runs held out for the test likelihood."})
    features: str = field(default="", metadata={"help": "Extra columns to model besides the weight statistics, comma-separated (e.g. loss)."})  # fmt: skip
    metric: str = field(default="loss", metadata={"help": "Curve plotted by state and used for the convergence step."})
    tolerance: float = field(default=0.1, metadata={"help": "Converged: within this fraction of the total change of the final value."})  # fmt: skip
    window: int = field(default=3, metadata={"help": "Rolling-mean window (checkpoints) over the metric before the convergence test."})  # fmt: skip
    seed: int = field(default=0, metadata={"help": "Seed of the run split and the restarts."})

    def __post_init__(self):
        if self.covariance not in (*COVARIANCES, "both"):
            raise InputError(f"covariance={self.covariance!r}: choose diag, full or both")
        if not 1 <= self.max_states <= 20:
            raise InputError(f"max_states={self.max_states} must lie in 1..20")
        if self.restarts < 1:
            raise InputError(f"restarts={self.restarts} must be >= 1")
        if self.window < 1:
            raise InputError(f"window={self.window} must be >= 1")
        if not 0 <= self.test_fraction < 1:
            raise InputError(f"test_fraction={self.test_fraction} must lie in [0, 1)")

    @property
    def covariances(self) -> tuple[str, ...]:
        return COVARIANCES if self.covariance == "both" else (self.covariance,)
