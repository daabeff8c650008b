"""Where a result came from: the code revision, and the run record `reprpo-train` leaves next to a trained model.

The run record (`reprpo_run.json` in the output directory) is written last, after the model, so its presence
means the training finished.
"""

import json
import os
import subprocess
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from .io import atomic_write_text

RUN_RECORD = "reprpo_run.json"


def code_revision() -> str:
    """The git commit of the reprpo_trl checkout (with '+dirty' for uncommitted changes), else the package version;
    $REPRPO_CODE_REVISION names it on a machine whose copy of the checkout has no git history."""
    if os.environ.get("REPRPO_CODE_REVISION"):
        return os.environ["REPRPO_CODE_REVISION"]
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, capture_output=True, text=True)
        return commit + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        try:
            return f"reprpo_trl=={version('reprpo_trl')}"
        except PackageNotFoundError:
            return "unknown"


def method_name(trainer: str, train_args, adapter: str = "") -> str:
    """A short name for what was trained: dpo, projgrad, reprpo-prefvec, reprpo-side-rank-ether, ia2-act,
    sft-lora, sft-full, ... (supervised fine-tuning runs differ by their adapter, so it is part of the name)."""
    if trainer == "sft":
        return f"sft-{adapter}" if adapter else "sft"
    if trainer == "ia2":
        return f"ia2-{train_args.ia2_method}"
    if trainer != "reprpo":
        return trainer
    parts = ["reprpo"]
    if train_args.collection != "hs":
        parts.append(train_args.collection)
    parts.append(train_args.hidden_loss)
    if train_args.transform != "none":
        parts.append(train_args.transform)
    return "-".join(parts)


def write_run_record(output_dir, run_args, train_args, model_args, adapter: str, recipe: str | None) -> dict:
    """Record method, adapter, recipe, seed, learning rate, base model, data and code revision of a finished run."""
    record = {
        "method": method_name(run_args.trainer, train_args, adapter),
        "trainer": run_args.trainer,
        "adapter": adapter,
        "recipe": recipe,
        "seed": train_args.seed,
        "learning_rate": train_args.learning_rate,
        "base_model": model_args.model_name_or_path,
        "train_dataset": run_args.train_dataset,
        "max_train_samples": run_args.max_train_samples,
        "git_revision": code_revision(),
    }
    atomic_write_text(Path(output_dir) / RUN_RECORD, json.dumps(record, indent=2))
    return record


def read_run_record(model_dir) -> dict:
    """The run record of a trained model directory, or {} for a model not trained by reprpo-train."""
    path = Path(model_dir) / RUN_RECORD
    return json.loads(path.read_text()) if path.exists() else {}
