"""Multiple-choice evaluation through lm-eval: a known-answer task on a tiny model, agreement with lm-eval's own CLI,
trainer sft, the Commonsense-170K format and its offline stand-in, MC results in reports and sweeps."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

from reprpo_trl.data.commonsense import FAMILIES, alpaca_prompt, load_sft_dataset, make_commonsense, make_mc_docs
from reprpo_trl.eval.mc import MC_SHIFT, check_tasks, task_manager
from reprpo_trl.cli.eval import main as eval_main
from reprpo_trl.evaluate_mc import evaluate_mc_models
from reprpo_trl.io import read_table
from reprpo_trl.provenance import read_run_record
from reprpo_trl.report import load_results, mc_summary, write_report
from reprpo_trl.train import run

CHOICES = [" yes", " nah"]  # equal lengths: the base model has no length preference
CONTEXTS = [alpaca_prompt(f"Q{i}:") for i in range(8)]


def choice_logprobs(model, tokenizer, context: str) -> list[float]:
    """float64 reference: sum over a choice's tokens of log p(token | context, earlier choice tokens)."""
    out = []
    for choice in CHOICES:
        ctx, full = tokenizer(context)["input_ids"], tokenizer(context + choice)["input_ids"]
        with torch.no_grad():
            logits = model(torch.tensor([full])).logits[0].double()
        logps = torch.log_softmax(logits[:-1], -1)
        out.append(sum(logps[t - 1, full[t]].item() for t in range(len(ctx), len(full))))
    return out


def reference_scores(model, tokenizer, docs) -> dict:
    """acc and acc_norm (log-likelihood per character of the choice) of `docs` under `model`, computed here."""
    acc = norm = 0
    for doc in docs:
        ll = choice_logprobs(model, tokenizer, doc["query"])
        acc += max(range(2), key=lambda j: ll[j]) == doc["gold"]
        norm += max(range(2), key=lambda j: ll[j] / len(CHOICES[j])) == doc["gold"]
    return {"acc": acc / len(docs), "acc_norm": norm / len(docs)}


@pytest.fixture(scope="module")
def known_answer(tmp_path_factory, tokenizer):
    """A tiny base model, a local lm-eval task whose right answer at each context is the choice the base model
    finds less likely (so the base scores acc 0 by construction), and adapters trained towards the right answers
    with DPO (pairs) and SFT (instruction rows)."""
    from conftest import make_model

    root = tmp_path_factory.mktemp("mc")
    base = root / "base"
    model = make_model(tokenizer)
    model.save_pretrained(base)
    tokenizer.save_pretrained(base)
    docs = []
    for i, context in enumerate(CONTEXTS):
        ll = choice_logprobs(model, tokenizer, context)
        docs.append({"query": context, "choices": CHOICES, "gold": int(ll[0] > ll[1]), "instruction": f"Q{i}:"})
    tasks = root / "tasks"
    tasks.mkdir()
    (tasks / "docs.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (tasks / "known_answer.yaml").write_text(yaml.safe_dump({
        "task": "known_answer", "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(tasks / "docs.jsonl")}},
        "output_type": "multiple_choice", "test_split": "test", "doc_to_text": "{{query}}", "doc_to_choice": "{{choices}}",
        "doc_to_target": "gold", "target_delimiter": "",
        "metric_list": [{"metric": m, "aggregation": "mean", "higher_is_better": True} for m in ("acc", "acc_norm")],
    }))  # fmt: skip
    pairs = root / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": d["query"], "chosen": CHOICES[d["gold"]], "rejected": CHOICES[1 - d["gold"]]}) + "\n" for d in docs))
    rows = root / "rows.jsonl"
    rows.write_text("".join(json.dumps({"instruction": d["instruction"], "input": "", "output": CHOICES[d["gold"]]}) + "\n" for d in docs))
    common = ["--model_name_or_path", str(base), "--adapter", "lora", "--adapter_r", "8", "--adapter_targets", "qkvogud",
              "--per_device_train_batch_size", "8", "--max_steps", "20", "--use_cpu", "true", "--report_to", "none",
              "--save_strategy", "no", "--logging_steps", "1", "--seed", "3", "--gradient_checkpointing", "false"]  # fmt: skip
    dpo = run(["--trainer", "dpo", "--train_dataset", str(pairs), "--learning_rate", "2e-2", "--beta", "1", "--output_dir", str(root / "dpo"), *common])
    sft = run(["--trainer", "sft", "--train_dataset", str(rows), "--learning_rate", "2e-2", "--output_dir", str(root / "sft"), *common])
    return {"root": root, "base": str(base), "tasks": str(tasks), "docs": docs, "dpo": str(root / "dpo"), "sft": str(root / "sft"),
            "sft_losses": [r["loss"] for r in sft.state.log_history if "loss" in r], "dpo_trainer": dpo}  # fmt: skip


