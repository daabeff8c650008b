"""Checkpoints that say when they are complete, and the resume rule that trusts only those.

The Trainer writes `checkpoint-<step>/` file by file (model or adapter, transforms, optimizer, scheduler, RNG
states, trainer_state.json); a kill in between leaves a directory that looks like a checkpoint but is not one.
`CheckpointMarker` writes `reprpo_checkpoint.json` into the directory after every process has finished its part,
so a checkpoint is complete exactly when that file exists. Resume takes the newest complete checkpoint:

    resume_from_checkpoint = <path>          that checkpoint; refused if it is incomplete
    resume_from_checkpoint = auto            the newest complete checkpoint in output_dir, or a fresh start
    resume_from_checkpoint = true | last     the newest complete checkpoint in output_dir; refused if there is none
"""

import json
import os
import re
from pathlib import Path

from accelerate import PartialState
from transformers import TrainerCallback

from .errors import InputError
from .io import atomic_write_text

COMPLETE_MARKER = "reprpo_checkpoint.json"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


def is_complete(checkpoint: str | os.PathLike) -> bool:
    return (Path(checkpoint) / COMPLETE_MARKER).exists()


def checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """The checkpoint-<step> directories of `output_dir`, oldest step first."""
    if not Path(output_dir).is_dir():
        return []
    found = [(int(m.group(1)), p) for p in Path(output_dir).iterdir() if p.is_dir() and (m := _CHECKPOINT.match(p.name))]
    return [path for _, path in sorted(found)]


def last_complete_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint; says which newer ones it passed over because they were half-written."""
    found = checkpoints(output_dir)
    complete = [p for p in found if is_complete(p)]
    skipped = [p.name for p in found[found.index(complete[-1]) + 1 if complete else 0 :]]
    if skipped:
        print(f"resume: passing over incomplete checkpoint(s) {skipped} in {output_dir} (no {COMPLETE_MARKER}: "
              f"the run stopped while writing them)" + (f"; using {complete[-1].name}" if complete else ""))  # fmt: skip
    return complete[-1] if complete else None


def resolve_resume(value: str | bool | None, output_dir: str | os.PathLike) -> str | None:
    """The checkpoint directory to resume from, for a `resume_from_checkpoint` value (see the module docstring)."""
    if value in (None, False, "", "false", "no", "none", "None"):
        return None
    if value is True or str(value).lower() in ("true", "last", "auto"):
        checkpoint = last_complete_checkpoint(output_dir)
        if checkpoint is None and str(value).lower() != "auto":
            raise InputError(
                f"resume_from_checkpoint={value}: output_dir {str(output_dir)!r} holds no complete checkpoint; "
                "use `auto` to start fresh when there is none"
            )
        return None if checkpoint is None else str(checkpoint)
    path = Path(value)
    if not path.is_dir():
        raise InputError(f"resume_from_checkpoint: no such directory {str(path)!r}")
    if not is_complete(path):
        newest = last_complete_checkpoint(path.parent)
        raise InputError(
            f"resume_from_checkpoint: {str(path)!r} is incomplete (no {COMPLETE_MARKER}: the run stopped while "
            f"writing it); " + (f"resume from {str(newest)!r} instead" if newest else "no complete checkpoint is beside it")
        )
    return str(path)


class CheckpointMarker(TrainerCallback):
    """Marks each checkpoint complete once every process has written its files (see the module docstring)."""

    def on_save(self, args, state, control, **kwargs):
        state_ = PartialState()
        state_.wait_for_everyone()
        if state_.is_main_process:
            checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if checkpoint.is_dir():
                files = sorted(p.name for p in checkpoint.iterdir() if p.name != COMPLETE_MARKER)
                atomic_write_text(checkpoint / COMPLETE_MARKER, json.dumps({"step": state.global_step, "files": files}))
        state_.wait_for_everyone()
