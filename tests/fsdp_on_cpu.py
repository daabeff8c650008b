"""Accelerate runs FSDP only on accelerators: on CPU it quietly trains with DDP. torch's fully_shard itself works on
CPU processes over gloo, so for the tests this makes accelerate keep FSDP on CPU (AcceleratorState records the
FSDP plugin and type it would have recorded on GPUs); everything after that (fully_shard, DTensor gradients,
state dicts, checkpoints) is accelerate's and torch's own code path."""

from accelerate.state import AcceleratorState
from accelerate.utils import DistributedType


def allow() -> None:
    original, plugin = AcceleratorState.__init__, {}

    def init(self, *args, **kwargs):
        original(self, *args, **kwargs)
        if kwargs.get("fsdp_plugin") is not None:  # later inits (a state reset) pass none
            plugin["fsdp"] = kwargs["fsdp_plugin"]
        if "fsdp" in plugin and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type, self.fsdp_plugin = DistributedType.FSDP, plugin["fsdp"]

    AcceleratorState.__init__ = init


if __name__ == "__main__":  # `accelerate launch tests/fsdp_on_cpu.py <reprpo-train flags>`
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from reprpo_trl.cli.train import main

    allow()
    main()
