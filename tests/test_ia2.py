"""IA2: target positions, teacher targets against unpadded forwards, each loss at known points, the cache,
a2t continuation, and every adapter training a few steps."""

import math

import pytest
import torch
from peft import LoraConfig, PeftModel
from transformers import AutoModelForCausalLM

from conftest import make_model, on_cpu
from reprpo_trl import IA2Config, IA2Trainer
from reprpo_trl.adapters import AdapterArguments, build_peft_config
from reprpo_trl.icl import load_icl_task, teacher_prompt, teacher_prompts
from reprpo_trl.icl import targets as targets_module
from reprpo_trl.icl.targets import compute_targets
from reprpo_trl.sites import attention_sites
from reprpo_trl.trainers.ia2 import answer_positions

LORA = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj"])


@pytest.fixture(scope="module")
def task():
    return load_icl_task("suite:sentiment", n=8, pool_size=16)


def ia2_trainer(tmp_path, tokenizer, task, model=None, peft_config=LORA, **overrides):
    settings = dict(output_dir=str(tmp_path / "out"), num_demos=2, max_steps=2, per_device_train_batch_size=4,
                    learning_rate=1e-2, use_cpu=True, bf16=False, report_to="none", logging_steps=1, save_strategy="no",
                    target_cache_dir=str(tmp_path / "cache"), seed=0)  # fmt: skip
    examples, pool = task
    return IA2Trainer(model or make_model(tokenizer), args=IA2Config(**{**settings, **overrides}), train_dataset=examples,
                      demo_pool=pool, processing_class=tokenizer, peft_config=peft_config)  # fmt: skip


def first_batch(trainer):
    return trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))


def test_answer_positions_hand_built():
    # row 0: BOS + 3 prompt tokens + 2 targets; row 1: 2 prompt tokens (no BOS) + 1 target, right-padded
    labels = torch.tensor([[-100, -100, -100, -100, 7, 8], [-100, -100, 9, -100, -100, -100]])
    rows, positions = answer_positions(labels)
    assert rows.tolist() == [0, 0, 1] and positions.tolist() == [3, 4, 1]  # last prompt token, then each target but the last
    # prompt tuning prepends virtual tokens: states (N, 3 + T, d) indexed as h[:, -T:] land on the same tokens
    hidden = torch.arange(2 * 9).view(2, 9, 1).float()
    assert hidden[:, -6:][rows, positions, 0].tolist() == [3 + 3, 3 + 4, 9 + 3 + 1]


def test_prompts_and_demo_sampling(task):
    examples, pool = task
    first, again = teacher_prompts(examples, pool, 2, seed=0), teacher_prompts(examples, pool, 2, seed=0)
    assert first == again and first != teacher_prompts(examples, pool, 2, seed=1)
    demo = pool[0]
    assert teacher_prompt("Q", [demo]) == f"{demo['query']} {demo['answer']}\n\nQ" and teacher_prompt("Q", []) == "Q"
    with pytest.raises(ValueError, match="num_demos=99"):
        teacher_prompts(examples, pool, 99, seed=0)


@pytest.mark.parametrize("label_type", ["ground_truth", "icl_outputs"])
def test_teacher_targets_match_unpadded_forward(tokenizer, label_type):
    model = make_model(tokenizer).eval()
    prompts, answers = ["Review: bad.\nSentiment:", "Q: 1 + 1 =\nA:"], ["negative", "2"]
    targets = compute_targets(model, tokenizer, prompts, answers, label_type=label_type, max_new_tokens=3,
                              distributions=True, batch_size=2)  # fmt: skip
    sites = attention_sites(model)
    for i, prompt in enumerate(prompts):
        ids = tokenizer(prompt)["input_ids"]
        target = targets.targets_of(i)
        if label_type == "ground_truth":
            assert target == tokenizer(" " + answers[i], add_special_tokens=False)["input_ids"]
        else:  # greedy: each target is the argmax after the previous ones
            assert len(target) <= 3
        seen = {}
        handles = [m[0].register_forward_hook(lambda mod, a, out, n=n: seen.__setitem__(n, out[0])) for n, m in sites.items()]
        with torch.no_grad():
            logits = model(torch.tensor([ids + target])).logits[0]
        for h in handles:
            h.remove()
        positions = range(len(ids) - 1, len(ids) - 1 + len(target))
        rows = slice(targets.offsets[i], targets.offsets[i + 1])
        for layer in range(len(sites)):
            expected = seen[f"layer_{layer}"][0, list(positions)]
            torch.testing.assert_close(targets.acts[rows, layer].float(), expected, atol=2e-3, rtol=2e-3)
        torch.testing.assert_close(targets.probs[rows].float(), logits[list(positions)].softmax(-1), atol=1e-3, rtol=1e-2)
        if label_type == "icl_outputs":
            assert target[0] == logits[len(ids) - 1].argmax().item()