@pytest.fixture(scope="module")
def scored(known_answer):
    """The base model and both adapters scored in process on the known-answer task."""
    return evaluate_mc_models(known_answer["base"], [known_answer["dpo"], known_answer["sft"]], ["known_answer"],
                              include_path=[known_answer["tasks"]], batch_size=3)  # fmt: skip


def test_known_answer_scores_and_provenance(known_answer, scored, tokenizer):
    """Base: acc 0 by construction; adapters trained towards the right answers: acc 1; every number equals the
    float64 reference computed here; rows carry the training run's provenance."""
    results = scored
    assert results.label.tolist() == ["base", "dpo", "sft-lora"] and set(results["shift"]) == {MC_SHIFT}
    assert results.acc.tolist() == [0.0, 1.0, 1.0] and (results.n == 8).all() and (results.num_fewshot == 0).all()
    base = AutoModelForCausalLM.from_pretrained(known_answer["base"])
    from peft import PeftModel

    for label, path in (("base", None), ("dpo", known_answer["dpo"]), ("sft-lora", known_answer["sft"])):
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(known_answer["base"]), path) if path else base
        row = results[results.label == label].iloc[0]
        assert {"acc": row.acc, "acc_norm": row.acc_norm} == reference_scores(model, tokenizer, known_answer["docs"]), label
    dpo = results[results.label == "dpo"].iloc[0]
    assert dpo.method == "dpo" and dpo.adapter == known_answer["dpo"] and dpo.seed == 3 and dpo.learning_rate == 2e-2
    assert dpo.git_revision and dpo.eval_git_revision and dpo.fingerprint == "mc:known_answer:k0:limitNone"
    assert read_run_record(known_answer["sft"])["method"] == "sft-lora"
    losses = known_answer["sft_losses"]
    assert losses[-1] < losses[0]  # SFT lowered the completions' loss


def test_in_process_numbers_equal_lm_eval_cli(known_answer, scored, tmp_path):
    """lm-eval's own CLI with pretrained=<base>,peft=<adapter> (another batch size) gives the in-process numbers exactly."""
    ours = scored[scored.label == "dpo"].reset_index(drop=True)
    cli = Path(sys.executable).with_name("lm_eval")
    subprocess.run([str(cli), "run", "--model", "hf", "--model_args", f"pretrained={known_answer['base']},peft={known_answer['dpo']},dtype=float32",
                    "--tasks", "known_answer", "--include_path", known_answer["tasks"], "--device", "cpu", "--batch_size", "4",
                    "--output_path", str(tmp_path / "cli")], check=True, capture_output=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})  # fmt: skip
    theirs = json.loads(next((tmp_path / "cli").rglob("results_*.json")).read_text())["results"]["known_answer"]
    assert ours.acc[0] == theirs["acc,none"] and ours.acc_norm[0] == theirs["acc_norm,none"]
    assert ours.acc_stderr[0] == pytest.approx(theirs["acc_stderr,none"])


def test_reprpo_eval_mc_cli_and_report(known_answer, tmp_path):
    """`reprpo-eval mc` writes parquet + CSV; reprpo-report puts MC and preference numbers in one report."""
    out = tmp_path / "mc"
    eval_main(["mc", "--base", known_answer["base"], "--models", known_answer["dpo"], "--tasks", "known_answer",
               "--include_path", known_answer["tasks"], "--limit", "2", "--out", str(out)])  # fmt: skip
    mc = read_table(out.with_suffix(".parquet"))
    assert mc.label.tolist() == ["base", "dpo"] and (mc.n == 2).all() and read_table(out.with_suffix(".csv")).acc.tolist() == mc.acc.tolist()
    preference = tmp_path / "pref"
    eval_main(["--base", known_answer["base"], "--models", known_answer["dpo"], "--shifts", str(_shifts(tmp_path)), "--n", "4",
               "--out", str(preference)])  # fmt: skip
    report = tmp_path / "report"
    from reprpo_trl.cli.report import main as report_main

    report_main([str(preference.with_suffix(".parquet")), str(out.with_suffix(".parquet")), "--out", str(report)])
    text = (report / "report.md").read_text()
    assert "## Preference accuracy beside benchmark accuracy" in text and "benchmarks (average)" in text
    assert "known_answer" in text and (report / "mc.png").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(ValueError, match=r"unknown lm-eval task\(s\) \['no_such_task'\]"):
        eval_main(["mc", "--base", known_answer["base"], "--tasks", "no_such_task", "--out", str(tmp_path / "x")])
    with pytest.raises(FileNotFoundError, match="is not a directory of lm-eval task YAMLs"):
        task_manager([str(tmp_path / "missing")])


