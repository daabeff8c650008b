"""Preference scoring on a model whose preferences are known exactly, and the demo's comparison table."""

import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from datasets import Dataset
from peft import LoraConfig, get_peft_model

from conftest import make_model
from reprpo_trl.demo import compare
from reprpo_trl.eval import add_coherence_ratio, check_shift_spec, load_shift_spec, preference_metrics, score_pairs
from reprpo_trl.evaluate import evaluate_models
from reprpo_trl.cli.eval import main as eval_main
from reprpo_trl.io import read_table
from reprpo_trl.provenance import RUN_RECORD


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
    base = pd.DataFrame({"shift": ["a"], "dataset": ["d"], "fingerprint": ["f"], "n": [10], "acc": [0.5], "nll_chosen": [2.0]})
    trained = base.assign(acc=[0.7], nll_chosen=[3.0])
    row = compare(base, trained).iloc[0]
    assert row.gain_pp == pytest.approx(20.0) and row.nll_ratio == pytest.approx(1.5)


# --- shift specs, coherence ratio, reprpo-eval ---------------------------------------------------------------

SHIFTS = {"validation": ["suite:add_small:validation"], "in_domain": ["suite:add_small:test"], "unrelated": ["suite:capitals:test"]}


def test_shift_spec_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown shift 'test'"):
        check_shift_spec({"test": ["suite:add_small:test"]}, "x.yaml")
    with pytest.raises(ValueError, match="both a 'validation' dataset and a reported one"):
        check_shift_spec({"validation": ["suite:add_small:test"], "in_domain": ["suite:add_small:test"]}, "x.yaml")
    with pytest.raises(ValueError, match="non-empty list"):
        check_shift_spec({"in_domain": "suite:add_small:test"}, "x.yaml")
    with pytest.raises(ValueError, match="missing.yaml'?: no such file"):
        load_shift_spec(tmp_path / "missing.yaml")


def test_shipped_shift_specs_parse():
    for path in Path(__file__).parents[1].joinpath("recipes", "shifts").glob("*.yaml"):
        spec = load_shift_spec(path)
        assert "validation" in spec and "in_domain" in spec and "unrelated" in spec


def test_coherence_ratio_matches_base_by_fingerprint():
    results = pd.DataFrame(
        {"label": ["base", "base", "m", "m"], "fingerprint": ["a", "b", "a", "b"], "nll_chosen": [2.0, 4.0, 3.0, 2.0]}
    )
    assert add_coherence_ratio(results).nll_ratio.tolist() == [1.0, 1.0, 1.5, 0.5]
    with pytest.raises(ValueError, match="no 'base' rows for 1 dataset"):
        add_coherence_ratio(results.assign(fingerprint=["a", "a", "a", "c"]))


