"""Checkpoints that say when they are complete, and the resume rule that trusts only those.

The Trainer writes `checkpoint-<step>/` file by file (model or adapter, transforms, optimizer, scheduler, RNG
states, trainer_state.json); a kill in between leaves a directory that looks like a checkpoint but is not one.
`CheckpointMarker` writes `reprpo_checkpoint.json` into the directory after every process has finished its part,
so a checkpoint is complete exactly when that file exists. Resume takes the newest complete checkpoint:

    resume_from_checkpoint = <path>          that checkpoint; refused if it is incomplete
    resume_from_checkpoint = auto            the newest complete checkpoint in output_dir, or a fresh start
    resume_from_checkpoint = true | last     the newest complete checkpoint in output_dir; refused if there is none

`StopAndSave` stops a run on request: after SIGTERM or SIGUSR1 (what a cluster sends before a time limit or a
preemption), or once `<output_dir>/reprpo_stop` exists (a file a job script can touch on a shared filesystem), the
current optimizer step finishes, a complete checkpoint is written, `reprpo_stopped.json` records where, and
training ends. Processes agree on the step: the trainer gathers each one's `requested()` with the step's logged
terms (trainers/guard.py, no extra synchronisation) and sets `agreed`.
"""

import json
import os
import re
import signal
from pathlib import Path

from accelerate import PartialState
from transformers import TrainerCallback

from .errors import InputError
from .io import atomic_write_text

COMPLETE_MARKER = "reprpo_checkpoint.json"
STOP_FILE, STOPPED_RECORD = "reprpo_stop", "reprpo_stopped.json"
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
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


class StopAndSave(TrainerCallback):
    """Finishes the step, saves a complete checkpoint and ends training on a signal or a stop file (module docstring)."""

    def __init__(self):
        self.signal: str | None = None
        self.output_dir: str | None = None
        self.agreed = False
        self.stopped_at: int | None = None
        self._previous = {}

    def requested(self) -> bool:
        """Whether this process was asked to stop."""
        return self.signal is not None or Path(self.output_dir or ".", STOP_FILE).exists()

    def on_train_begin(self, args, state, control, **kwargs):
        self.signal, self.agreed, self.stopped_at, self.output_dir = None, False, None, args.output_dir
        if PartialState().is_main_process:  # a stop request of an earlier, stopped run must not stop this one
            Path(args.output_dir, STOP_FILE).unlink(missing_ok=True)
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._on_signal)

    def _on_signal(self, signum, frame):
        self.signal = signal.Signals(signum).name

    def on_step_end(self, args, state, control, **kwargs):
        if self.agreed:
            self.stopped_at = state.global_step
            control.should_save = control.should_training_stop = True

    def on_train_end(self, args, state, control, **kwargs):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}
        if self.stopped_at is not None and PartialState().is_main_process:
            reason = self.signal or STOP_FILE
            record = {"step": self.stopped_at, "reason": reason, "checkpoint": f"checkpoint-{self.stopped_at}"}
            atomic_write_text(Path(args.output_dir) / STOPPED_RECORD, json.dumps(record))
