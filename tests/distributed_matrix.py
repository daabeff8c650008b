"""Trains each recipe given, one after another, in one (possibly multi-process) launch, and keeps each run's
log history and how many micro-batches it trained (tests/test_distributed.py):

    accelerate launch ... tests/distributed_matrix.py <out_root> <recipe.yaml>... -- [reprpo-train flags for every run]

An FSDP launch stays FSDP on CPU (tests/fsdp_on_cpu.py)."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import fsdp_on_cpu  # noqa: E402
from reprpo_trl import train  # noqa: E402


def count_micro_batches() -> list[int]:
    """A counter of the micro-batches this process trains (every trainer's training_step ends in the Trainer's)."""
    from transformers import Trainer

    calls, original = [0], Trainer.training_step

    def counted(self, *args, **kwargs):
        calls[0] += 1
        return original(self, *args, **kwargs)

    Trainer.training_step = counted
    return calls


def main():
    fsdp_on_cpu.allow()
    calls = count_micro_batches()
    split = sys.argv.index("--") if "--" in sys.argv else len(sys.argv)
    root, recipes, flags = Path(sys.argv[1]), sys.argv[2:split], sys.argv[split + 1 :]
    for recipe in recipes:
        out = root / Path(recipe).stem
        calls[0] = 0
        trainer = train.run(["--config", recipe, "--output_dir", str(out), *flags])
        if trainer.is_world_process_zero():
            (out / "log_history.json").write_text(json.dumps(trainer.state.log_history))
            (out / "micro_batches.json").write_text(json.dumps(calls[0]))
        trainer.accelerator.wait_for_everyone()
        del trainer
    train.close_process_group()


if __name__ == "__main__":
    main()
