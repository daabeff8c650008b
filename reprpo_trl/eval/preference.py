"""Preference accuracy and coherence of a model on preference datasets (docs/methods.md "Evaluation across distribution shifts").

For each pair, with l_t the log-prob of completion token t under the model:
    score_mean = mean_t l_t,  score_sum = sum_t l_t
    correct (mean variant) = score_mean(chosen) > score_mean(rejected)   [sigma(score_c - score_r) > 0.5]
    coherence: nll_chosen = -mean over pairs of score_mean(chosen); nll_ratio = nll_chosen / nll_chosen(base)
"""

import pandas as pd
import torch
from datasets import Dataset
from tqdm.auto import tqdm
from trl.trainer.dpo_trainer import DataCollatorForPreference

from ..data import SUITE_SEED, load_preference_dataset, tokenize_pair
from ..errors import InputError


@torch.no_grad()
def score_pairs(model, tokenizer, dataset, batch_size: int = 16, max_length: int | None = None, desc=None):
    """Per-pair summed and mean completion log-probs of chosen and rejected -> DataFrame (one row per pair)."""
    collate = DataCollatorForPreference(pad_token_id=tokenizer.pad_token_id, max_length=max_length)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    rows = []
    for start in tqdm(range(0, len(dataset), batch_size), desc=desc, leave=False):
        examples = [tokenize_pair(row, tokenizer) for row in dataset.select(range(start, min(start + batch_size, len(dataset))))]
        batch = {k: v.to(device) for k, v in collate(examples).items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        logits = logits[:, -batch["input_ids"].shape[1] :]  # drop virtual-token positions of prompt adapters
        token_logps = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, batch["input_ids"][:, 1:, None])[..., 0]
        mask = batch["completion_mask"][:, 1:].float()
        summed = (token_logps * mask).sum(1)
        mean = summed / mask.sum(1).clamp(min=1)
        (c_sum, r_sum), (c_mean, r_mean) = summed.chunk(2), mean.chunk(2)
        for i in range(len(examples)):
            rows.append(
                {"chosen_sum": c_sum[i].item(), "rejected_sum": r_sum[i].item(),
                 "chosen_mean": c_mean[i].item(), "rejected_mean": r_mean[i].item()}
            )  # fmt: skip
    model.train(was_training)
    return pd.DataFrame(rows)


def preference_metrics(scores: pd.DataFrame) -> dict:
    """Accuracy (mean and summed score), mean log-prob margin, and NLL of the chosen completions."""
    return {
        "acc": float((scores.chosen_mean > scores.rejected_mean).mean()),
        "acc_sum": float((scores.chosen_sum > scores.rejected_sum).mean()),
        "margin": float((scores.chosen_mean - scores.rejected_mean).mean()),
        "nll_chosen": float(-scores.chosen_mean.mean()),
    }


def load_shifts(shifts: dict[str, list[str]], n: int | None = 200, seed: int = SUITE_SEED) -> dict[str, dict[str, Dataset]]:
    """shift -> dataset spec -> the first `n` validated pairs of that dataset."""
    return {shift: {spec: load_preference_dataset(spec, n=n, seed=seed) for spec in specs} for shift, specs in shifts.items()}


def evaluate_shifts(model, tokenizer, shifts: dict[str, dict[str, Dataset]], batch_size: int = 16, max_length=None):
    """One row per (shift, dataset) of `load_shifts` output with `preference_metrics` of `model`."""
    rows = []
    for shift, datasets in shifts.items():
        for spec, dataset in datasets.items():
            scores = score_pairs(model, tokenizer, dataset, batch_size=batch_size, max_length=max_length, desc=f"eval {spec}")
            rows.append(
                {"shift": shift, "dataset": spec, "fingerprint": dataset._fingerprint, "n": len(dataset),
                 **preference_metrics(scores)}
            )  # fmt: skip
    return pd.DataFrame(rows)


def add_coherence_ratio(results: pd.DataFrame, base_label: str = "base") -> pd.DataFrame:
    """Add nll_ratio = nll_chosen / nll_chosen of the base model on the same data (matched by fingerprint).

    Above 1: the evaluated model finds the preferred completions less likely than the base did (less coherent).
    """
    base = results[results.label == base_label].drop_duplicates("fingerprint").set_index("fingerprint").nll_chosen
    missing = set(results.fingerprint) - set(base.index)
    if missing:
        raise InputError(
            f"no {base_label!r} rows for {len(missing)} dataset(s) in these results; evaluate the base model on the "
            "same datasets (same specs, n and seed) to get coherence ratios"
        )
    return results.assign(nll_ratio=results.nll_chosen / results.fingerprint.map(base))
