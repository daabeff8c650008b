"""Runs reprpo-train's main and kills its own process with SIGKILL at a chosen moment (for the resume tests).

    python tests/kill_harness.py after-checkpoint <step> <reprpo-train args...>   # right after checkpoint-<step> is complete
    python tests/kill_harness.py during-save <step> <reprpo-train args...>        # while checkpoint-<step> is being written
"""

import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from conftest import use_test_device  # noqa: E402
from reprpo_trl import checkpoints  # noqa: E402
from reprpo_trl.cli import train  # noqa: E402


def kill():
    os.kill(os.getpid(), signal.SIGKILL)


def main():
    use_test_device()
    mode, step, argv = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
    if mode == "after-checkpoint":
        on_save = checkpoints.CheckpointMarker.on_save

        def on_save_then_die(self, args, state, control, **kwargs):
            on_save(self, args, state, control, **kwargs)
            if state.global_step == step:
                kill()

        checkpoints.CheckpointMarker.on_save = on_save_then_die
    elif mode == "during-save":
        save = torch.save

        def save_or_die(obj, f, *args, **kwargs):  # the optimizer state comes after the adapter, before the rest
            if f"checkpoint-{step}" in str(f):
                kill()
            return save(obj, f, *args, **kwargs)

        torch.save = save_or_die
    else:
        raise SystemExit(f"unknown mode {mode!r}")
    train.main(argv)


if __name__ == "__main__":
    main()
