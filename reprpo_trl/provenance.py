"""Where a result came from: the code revision, a run's settings and their hash (its identity), and the run record
`reprpo train` leaves next to a trained model.

The run record (`reprpo_run.json` in the output directory) is written last, after the model, so its presence
means the training finished. It holds the run's settings (`settings`) and their hash (`settings_hash`); the
Trainer's complete arguments are in training_args.bin beside it.

A run's settings are the parsed fields (run, trainer, model and adapter arguments) whose values differ from their
declared defaults: what the recipe, sweep overrides and flags set, and what follows from them (eval_steps from
logging_steps, ...). Fields that say only where a run writes and how it reports progress (PLACE_ONLY: output_dir,
report_to, run_name, log levels, hub pushing, ...) are left out; what the inputs are is added: the sha256 of local
data files, the base model (reprpo_trl.models.model_identity), the contents of a shift_eval spec. Two runs with
equal settings under the same code train the same model, up to the nondeterminism of the device; defaults belong
to the code, so a package upgrade that adds a field (with a default that keeps the old behaviour) leaves every
hash as it was. reprpo sweep keys its runs by the hash and states its policy on code revisions.
"""

import enum
import hashlib
import json
import os
import subprocess
from dataclasses import MISSING, asdict, fields, is_dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from .io import atomic_write_text

RUN_RECORD = "reprpo_run.json"
PLACE_ONLY = {"output_dir", "run_name", "report_to", "project", "disable_tqdm", "log_level", "log_level_replica",
              "log_on_each_node", "resume_from_checkpoint", "local_rank", "skip_memory_metrics", "push_to_hub"}  # fmt: skip
PLACE_ONLY_PREFIXES = ("hub_", "trackio_")


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


def jsonable(value):
    """A setting as JSON: enums by value, dataclasses as mappings, other objects by their str."""
    if isinstance(value, enum.Enum):
        return value.value
    if is_dataclass(value) and not isinstance(value, type):
        return jsonable(asdict(value))
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return value if value is None or isinstance(value, (bool, int, float, str)) else str(value)


def _declared_default(f):
    return f.default_factory() if f.default is MISSING and f.default_factory is not MISSING else f.default


def run_settings(run_args, train_args, model_args, adapter_args) -> dict:
    """The settings that shape what a run produces (see the module docstring)."""
    from .data.loading import data_identity
    from .eval import load_shift_spec
    from .models import model_identity

    settings = {
        f.name: jsonable(getattr(part, f.name))
        for part in (run_args, train_args, model_args, adapter_args)
        for f in fields(part)
        if f.name not in PLACE_ONLY and not f.name.startswith(PLACE_ONLY_PREFIXES)
        and jsonable(getattr(part, f.name)) != jsonable(_declared_default(f))
    }
    settings["data"] = [data_identity(spec) for spec in (run_args.train_dataset, run_args.eval_dataset) if spec]
    settings["base_model"] = model_identity(model_args.model_name_or_path)
    if run_args.shift_eval:
        settings["shift_eval"] = {k: [data_identity(d) for d in v] for k, v in load_shift_spec(run_args.shift_eval).items()}
    return settings


def settings_hash(settings: dict) -> str:
    """12 hex digits of the sha256 of the settings as canonical JSON."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]


def write_run_record(output_dir, run_args, train_args, model_args, adapter_args, recipe: str | None, trainer=None) -> dict:
    """Record what a finished run was: method, adapter, recipe, seed, learning rate, base model, data, every setting
    and their hash, how many rows it trained on and steps it took, and the code revision."""
    adapter = adapter_args.adapter
    settings = run_settings(run_args, train_args, model_args, adapter_args)
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
        "suite_seed": run_args.suite_seed,
        "train_rows": len(trainer.train_dataset) if trainer is not None and trainer.train_dataset is not None else None,
        "steps": trainer.state.global_step if trainer is not None else None,
        "git_revision": code_revision(),
        "settings_hash": settings_hash(settings),
        "settings": settings,
    }
    atomic_write_text(Path(output_dir) / RUN_RECORD, json.dumps(record, indent=2))
    return record


def read_run_record(model_dir) -> dict:
    """The run record of a trained model directory, or {} for a model not trained by reprpo-train."""
    path = Path(model_dir) / RUN_RECORD
    return json.loads(path.read_text()) if path.exists() else {}
