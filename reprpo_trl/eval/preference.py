"""Preference accuracy and coherence of a model on preference datasets (SPEC "Evaluation across distribution shifts").

For each pair, with l_t the log-prob of completion token t under the model:
    score_mean = mean_t l_t,  score_sum = sum_t l_t
    correct (mean variant) = score_mean(chosen) > score_mean(rejected)   [sigma(score_c - score_r) > 0.5]
    coherence: nll_chosen = -score_mean(chosen)
"""

import pandas as pd
import torch
from tqdm.auto import tqdm
from trl.trainer.dpo_trainer import DataCollatorForPreference

from ..data import load_preference_dataset, tokenize_pair


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


def evaluate_shifts(model, tokenizer, shifts: dict[str, list[str]], n: int = 200, batch_size: int = 16, seed: int = 0):
    """One row per (shift, dataset spec) with `preference_metrics` of `model`."""
    rows = []
    for shift, specs in shifts.items():
        for spec in specs:
            dataset = load_preference_dataset(spec, n=n, seed=seed)
            scores = score_pairs(model, tokenizer, dataset, batch_size=batch_size, desc=f"eval {spec}")
            rows.append({"shift": shift, "dataset": spec, "n": len(dataset), **preference_metrics(scores)})
    return pd.DataFrame(rows)