def test_act_is_zero_with_the_teachers_own_prompt(tmp_path, tokenizer, task):
    same = ia2_trainer(tmp_path / "a", tokenizer, task, num_demos=0)
    batch = first_batch(same)
    with torch.no_grad():
        assert same.compute_loss(same.model, dict(batch)).item() < 1e-7
    icl = ia2_trainer(tmp_path / "b", tokenizer, task, num_demos=2)
    with torch.no_grad():
        assert icl.compute_loss(icl.model, first_batch(icl)).item() > 1e-6


def test_tna_interpolates_act_and_tok(tmp_path, tokenizer, task):
    trainer = ia2_trainer(tmp_path, tokenizer, task, ia2_method="tna")
    batch = first_batch(trainer)
    values = {}
    with torch.no_grad():
        for w in (0.0, 1.0, 0.3):
            trainer.args.tna_weight = w
            values[w] = trainer.compute_loss(trainer.model, dict(batch)).item()
    act, tok = trainer.step_terms["ia2/act"][-1].item(), trainer.step_terms["ia2/tok"][-1].item()
    assert values[0.0] == pytest.approx(act, rel=1e-5) and values[1.0] == pytest.approx(tok, rel=1e-5)
    assert values[0.3] == pytest.approx(0.7 * act + 0.3 * tok, rel=1e-5)


def test_tokl_matches_float64_kl(tmp_path, tokenizer, task):
    trainer = ia2_trainer(tmp_path, tokenizer, task, ia2_method="tokl", tokl_topk=5)
    batch = first_batch(trainer)
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, dict(batch)).item()
        logits = trainer.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.double()
    logits, batch = on_cpu(logits), on_cpu(batch)  # the float64 reference runs on the CPU, beside the cached targets
    rows, positions = answer_positions(batch["labels"])
    log_q = logits[rows, positions].log_softmax(-1)
    flat = trainer.targets.rows(batch["ia2_index"])
    top, ids = trainer.targets.probs[flat].double(), trainer.targets.prob_ids[flat]
    V = log_q.shape[-1]
    p = ((1 - top.sum(-1, keepdim=True)) / (V - 5)).expand(-1, V).clone().scatter_(-1, ids, top)
    assert p.sum(-1).allclose(torch.ones(len(p), dtype=torch.float64))
    expected = (p * (p.log() - log_q)).sum(-1).mean().item()
    assert loss == pytest.approx(expected, rel=1e-4)


def test_teacher_never_runs_when_the_cache_exists(tmp_path, tokenizer, task, monkeypatch):
    first = ia2_trainer(tmp_path, tokenizer, task)
    monkeypatch.setattr(targets_module, "compute_targets", lambda *a, **k: pytest.fail("the teacher ran again"))
    second = ia2_trainer(tmp_path, tokenizer, task)
    assert second.targets_path == first.targets_path
    assert torch.equal(second.targets.acts, first.targets.acts) and first.targets.acts.dtype == torch.float16
    second.train()  # and not during training either
    with pytest.raises(pytest.fail.Exception, match="the teacher ran again"):
        ia2_trainer(tmp_path, tokenizer, task, demo_seed=1)  # new demonstrations: a new key, so the teacher must run


