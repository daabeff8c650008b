"""ICL evaluation (docs/methods.md "IA2", Evaluation): accuracy without and with k demonstrations, uncertainty, calibration
and activation similarity.

At the position predicting the answer's first token, with p the next-token distribution:
    top1        argmax_v p(v) is the gold answer's first token
    label_acc   (classification) the gold label's first token is the most likely among the label tokens;
                (free text) the greedy answer, cut at a line break, equals the gold answer
    entropy     -Σ_v p(v) log p(v);   uncertainty = 1 - max_v p(v)
    ece         expected calibration error over 15 equal-mass bins of confidence (the renormalised label-set
                probability of the prediction; for free text, p of the greedy first token) against label_acc:
                Σ_b (n_b / N) |acc_b - conf_b|
    act_cos_<l> cosine between the base model's self-attention output with demonstrations and the evaluated
                model's without them, per layer, at the positions predicting the gold answer tokens
"""

import contextlib

import numpy as np
import pandas as pd
import torch

from ..errors import InputError
from ..icl.prompts import student_prompt, teacher_prompts
from ..icl.targets import compute_targets, cut_answer, left_padded
from ..sites import as_base


def expected_calibration_error(confidence, correct, bins: int = 15) -> float:
    """ECE with `bins` equal-mass bins (sorted by confidence, split into near-equal counts)."""
    confidence, correct = np.asarray(confidence, dtype=float), np.asarray(correct, dtype=float)
    order = np.argsort(confidence, kind="stable")
    total = len(confidence)
    return float(sum(len(b) / total * abs(correct[b].mean() - confidence[b].mean()) for b in np.array_split(order, bins) if len(b)))


def _first_token(tokenizer, answer: str) -> int:
    return tokenizer(" " + answer, add_special_tokens=False)["input_ids"][0]


@torch.no_grad()
def prediction_rows(model, tokenizer, prompts: list[str], examples, batch_size: int = 16, max_new_tokens: int = 8) -> pd.DataFrame:
    """One row per example: top1, label_acc, entropy, uncertainty, confidence (see the module docstring)."""
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    was_training = model.training
    model.eval()
    rows = []
    for start in range(0, len(prompts), batch_size):
        batch = examples.select(range(start, min(start + batch_size, len(prompts))))
        ids, mask, positions = left_padded([tokenizer(p)["input_ids"] for p in prompts[start : start + batch_size]], pad_id)
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=positions.to(device)).logits[:, -1].float()
        p = logits.softmax(-1)
        free_text = not batch[0].get("choices")
        if free_text:
            out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
                                 do_sample=False, pad_token_id=pad_id)  # fmt: skip
            answers = [tokenizer.decode(cut_answer(row[ids.shape[1] :].tolist(), tokenizer, tokenizer.eos_token_id)).strip() for row in out]
        for i, row in enumerate(batch):
            gold = _first_token(tokenizer, row["answer"])
            if free_text:
                correct, confidence = answers[i] == row["answer"].strip(), p[i].max().item()
            else:
                label_ids = torch.tensor([_first_token(tokenizer, c) for c in row["choices"]], device=p.device)
                if len(set(label_ids.tolist())) < len(label_ids):
                    raise InputError(f"labels {row['choices']} share a first token; label-set accuracy needs distinct ones")
                label_p = p[i, label_ids] / p[i, label_ids].sum()
                correct, confidence = label_ids[label_p.argmax()].item() == gold, label_p.max().item()
            rows.append({
                "top1": float(p[i].argmax().item() == gold), "label_acc": float(correct),
                "entropy": float(-(torch.special.xlogy(p[i], p[i])).sum()), "uncertainty": 1 - p[i].max().item(),
                "confidence": confidence,
            })  # fmt: skip
    model.train(was_training)
    return pd.DataFrame(rows)


def summarize_predictions(rows: pd.DataFrame) -> dict:
    return {
        "acc": rows.label_acc.mean(), "top1": rows.top1.mean(), "entropy": rows.entropy.mean(),
        "uncertainty": rows.uncertainty.mean(), "ece": expected_calibration_error(rows.confidence, rows.label_acc),
    }  # fmt: skip


@torch.no_grad()
def activation_similarity(model, base, tokenizer, examples, pool, k: int, seed: int) -> list[float]:
    """Per layer: mean cosine between `base` with k demonstrations and `model` without, on the gold answer tokens.
    `base` may be `model` itself when it is a peft model (its adapter is disabled for the base pass)."""
    answers = list(examples["answer"])
    with as_base(base) if base is model else contextlib.nullcontext():
        teacher = compute_targets(base, tokenizer, teacher_prompts(examples, pool, k, seed), answers, label_type="ground_truth")
    student = compute_targets(model, tokenizer, [student_prompt(q) for q in examples["query"]], answers, label_type="ground_truth")
    cos = torch.nn.functional.cosine_similarity(student.acts.float(), teacher.acts.float(), dim=-1)  # (P, L)
    return cos.mean(0).tolist()


def evaluate_icl(model, tokenizer, examples, pool, k: int = 4, seed: int = 0, batch_size: int = 16, base=None) -> dict:
    """Metrics without demonstrations (`zs_*`), with k (`icl_*`), the accuracy delta icl − zs, and, when `base`
    is given, the per-layer activation similarity (`act_cos_<l>`, `act_cos_mean`)."""
    zero_shot = summarize_predictions(prediction_rows(model, tokenizer, [student_prompt(q) for q in examples["query"]], examples, batch_size))
    with_demos = summarize_predictions(prediction_rows(model, tokenizer, teacher_prompts(examples, pool, k, seed), examples, batch_size))
    result = {**{f"zs_{n}": v for n, v in zero_shot.items()}, **{f"icl_{n}": v for n, v in with_demos.items()},
              "icl_minus_zs_acc": with_demos["acc"] - zero_shot["acc"], "k": k, "n": len(examples)}  # fmt: skip
    if base is not None:
        cos = activation_similarity(model, base, tokenizer, examples, pool, k, seed)
        result.update({f"act_cos_{layer}": value for layer, value in enumerate(cos)}, act_cos_mean=float(np.mean(cos)))
    return result