def _shifts(tmp_path) -> Path:
    path = tmp_path / "shifts.yaml"
    path.write_text(yaml.safe_dump({"in_domain": ["suite:add_small:test"]}))
    return path


def test_mc_summary_average_and_intervals():
    """Per seed, `average` is the mean over benchmarks (acc_norm over those defining it); 95% t-interval over seeds."""
    rows = []
    for seed, (a, b, norm) in {1: (0.5, 0.7, 0.4), 2: (0.7, 0.9, 0.6)}.items():
        rows += [{"label": "lora", "seed": seed, "shift": MC_SHIFT, "dataset": "t1", "acc": a, "acc_norm": norm},
                 {"label": "lora", "seed": seed, "shift": MC_SHIFT, "dataset": "t2", "acc": b, "acc_norm": float("nan")}]  # fmt: skip
    rows += [{"label": "base", "seed": None, "shift": MC_SHIFT, "dataset": t, "acc": 0.5, "acc_norm": 0.5} for t in ("t1", "t2")]
    summary = mc_summary(pd.DataFrame(rows)).set_index(["metric", "label", "shift"])
    average = summary.loc[("mc_acc", "lora", "average")]
    assert average["mean"] == pytest.approx(0.7) and average.n_seeds == 2
    assert average.ci95 == pytest.approx(12.706204736174698 * math.sqrt(0.02) / math.sqrt(2))  # seeds 0.6, 0.8
    assert summary.loc[("mc_acc_norm", "lora", "average")]["mean"] == pytest.approx(0.5)  # t1 only
    assert ("mc_acc_norm", "lora", "t2") not in summary.index
    assert summary.loc[("mc_gain_pp", "lora", "t2")]["mean"] == pytest.approx(30.0)


def test_load_results_keeps_mc_rows_without_coherence(tmp_path):
    mc = pd.DataFrame([{"label": "base", "seed": None, "shift": MC_SHIFT, "dataset": "t", "fingerprint": "mc:t", "n": 10, "num_fewshot": 0,
                        "acc": 0.5, "acc_norm": 0.5}])  # fmt: skip
    mc.to_parquet(tmp_path / "mc.parquet")
    loaded = load_results([tmp_path / "mc.parquet"])
    assert loaded.acc.tolist() == [0.5]
    paths = write_report(loaded, tmp_path / "report")
    assert (tmp_path / "report" / "report.md").read_text().startswith("# Multiple-choice benchmarks")
    assert [p.name for p in paths] == ["report.md", "mc_summary.csv", "mc.png"]


# --- Commonsense-170K and its offline stand-in ---------------------------------------------------------------


def test_stand_in_is_correct_by_construction_and_split_disjoint():
    for family in FAMILIES:
        test, train = make_mc_docs(family, "test", 30), make_mc_docs(family, "train", 60)
        assert not {(d["question"], tuple(d["choices"])) for d in test} & {(d["question"], tuple(d["choices"])) for d in train}
        assert make_mc_docs(family, "test", 30).to_list() == test.to_list()  # reproducible
        for doc in test:
            labels = doc["labels"]
            assert doc["instruction"].endswith(f"Answer format: {'/'.join(labels)}") and doc["input"] == ""
            assert doc["output"] == f"the correct answer is {labels[doc['gold']]}" and doc["answer"] == labels[doc["gold"]]
    for doc in make_mc_docs("answer4", "test", 20):  # What is a + b?
        a, b = map(int, doc["question"].removeprefix("What is ").removesuffix("?").split(" + "))
        assert doc["choices"][doc["gold"]] == str(a + b) and len(set(doc["choices"])) == 4
    for doc in make_mc_docs("option2", "test", 20):
        assert doc["choices"][doc["gold"]] == str(max(map(int, doc["choices"])))
    for doc in make_mc_docs("solution", "test", 20):
        start, target = map(int, doc["question"].removeprefix("To turn the number ").removesuffix(", you").split(" into "))
        assert doc["choices"][doc["gold"]].startswith("add" if target > start else "subtract")
    golds = [doc["gold"] for doc in make_mc_docs("answer4", "test", 100)]
    assert len(set(golds)) == 4  # the right answer is not always in one place