def test_a2t_continues_from_the_saved_adapter(tmp_path, tokenizer, task):
    act = ia2_trainer(tmp_path / "act", tokenizer, task, ia2_method="act")
    act.train()
    act.save_model(str(tmp_path / "act_adapter"))
    saved = {n: p.detach().clone() for n, p in act.model.named_parameters() if "lora_" in n}
    a2t = ia2_trainer(tmp_path / "a2t", tokenizer, task, peft_config=None, ia2_method="a2t",
                      init_adapter=str(tmp_path / "act_adapter"), target_cache_dir=str(tmp_path / "act" / "cache"))  # fmt: skip
    start = {n: p.detach().clone() for n, p in a2t.model.named_parameters() if "lora_" in n}
    assert start.keys() == saved.keys() and all(torch.equal(start[n], saved[n]) for n in saved)
    assert a2t.optimizer is None and all(p.requires_grad for n, p in a2t.model.named_parameters() if "lora_" in n)
    a2t.train()
    assert "ia2/act" not in a2t.state.log_history[0] and a2t.state.log_history[0]["loss"] == pytest.approx(
        a2t.state.log_history[0]["ia2/tok"])
    assert any(not torch.equal(start[n], p.detach()) for n, p in a2t.model.named_parameters() if "lora_B" in n)
    with pytest.raises(ValueError, match="set init_adapter"):
        IA2Config(output_dir=str(tmp_path), ia2_method="t2a")


@pytest.mark.parametrize("adapter", ["lora", "ia3", "hira", "prompt", "prefix", "full"])
def test_every_adapter_trains_with_act(adapter, tmp_path, tokenizer, task):
    config = build_peft_config(AdapterArguments(adapter=adapter, adapter_r=4, adapter_targets="qvo", adapter_virtual_tokens=3))
    trainer = ia2_trainer(tmp_path, tokenizer, task, peft_config=config, gradient_checkpointing=adapter != "prefix")
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainable = {n for n, p in trainer.model.named_parameters() if p.requires_grad}
    trainer.train()
    changed = {n for n, p in trainer.model.named_parameters() if not torch.equal(before[n], p.detach())}
    assert changed and changed <= trainable
    assert trainer.state.log_history[0]["ia2/act"] > 0
    trainer.save_model(str(tmp_path / "saved"))
    if adapter != "full":
        reloaded = PeftModel.from_pretrained(make_model(tokenizer), str(tmp_path / "saved"))
        weights = dict(reloaded.named_parameters())
        assert all(torch.allclose(weights[n], on_cpu(p.detach())) for n, p in trainer.model.named_parameters() if n in changed)


def test_hub_loaders_on_local_copies(tmp_path):
    import pandas as pd

    from reprpo_trl.icl import validate_icl

    sst2 = tmp_path / "sst2"
    sst2.mkdir()
    pd.DataFrame({"idx": range(6), "sentence": [f"fine film {i} " for i in range(6)], "label": [0, 1] * 3}).to_parquet(sst2 / "train.parquet")
    pd.DataFrame({"idx": [0, 1], "sentence": ["dull", "great"], "label": [0, 1]}).to_parquet(sst2 / "validation.parquet")
    examples, pool = load_icl_task("sst2", "test", pool_size=2, hub_id=str(sst2))
    assert examples[:] == {"query": ["Review: dull\nSentiment:", "Review: great\nSentiment:"], "answer": ["negative", "positive"],
                           "choices": [["negative", "positive"]] * 2}  # fmt: skip
    assert pool["query"] == ["Review: fine film 4\nSentiment:", "Review: fine film 5\nSentiment:"]

    gsm = tmp_path / "gsm8k"
    (gsm / "main").mkdir(parents=True)
    (gsm / "README.md").write_text("---\nconfigs:\n- config_name: main\n  data_files:\n  - split: train\n    path: main/train.parquet\n---\n")
    pd.DataFrame({"question": ["Two plus two?", "Ten times 120?", "One?"], "answer": ["2+2=4\n#### 4", "#### 1,200", "#### 1"]}).to_parquet(gsm / "main" / "train.parquet")
    examples, pool = load_icl_task("gsm8k", "train", pool_size=1, hub_id=str(gsm))
    assert examples["answer"] == ["4", "1200"] and examples["query"][0] == "Q: Two plus two?\nA:" and len(pool) == 1

    from datasets import Dataset

    with pytest.raises(ValueError, match="row 1: field 'answer' is empty"):
        validate_icl(Dataset.from_list([{"query": "q", "answer": "a"}, {"query": "q", "answer": " "}]), "x")
    with pytest.raises(ValueError, match="row 0: answer 'maybe' is not one of choices"):
        validate_icl(Dataset.from_list([{"query": "q", "answer": "maybe", "choices": ["yes", "no"]}]), "x")
    with pytest.raises(ValueError, match="ICL task spec 'imdb'"):
        load_icl_task("imdb")


# --- ICL evaluation ------------------------------------------------------------------------------------------


