"""Preference accuracy and coherence of a base model and trained models across distribution shifts (the library
of `reprpo eval`, reprpo_trl.cli.eval): the base model is loaded once; each trained model is a peft adapter
directory put on it and taken off again, or a full model directory; every one is checked before anything loads.
Results carry provenance: label, method, recipe, seed and learning rate from the run record reprpo train leaves,
the code revisions of training and evaluation, the suite seed and each dataset's fingerprint.
"""

from pathlib import Path

import pandas as pd
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from .data import SUITE_SEED
from .errors import InputError
from .eval import add_coherence_ratio, evaluate_shifts, load_shift_spec, load_shifts
from .models import looks_like_path, resolve_model
from .provenance import code_revision, read_run_record

BASE_LABEL = "base"


def _load(path: str, dtype: str, device: str):
    return AutoModelForCausalLM.from_pretrained(resolve_model(path), dtype=getattr(torch, dtype)).to(device)


def load_base(base: str, dtype: str = "float32"):
    """(tokenizer, base model on the best device) of a hub id, path or the embedded name."""
    tokenizer = AutoTokenizer.from_pretrained(resolve_model(base))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer, _load(base, dtype, "cuda" if torch.cuda.is_available() else "cpu")


def check_models(base: str, models: list[str], labels: list[str] | None = None) -> None:
    """Refuse, before anything loads, a label count that does not match and a base or trained model that is no
    model directory (a name that can only be a local path and does not exist, or a directory holding neither an
    adapter nor a model); hub ids pass."""
    if labels is not None and len(labels) != len(models):
        raise InputError(f"got {len(labels)} labels for {len(models)} models; give one label per model or none")
    for path in [base, *models]:
        if Path(path).is_dir():
            if not any((Path(path) / name).exists() for name in ("adapter_config.json", "config.json")):
                raise InputError(f"model {path!r} holds neither adapter_config.json (a peft adapter) nor config.json "
                                 "(a full model); give the output_dir of a finished reprpo-train run")  # fmt: skip
        elif looks_like_path(path) or Path(path).exists():
            raise InputError(f"model {path!r}: no such directory")


def each_model(base_model, models: list[str], labels: list[str] | None = None, include_base: bool = True, dtype: str = "float32"):
    """Yield (model, provenance) for the base model (label 'base') and then each of `models` (see check_models):
    a peft adapter directory is loaded onto `base_model` and taken out again before the next one; a full model
    is loaded."""
    device = next(base_model.parameters()).device
    if include_base:
        yield base_model, {"label": BASE_LABEL, "method": BASE_LABEL, "adapter": ""}
    for i, path in enumerate(models):
        record = read_run_record(path)
        provenance = {"label": labels[i] if labels else record.get("method", Path(path).name),
                      "method": record.get("method"), "adapter": str(path), "recipe": record.get("recipe"),
                      "seed": record.get("seed"), "learning_rate": record.get("learning_rate"),
                      "git_revision": record.get("git_revision")}  # fmt: skip
        if (Path(path) / "adapter_config.json").exists():
            model = PeftModel.from_pretrained(base_model, path).to(device)
            yield model, provenance
            # take the adapter out again (prompt learning never put layers into the base), base weights untouched
            base_model = model.get_base_model() if model.active_peft_config.is_prompt_learning else model.unload()
        else:
            yield _load(path, dtype, device), {**provenance, "adapter": ""}


@torch.no_grad()
def evaluate_models(
    base: str,
    models: list[str] = (),
    shifts: dict[str, list[str]] | str = "pkg:shifts/suite.yaml",
    n: int = 200,
    batch_size: int = 16,
    seed: int = SUITE_SEED,
    labels: list[str] | None = None,
    dtype: str = "float32",
    max_length: int | None = None,
    include_base: bool = True,
) -> pd.DataFrame:
    """Results of the base model (label 'base') and of each model in `models` on every dataset of `shifts`."""
    check_models(base, list(models), labels)
    shifts = load_shift_spec(shifts) if isinstance(shifts, (str, Path)) else shifts
    data = load_shifts(shifts, n=n, seed=seed)
    tokenizer, base_model = load_base(base, dtype)
    common = {"base_model": base, "eval_seed": seed, "eval_git_revision": code_revision()}
    tables = [
        evaluate_shifts(model, tokenizer, data, batch_size=batch_size, max_length=max_length).assign(**provenance, **common)
        for model, provenance in each_model(base_model, list(models), labels, include_base, dtype)
    ]
    results = pd.concat(tables, ignore_index=True)
    return add_coherence_ratio(results, BASE_LABEL) if include_base else results