@pytest.fixture
def trained_adapter(tmp_path, tokenizer):
    model = get_peft_model(make_model(tokenizer), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    path = tmp_path / "adapter"
    model.save_pretrained(path)
    record = {"method": "reprpo-prefvec", "recipe": "recipes/reprpo_prefvec.yaml", "seed": 3, "learning_rate": 1e-4, "git_revision": "abc"}
    (path / RUN_RECORD).write_text(json.dumps(record))
    return str(path)


def test_evaluate_models_rows_provenance_and_determinism(saved_model, trained_adapter):
    results = evaluate_models(saved_model, [trained_adapter, trained_adapter], SHIFTS, n=8, batch_size=4, labels=["a", "b"])
    assert list(results.label.unique()) == ["base", "a", "b"]
    assert len(results) == 3 * 3 and set(results["shift"]) == set(SHIFTS)
    base, a, b = (results[results.label == x].reset_index(drop=True) for x in ("base", "a", "b"))
    assert (base.nll_ratio == 1.0).all()
    assert not np.allclose(a.nll_chosen, base.nll_chosen)  # the adapter changes the model
    # the second load of the same adapter gives the same numbers: unloading left the base untouched
    pd.testing.assert_frame_equal(a.drop(columns="label"), b.drop(columns="label"))
    assert a.method[0] == "reprpo-prefvec" and a.seed[0] == 3 and a.recipe[0] == "recipes/reprpo_prefvec.yaml"
    assert a.adapter[0] == trained_adapter and a.git_revision[0] == "abc" and a.eval_git_revision[0]
    assert a.fingerprint.tolist() == base.fingerprint.tolist() and a.fingerprint.nunique() == 3
    again = evaluate_models(saved_model, [trained_adapter], SHIFTS, n=8, batch_size=2)
    pd.testing.assert_frame_equal(again[again.label == "base"].reset_index(drop=True), base)


def test_reprpo_eval_cli_writes_parquet_and_csv(tmp_path, saved_model, trained_adapter):
    spec = tmp_path / "shifts.yaml"
    spec.write_text(yaml.safe_dump({"in_domain": ["suite:add_small:test"]}))
    eval_main(["--base", saved_model, "--models", trained_adapter, "--shifts", str(spec), "--out", str(tmp_path / "r"), "--n", "4"])
    parquet, csv = read_table(tmp_path / "r.parquet"), read_table(tmp_path / "r.csv")
    assert parquet.label.tolist() == csv.label.tolist() == ["base", "reprpo-prefvec"]
    with pytest.raises(ValueError, match="2 labels for 1 models"):
        evaluate_models(saved_model, [trained_adapter], SHIFTS, n=4, labels=["a", "b"])


# --- the shift evaluation callback ---------------------------------------------------------------------------


def _callback_run(tmp_path, tokenizer, pairs, with_callback):
    from reprpo_trl import ReprPOConfig, ReprPOTrainer
    from reprpo_trl.eval.callback import ShiftEvalCallback

    args = ReprPOConfig(output_dir=str(tmp_path / "out"), max_steps=3, per_device_train_batch_size=4, learning_rate=5e-3,
                        use_cpu=True, bf16=False, report_to="none", logging_steps=1, save_strategy="no", layers="1,-1",
                        seed=0)  # fmt: skip
    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.2, target_modules=["q_proj", "v_proj"])
    trainer = ReprPOTrainer(make_model(tokenizer), args=args, train_dataset=pairs, processing_class=tokenizer, peft_config=lora)
    if with_callback:
        trainer.add_callback(ShiftEvalCallback(trainer, SHIFTS, every=2, n=4, batch_size=4))
    trainer.train()
    return trainer


def test_callback_logs_curves_without_changing_training(tmp_path, tokenizer, pairs):
    plain = _callback_run(tmp_path / "a", tokenizer, pairs, with_callback=False)
    watched = _callback_run(tmp_path / "b", tokenizer, pairs, with_callback=True)
    for (name, p), q in zip(plain.model.named_parameters(), watched.model.parameters()):
        assert torch.equal(p, q), f"{name} differs when the callback evaluates during training"
    curves = [row for row in watched.state.log_history if "shift/in_domain/acc" in row]
    assert [row["step"] for row in curves] == [2]
    assert set(curves[0]) >= {f"shift/{s}/{m}" for s in SHIFTS for m in ("acc", "nll_ratio")}
    assert curves[0]["shift/in_domain/nll_ratio"] != 1.0  # the adapter moved away from the base model
    train_logs = [{k: v for k, v in row.items() if not k.startswith("shift/")} for row in watched.state.log_history if "loss" in row]
    assert train_logs == [row for row in plain.state.log_history if "loss" in row]


def test_evaluate_a_full_model_directory(tmp_path, tokenizer, saved_model):
    full = tmp_path / "full"
    make_model(tokenizer, seed=5).save_pretrained(full)
    (full / RUN_RECORD).write_text(json.dumps({"method": "dpo", "seed": 1}))
    results = evaluate_models(saved_model, [str(full)], {"in_domain": ["suite:add_small:test"]}, n=4)
    trained = results[results.label == "dpo"].iloc[0]
    assert trained.adapter == "" and trained.seed == 1 and trained.nll_ratio != 1.0