def test_ece_equal_mass_bins_by_hand():
    from reprpo_trl.eval.icl import expected_calibration_error

    confidence = [0.9, 0.8, 0.6, 0.7]
    correct = [1, 0, 1, 1]
    # 2 bins of 2 by confidence: {0.6, 0.7} acc 1 conf 0.65; {0.8, 0.9} acc 0.5 conf 0.85
    assert expected_calibration_error(confidence, correct, bins=2) == pytest.approx(0.5 * 0.35 + 0.5 * 0.35)
    assert expected_calibration_error([1.0, 1.0], [1, 1]) == 0.0
    assert expected_calibration_error(np_linspace := [i / 30 for i in range(30)], [1] * 30, bins=15) == pytest.approx(
        1 - sum(np_linspace) / 30)


class AlwaysSays(torch.nn.Module):
    """Next-token logits that put `boost` on one token at every position; generate() repeats it."""

    def __init__(self, vocab_size, token_id, boost=4.0):
        super().__init__()
        self.logits = torch.nn.Parameter(torch.zeros(vocab_size))
        self.logits.data[token_id] = boost

    def forward(self, input_ids, attention_mask=None, position_ids=None):
        from types import SimpleNamespace

        return SimpleNamespace(logits=self.logits.expand(*input_ids.shape, -1))

    def generate(self, input_ids, max_new_tokens, **kwargs):
        said = self.logits.argmax().expand(input_ids.shape[0], max_new_tokens)
        return torch.cat([input_ids, said], dim=1)


def word_tokenizer(words):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(["<pad>", "<eos>", *words])}, unk_token="<pad>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="<eos>")


def test_prediction_metrics_on_a_model_that_always_says_p():
    from datasets import Dataset

    from reprpo_trl.eval.icl import prediction_rows, summarize_predictions

    tokenizer = word_tokenizer(["a", "b", "c", "p", "n"])
    rows = [{"query": "a", "answer": "p", "choices": ["p", "n"]}, {"query": "b", "answer": "n", "choices": ["p", "n"]}]
    model = AlwaysSays(len(tokenizer), tokenizer.convert_tokens_to_ids("p"))
    metrics = summarize_predictions(prediction_rows(model, tokenizer, ["a", "b"], Dataset.from_list(rows)))
    V = len(tokenizer)
    p_top = math.exp(4) / (math.exp(4) + V - 1)
    assert metrics["acc"] == 0.5 and metrics["top1"] == 0.5
    assert metrics["uncertainty"] == pytest.approx(1 - p_top, rel=1e-5)
    assert metrics["entropy"] == pytest.approx(-(p_top * math.log(p_top) + (1 - p_top) * math.log((1 - p_top) / (V - 1))), rel=1e-5)
    label_conf = math.exp(4) / (math.exp(4) + 1)  # renormalised over the two label tokens
    assert metrics["ece"] == pytest.approx(0.5 * (1 - label_conf) + 0.5 * label_conf)  # one row per bin
    free = [{"query": "a", "answer": "p p", "choices": []}, {"query": "b", "answer": "n", "choices": []}]
    metrics = summarize_predictions(prediction_rows(model, tokenizer, ["a", "b"], Dataset.from_list(free), max_new_tokens=2))
    assert metrics["acc"] == 0.5  # greedy "p p" matches the first answer only
    clash = [{"query": "a", "answer": "p", "choices": ["p", "p"]}]
    with pytest.raises(ValueError, match="share a first token"):
        prediction_rows(model, tokenizer, ["a"], Dataset.from_list(clash))


def test_icl_eval_cli(tmp_path, tokenizer, task, saved_model):
    from reprpo_trl.cli.icl_eval import main as icl_main
    from reprpo_trl.io import read_table

    trainer = ia2_trainer(tmp_path, tokenizer, task, model=AutoModelForCausalLM.from_pretrained(saved_model))
    trainer.train()
    trainer.save_model(str(tmp_path / "adapter"))
    out = tmp_path / "icl"
    icl_main(["--base", saved_model, "--models", str(tmp_path / "adapter"), "--labels", "act", "--task", "suite:arith",
              "--k", "2", "--n", "6", "--out", str(out)])  # fmt: skip
    results = read_table(out.with_suffix(".parquet"))
    assert results.label.tolist() == ["base", "act"] and (results.n == 6).all()
    assert results.icl_minus_zs_acc.tolist() == (results.icl_acc - results.zs_acc).tolist()
    layers = [c for c in results if c.startswith("act_cos_") and c != "act_cos_mean"]
    assert len(layers) == 4 and results[layers].abs().le(1 + 1e-6).all().all()
    from reprpo_trl.cli.report import main as report_main

    report_main([str(out.with_suffix(".parquet")), "--out", str(tmp_path / "report")])
    text = (tmp_path / "report" / "icl_report.md").read_text()
    assert "ICL task accuracy without demonstrations" in text and "| act" in text and "suite:arith" in text
    assert (tmp_path / "report" / "icl.png").read_bytes()[:4] == b"\x89PNG"