def test_load_sft_dataset_formats_and_errors(tmp_path):
    data = load_sft_dataset("suite:commonsense:train", n=14)
    assert data.column_names == ["prompt", "completion"] and len(data) == 14
    assert data[0]["prompt"].startswith("Below is an instruction that describes a task.") and data[0]["prompt"].endswith("### Response:\n")
    assert data[0]["completion"].startswith("the correct answer is ")
    assert len(set(make_commonsense("train", 14)["instruction"])) == 14
    path = tmp_path / "c.json"  # LLM-Adapters' file format: a JSON list of instruction rows
    path.write_text(json.dumps([{"instruction": "Is it?", "input": "Context.", "output": "the correct answer is true", "answer": "true"}]))
    row = load_sft_dataset(str(path))[0]
    assert "### Input:\nContext.\n\n### Response:\n" in row["prompt"] and row["completion"] == "the correct answer is true"
    path.write_text(json.dumps([{"instruction": "Is it?", "input": "", "output": " ", "answer": ""}]))
    with pytest.raises(ValueError, match="row 0: field 'output' is empty"):
        load_sft_dataset(str(path))
    path.write_text(json.dumps([{"question": "Is it?"}]))
    with pytest.raises(ValueError, match=r"lacks column\(s\) \['instruction', 'input', 'output'\]"):
        load_sft_dataset(str(path))
    with pytest.raises(ValueError, match="suite:commonsense:<split>"):
        load_sft_dataset("suite:add_small:train")


def test_commonsense_170k_hub_spec(monkeypatch):
    """`commonsense_170k[::split]` names the hub copy; the rows load through datasets.load_dataset (stubbed here)."""
    from reprpo_trl.data import loading

    calls = []
    monkeypatch.setattr(loading, "load_dataset", lambda *a, **k: calls.append((a, k)) or make_commonsense("test", 3))
    assert len(load_sft_dataset("commonsense_170k::train[:-120]")) == 3
    assert calls == [(("zwhe99/commonsense_170k", None), {"split": "train[:-120]"})]


def test_offline_tasks_are_registered():
    manager = task_manager()
    check_tasks(["cs_suite", "cs_suite_instruct", "cs_suite_answer5", "boolq", "commonsense_qa"], manager)
    from reprpo_trl.mc_tasks.utils import load

    docs = load("ending4", n=5, fewshot_pool=3)
    assert len(docs["test"]) == 5 and len(docs["train"]) == 3
    assert docs["test"][0]["instruct_prompt"].endswith("### Response:\nthe correct answer is")


# --- recipes and the sweep --------------------------------------------------------------------------------------

PEFT_RECIPES = sorted((Path(__file__).parents[1] / "recipes" / "peft_baselines").glob("*.yaml"))


@pytest.mark.parametrize("recipe", PEFT_RECIPES, ids=[r.stem for r in PEFT_RECIPES])
def test_peft_baselines_recipes(recipe):
    """The study's hyperparameters, and adapters that reach GPT-Neo's attn.attention.q_proj/v_proj."""
    from peft import get_peft_model
    from transformers import GPTNeoConfig, GPTNeoForCausalLM

    from reprpo_trl.adapters import build_peft_config
    from reprpo_trl.train import parse_args

    run_args, train_args, model_args, adapter_args = parse_args(["--config", str(recipe), "--use_cpu", "true"])
    method = recipe.stem.rsplit("_", 1)[1]
    assert run_args.trainer == "sft" and adapter_args.adapter == method and train_args.num_train_epochs == 1
    if recipe.stem.startswith("gpt_neo"):
        assert model_args.model_name_or_path == "EleutherAI/gpt-neo-1.3B" and run_args.train_dataset.startswith("commonsense_170k")
        assert train_args.learning_rate == {"hira": 5e-5, "lora": 5e-5, "ia3": 1e-5, "full": 1e-5}[method]
        assert train_args.gradient_checkpointing and train_args.fp16 and train_args.seed == 36
        rows = {"hira": 256, "lora": 256, "ia3": 32, "full": 256}[method]
        assert train_args.per_device_train_batch_size * train_args.gradient_accumulation_steps == rows
    else:
        assert model_args.model_name_or_path == "embedded/SmolLM2-135M-Instruct" and run_args.train_dataset == "suite:commonsense:train"
    if method in ("hira", "lora"):
        assert adapter_args.adapter_r == 64
    config = build_peft_config(adapter_args)
    if config is None:
        return
    tiny = GPTNeoForCausalLM(GPTNeoConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, attention_types=[[["global", "local"], 1]],
                                          max_position_embeddings=64, window_size=8))  # fmt: skip
    trainable = {n for n, p in get_peft_model(tiny, config).named_parameters() if p.requires_grad}
    assert trainable and all(".attn.attention.q_proj." in n or ".attn.attention.v_proj." in n for n in trainable)
    assert {n.split(".attn.attention.")[1].split(".")[0] for n in trainable} == {"q_proj", "v_proj"}


