"""Preference scoring on a model whose preferences are known exactly, and the demo's comparison table."""

import math
from types import SimpleNamespace

import pandas as pd
import pytest
import torch
from datasets import Dataset

from reprpo_trl.demo import compare
from reprpo_trl.eval import preference_metrics, score_pairs


class PrefersOneToken(torch.nn.Module):
    """Same logits at every position: `boost` for one token id, 0 for the rest."""

    def __init__(self, vocab_size, token_id, boost=5.0):
        super().__init__()
        self.logits = torch.nn.Parameter(torch.zeros(vocab_size))
        self.logits.data[token_id] = boost

    def forward(self, input_ids, attention_mask):
        return SimpleNamespace(logits=self.logits.expand(*input_ids.shape, -1))


def test_scores_match_hand_computed_log_probs(tokenizer):
    model = PrefersOneToken(len(tokenizer), tokenizer.convert_tokens_to_ids("7"))
    V = len(tokenizer)
    hi = 5.0 - math.log(math.exp(5.0) + V - 1)  # log-prob of "7"
    lo = -math.log(math.exp(5.0) + V - 1)  # any other token
    data = Dataset.from_list([{"prompt": "Q:", "chosen": " 7", "rejected": " 33"}])
    scores = score_pairs(model, tokenizer, data).iloc[0]
    # completion tokens: " ", "7"/"3"..., EOS
    assert scores.chosen_sum == pytest.approx(hi + 2 * lo, abs=1e-4)
    assert scores.rejected_sum == pytest.approx(4 * lo, abs=1e-4)
    assert scores.chosen_mean == pytest.approx((hi + 2 * lo) / 3, abs=1e-4)
    assert scores.rejected_mean == pytest.approx(lo, abs=1e-4)


def test_accuracy_is_known(tokenizer):
    model = PrefersOneToken(len(tokenizer), tokenizer.convert_tokens_to_ids("7"))
    rows = [{"prompt": "Q:", "chosen": " 7", "rejected": " 3"}] * 3 + [{"prompt": "Q:", "chosen": " 3", "rejected": " 7"}]
    metrics = preference_metrics(score_pairs(model, tokenizer, Dataset.from_list(rows), batch_size=3))
    assert metrics["acc"] == 0.75 and metrics["acc_sum"] == 0.75
    assert metrics["margin"] > 0


def test_mean_and_sum_scores_can_disagree():
    scores = pd.DataFrame({"chosen_sum": [-6.0], "rejected_sum": [-4.0], "chosen_mean": [-1.0], "rejected_mean": [-2.0]})
    metrics = preference_metrics(scores)
    assert metrics["acc"] == 1.0 and metrics["acc_sum"] == 0.0
    assert metrics["nll_chosen"] == 1.0


def test_compare_table():
    base = pd.DataFrame({"shift": ["a"], "dataset": ["d"], "n": [10], "acc": [0.5], "nll_chosen": [2.0]})
    trained = base.assign(acc=[0.7], nll_chosen=[3.0])
    row = compare(base, trained).iloc[0]
    assert row.gain_pp == pytest.approx(20.0) and row.nll_ratio == pytest.approx(1.5)
