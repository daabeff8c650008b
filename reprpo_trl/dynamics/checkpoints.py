"""Saved checkpoints as inputs to the dynamics tools (the workflow for checkpoints trained elsewhere or downloaded):
their step and logs (trainer_state.json), their model, and the weight-statistics table over a list of them."""

import json
import re
from pathlib import Path

import pandas as pd
import torch

from ..errors import InputError
from ..models import resolve_model
from .callbacks import step_metrics
from .llc import LLCArguments, probe_batches, trainer_llc
from .stats import weight_statistics


def is_adapter(path: Path) -> bool:
    return (Path(path) / "adapter_config.json").exists()


def trainer_state(path: Path) -> dict:
    state = Path(path) / "trainer_state.json"
    return json.loads(state.read_text()) if state.exists() else {}


def checkpoint_step(path: Path) -> int:
    """The global step saved in trainer_state.json, else the N of a `checkpoint-N` directory name."""
    state = trainer_state(path)
    if "global_step" in state:
        return int(state["global_step"])
    match = re.fullmatch(r"checkpoint-(\d+)", Path(path).name)
    if match is None:
        raise InputError(f"{path}: no trainer_state.json and not named checkpoint-<step>; cannot tell its step")
    return int(match.group(1))


def sorted_checkpoints(paths: list[str]) -> list[Path]:
    """Checkpoint directories in step order; each must hold an adapter or a model."""
    checkpoints = []
    for path in map(Path, paths):
        if not (is_adapter(path) or (path / "config.json").exists()):
            raise InputError(f"{path}: not a checkpoint (no adapter_config.json or config.json)")
        checkpoints.append(path)
    return sorted(checkpoints, key=checkpoint_step)


def load_checkpoint(path: Path, base: str | None = None) -> torch.nn.Module:
    """A peft checkpoint on its base model (`base`, else the adapter's base_model_name_or_path), or a full model."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    if not is_adapter(path):
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    base = base or json.loads((Path(path) / "adapter_config.json").read_text()).get("base_model_name_or_path")
    if not base:
        raise InputError(f"{path}: adapter_config.json names no base model; pass --base")
    model = AutoModelForCausalLM.from_pretrained(resolve_model(base), dtype=torch.float32)
    return PeftModel.from_pretrained(model, path)


def checkpoint_stats(paths: list[str], base: str | None = None) -> pd.DataFrame:
    """The weight-statistics table (as WeightStatsCallback writes it) computed from saved checkpoints."""
    rows = []
    for path in sorted_checkpoints(paths):
        step = checkpoint_step(path)
        state = trainer_state(path)
        stats = weight_statistics(load_checkpoint(path, base))
        rows.append({"step": step, "epoch": state.get("epoch"), **stats, "checkpoint": str(path),
                     **step_metrics(state.get("log_history", []), step)})  # fmt: skip
    return pd.DataFrame(rows)


def load_weights(model: torch.nn.Module, path: Path) -> None:
    """Put a checkpoint's trained weights into `model` (the live model of a trainer built from the same recipe)."""
    if is_adapter(path):
        from peft import set_peft_model_state_dict
        from peft.utils import load_peft_weights

        result = set_peft_model_state_dict(model, load_peft_weights(str(path)))
        if getattr(result, "unexpected_keys", None):
            raise InputError(f"{path}: adapter does not match the recipe's adapter (unexpected {result.unexpected_keys[:3]})")
        return
    model.load_state_dict(load_checkpoint(path).state_dict())


def checkpoint_llc(paths: list[str], trainer, args: LLCArguments) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The LLC at each checkpoint, with `trainer`'s own loss on its probe set (as LLCCallback measures it during
    training). Returns (one row per checkpoint, every SGLD loss)."""
    batches = probe_batches(trainer, args)
    rows, traces = [], []
    for path in sorted_checkpoints(paths):
        step = checkpoint_step(path)
        load_weights(trainer.model, path)
        summary, trace = trainer_llc(trainer, batches, args)
        rows.append({"step": step, **summary, "epsilon": args.llc_epsilon, "gamma": args.llc_gamma, "checkpoint": str(path),
                     **step_metrics(trainer_state(path).get("log_history", []), step)})  # fmt: skip
        traces.append(trace.assign(step=step))
    return pd.DataFrame(rows), pd.concat(traces, ignore_index=True)