def test_sweep_trains_sft_and_ends_in_the_mc_table(tmp_path, known_answer):
    """A grid of one SFT recipe x 2 seeds, no learning_rates (the recipe's), scored with mc_tasks: report table."""
    from reprpo_trl import sweep
    from reprpo_trl.cli.sweep import main as sweep_main

    config = {
        "output_dir": str(tmp_path / "sweep"),
        "methods": {"lora": str(PEFT_RECIPES[0].with_name("embedded_lora.yaml"))},
        "seeds": [1, 2],
        "train_overrides": {"model_name_or_path": known_answer["base"], "train_dataset": str(known_answer["root"] / "rows.jsonl"),
                            "max_steps": 2, "use_cpu": True, "report_to": "none"},  # fmt: skip
        "mc_tasks": ["known_answer"],
        "mc_include_path": [known_answer["tasks"]],
        "mc_limit": 4,
    }
    grid = tmp_path / "grid.yaml"
    grid.write_text(yaml.safe_dump(config))
    sweep_main(["--config", str(grid)])
    report = (tmp_path / "sweep" / "report" / "report.md").read_text()
    assert report.startswith("# Multiple-choice benchmarks") and "No selection: each method trains at one learning rate (lora → lr 0.0005)" in report
    summary = pd.read_csv(tmp_path / "sweep" / "report" / "mc_summary.csv")
    row = summary[(summary.metric == "mc_acc") & (summary.label == "lora") & (summary["shift"] == "known_answer")].iloc[0]
    assert row.n_seeds == 2 and not math.isnan(row.ci95)
    loaded = sweep.load_grid(str(grid))
    results = pd.concat([pd.read_parquet(sweep.result_path(r.dir, loaded)) for r in sweep.plan(loaded)])
    assert sorted(results.seed) == [1, 2] and set(results.method) == {"sft-lora"} and (results.n == 4).all()
    for bad, message in [({"mc_tasks": []}, "evaluates nothing"), ({"learning_rates": [1e-4, 1e-3]}, "needs shifts with a 'validation' shift"),
                         ({"mc_tasks": ["nope"]}, r"unknown lm-eval task\(s\) \['nope'\]")]:  # fmt: skip
        grid.write_text(yaml.safe_dump({**config, **bad}))
        with pytest.raises(ValueError, match=message):
            sweep.load_grid(str(grid))


@pytest.mark.parametrize("adapter", ["lora", "ia3", "hira", "prompt", "prefix", "full"])
def test_sft_trains_every_adapter(adapter, known_answer, tmp_path):
    trainer = run(["--trainer", "sft", "--model_name_or_path", known_answer["base"], "--train_dataset", str(known_answer["root"] / "rows.jsonl"),
                   "--adapter", adapter, "--adapter_r", "4", "--adapter_virtual_tokens", "4", "--adapter_targets", "qv",
                   "--max_steps", "2", "--per_device_train_batch_size", "4", "--gradient_checkpointing", "false", "--use_cpu", "true",
                   "--report_to", "none", "--logging_steps", "1", "--output_dir", str(tmp_path)])  # fmt: skip
    assert all(math.isfinite(r["loss"]) for r in trainer.state.log_history if "loss" in r)
    assert (tmp_path / ("model.safetensors" if adapter == "full" else "adapter_model.safetensors")).exists()
    assert read_run_record(tmp_path)["method"] == f"sft-{adapter}"
    if adapter != "lora":
        return
    with pytest.raises(ValueError, match="trainer sft trains on the Alpaca prompt"):
        run(["--trainer", "sft", "--model_name_or_path", known_answer["base"], "--train_dataset", str(known_answer["root"] / "rows.jsonl"),
             "--conversational", "true", "--use_cpu", "true", "--output_dir", str(tmp_path / "x")])  # fmt: skip