def test_activation_similarity_is_one_without_demonstrations(tokenizer, task):
    from reprpo_trl.eval.icl import activation_similarity

    examples, pool = task
    model = make_model(tokenizer)
    same = activation_similarity(model, model, tokenizer, examples, pool, k=0, seed=0)
    assert len(same) == 4 and all(c == pytest.approx(1.0, abs=1e-3) for c in same)
    shifted = activation_similarity(model, model, tokenizer, examples, pool, k=2, seed=0)
    assert all(c < 0.999 for c in shifted)


@pytest.mark.parametrize("method", ["act", "tokl"])
def test_gradient_accumulation_matches_one_large_batch(method, tmp_path, tokenizer, task):
    runs = {}
    for batch, accumulation in ((4, 1), (2, 2)):
        trainer = ia2_trainer(tmp_path / f"{batch}", tokenizer, task, ia2_method=method, max_steps=1, per_device_train_batch_size=batch,
                              gradient_accumulation_steps=accumulation, tokl_topk=5, target_cache_dir=str(tmp_path / "cache"),
                              optim="sgd", learning_rate=1.0)  # plain SGD: the update is the gradient; fmt: skip
        trainer.train()
        runs[batch] = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_B" in n}
    for name, value in runs[4].items():
        torch.testing.assert_close(runs[2][name], value, atol=1e-6, rtol=1e-4)


def test_act_matches_float64_reference(tmp_path, tokenizer, task):
    trainer = ia2_trainer(tmp_path, tokenizer, task, ia2_method="act")
    batch = first_batch(trainer)
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, dict(batch)).item()
        seen = {}
        sites = attention_sites(trainer.model)
        handles = [m[0].register_forward_hook(lambda mod, a, out, n=n: seen.__setitem__(n, out[0])) for n, m in sites.items()]
        trainer.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        for h in handles:
            h.remove()
    seen, batch = on_cpu(seen), on_cpu(batch)  # the float64 reference runs on the CPU, beside the cached targets
    rows, positions = answer_positions(batch["labels"])
    teacher = trainer.targets.acts[trainer.targets.rows(batch["ia2_index"])].double()  # (P, L, d)
    expected = sum(((seen[f"layer_{l}"][rows, positions].double() - teacher[:, l]) ** 2).mean() for l in range(len(sites)))
    assert loss == pytest.approx(expected.item(), rel=1e-4)  # sum over layers of the mean over (t, d)


def test_logged_terms_do_not_depend_on_gradient_accumulation(tmp_path, tokenizer, task):
    """ia2/act and ia2/tok are the step's true per-token means (docs/methods.md, IA2), whatever the split into
    micro-batches, and (1 - w) act + w tok is the logged loss."""
    logged = {}
    for batch, accumulation in ((4, 1), (2, 2), (1, 4)):
        trainer = ia2_trainer(tmp_path / f"{batch}", tokenizer, task, ia2_method="tna", tna_weight=0.3, max_steps=1,
                              per_device_train_batch_size=batch, gradient_accumulation_steps=accumulation,
                              target_cache_dir=str(tmp_path / "cache"))  # fmt: skip
        trainer.train_dataset = trainer.train_dataset.select(range(4))  # the one step sees the same 4 examples
        trainer.train()
        logged[batch] = trainer.state.log_history[0]
    for batch in (2, 1):
        for term in ("ia2/act", "ia2/tok", "loss"):
            assert logged[batch][term] == pytest.approx(logged[4][term], rel=1e-4), (batch, term)
    for row in logged.values():
        assert row["loss"] == pytest.approx(0.7 * row["ia2/act"] + 0.3 * row["ia2/tok"], rel=1e-4)
