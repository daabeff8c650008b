"""Bad input through the command line: one line `error: ...` naming the file, row, field or key, exit code 2, no
traceback, and no output directory left behind. Most cases are refused before any model loads."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from reprpo_trl import cli, evaluate, evaluate_icl, evaluate_mc, train
from reprpo_trl.cli import demo, eval, icl_eval, report, sweep
from reprpo_trl.cli import train as train_cli
from reprpo_trl.data import load_preference_dataset
from reprpo_trl.errors import InputError
from reprpo_trl.icl import load_icl_task

RECIPES = Path(__file__).parents[1] / "recipes"
MAINS = {"train": train_cli.main, "demo": demo.main, "eval": eval.main, "icl-eval": icl_eval.main,
         "report": report.main, "sweep": sweep.main, "reprpo": cli.main}


def _pairs(n=10, **row7):
    rows = [{"prompt": f"Question {i}?", "chosen": f" {30 + i}", "rejected": f" {31 + i}"} for i in range(n)]
    rows[7].update(row7)
    return rows


def _jsonl(path, rows):
    path.write_text("\n".join(json.dumps(row) for row in rows) + "\n")


def _messages(content="a", role="assistant"):
    return [{"role": "user", "content": "hi"}], [{"role": role, "content": content}], [{"role": role, "content": "b"}]


@pytest.fixture(scope="module")
def d(tmp_path_factory):
    """A directory of bad (and a few good) inputs, and a tiny model saved at d/model."""
    from conftest import save_tiny

    d = tmp_path_factory.mktemp("bad_input")
    save_tiny(d / "model")
    pd.DataFrame(_pairs()).to_csv(d / "numbers.csv", index=False)  # " 30" ... : valid, looks like numbers
    pd.DataFrame(_pairs(chosen="")).to_csv(d / "empty_row7.csv", index=False)
    _jsonl(d / "null_row7.jsonl", _pairs(chosen=None))
    _jsonl(d / "dict_row7.jsonl", _pairs(chosen={"text": "x"}))
    (d / "empty.jsonl").write_text("")
    (d / "empty.json").write_text("[]\n")
    (d / "header.csv").write_text("prompt,chosen,rejected\n")
    pd.DataFrame({f: pd.Series([], dtype=str) for f in ("prompt", "chosen", "rejected")}).to_parquet(d / "zero.parquet")
    (d / "data.txt").write_text("prompt,chosen,rejected\n")
    prompt, chosen, rejected = _messages()
    chat = [{"prompt": prompt, "chosen": chosen, "rejected": rejected} for _ in range(10)]
    _jsonl(d / "chat_strings.jsonl", [dict(r, chosen=["a", "b"]) if i == 7 else r for i, r in enumerate(chat)])
    _jsonl(d / "chat_no_role.jsonl", [dict(r, chosen=[{"content": "a"}]) if i == 7 else r for i, r in enumerate(chat)])
    _jsonl(d / "chat_no_content.jsonl", [dict(r, chosen=[{"role": "assistant"}]) if i == 7 else r for i, r in enumerate(chat)])
    icl = [{"query": f"{i} + 1 =", "answer": str(i + 1)} for i in range(80)]
    pd.DataFrame(icl).to_csv(d / "icl_numbers.csv", index=False)  # numeric answers: valid
    pd.DataFrame([dict(r, answer="") if i == 7 else r for i, r in enumerate(icl)]).to_csv(d / "icl_row7.csv", index=False)
    recipes = {
        "list": [{"trainer": "dpo"}],
        "scalar": "dpo",
        "alpha_list": {"trainer": "reprpo", "alpha": [1, 2]},
        "alpha_text": {"trainer": "reprpo", "alpha": "abc"},
        "bad_loss": {"trainer": "reprpo", "hidden_loss": "foo"},
        "regex": {"trainer": "reprpo", "collection": "side", "side_modules": "q_proj(", "layers": "1"},
        "dpo_alpha": {"trainer": "dpo", "alpha": 1.0},
        "typo": {"trainer": "dpo", "learnign_rate": 1e-4},
        "adapter_typo": {"trainer": "dpo", "adapter": {"type": "lora", "targtes": "qv"}},
        "ppo": {"trainer": "ppo"},
        "lora_key": {"trainer": "dpo", "lora_alpha": 16},
    }
    for name, recipe in recipes.items():
        (d / f"{name}.yaml").write_text(yaml.safe_dump(recipe))
    (d / "broken.yaml").write_text("trainer: [dpo\n")
    shifts = {"validation": ["suite:add_small:validation"], "in_domain": ["suite:add_small:test"]}
    (d / "shifts.yaml").write_text(yaml.safe_dump(shifts))
    (d / "shifts_missing.yaml").write_text(yaml.safe_dump({**shifts, "in_domain": [str(d / "nope.jsonl")]}))
    (d / "not_a_model").mkdir()
    grid = {"output_dir": str(d / "out"), "seeds": [1], "learning_rates": [1e-4], "shifts": str(d / "shifts.yaml"),
            "methods": {"dpo": str(RECIPES / "dpo.yaml"), "bad": str(d / "ppo.yaml")},
            "train_overrides": {"model_name_or_path": str(d / "model"), "max_steps": 1, "use_cpu": True}}  # fmt: skip
    (d / "grid_trainer.yaml").write_text(yaml.safe_dump(grid))
    (d / "grid_key.yaml").write_text(yaml.safe_dump({**grid, "methods": {**grid["methods"], "bad": str(d / "typo.yaml")}}))
    (d / "grid_list.yaml").write_text(yaml.safe_dump([grid]))
    (d / "grid_policy.yaml").write_text(yaml.safe_dump({**grid, "code_revision": "always"}))
    return d


TRAIN = ["--model_name_or_path", "{d}/model", "--use_cpu", "true", "--report_to", "none", "--max_train_samples", "8",
         "--output_dir", "{d}/out"]  # fmt: skip
DPO = ["--trainer", "dpo", *TRAIN]
EVAL = ["--base", "{d}/model", "--shifts", "{d}/shifts.yaml", "--out", "{d}/out/results", "--n", "4"]
ICL_EVAL = ["--base", "{d}/model", "--task", "suite:arith", "--out", "{d}/out/results", "--n", "4"]

CASES = {  # id -> (command, argv, what the one-line message must say)
    # data files
    "csv-row-7-empty": ("train", [*DPO, "--train_dataset", "{d}/empty_row7.csv"], r"'\S*empty_row7.csv' row 7: field 'chosen' has no value"),
    "json-row-7-null": ("train", [*DPO, "--train_dataset", "{d}/null_row7.jsonl"], r"null_row7.jsonl' row 7: field 'chosen' has no value"),
    "json-row-7-mapping": ("train", [*DPO, "--train_dataset", "{d}/dict_row7.jsonl"], r"dict_row7.jsonl' row 7: field 'chosen' is a dict where other rows hold text"),
    "empty-jsonl": ("train", [*DPO, "--train_dataset", "{d}/empty.jsonl"], r"dataset '\S*empty.jsonl' is empty"),
    "empty-json-list": ("train", [*DPO, "--train_dataset", "{d}/empty.json"], r"dataset '\S*empty.json' is empty"),
    "header-only-csv": ("train", [*DPO, "--train_dataset", "{d}/header.csv"], r"dataset '\S*header.csv' is empty"),
    "zero-row-parquet": ("train", [*DPO, "--train_dataset", "{d}/zero.parquet"], r"dataset '\S*zero.parquet' is empty"),
    "max-train-samples-0": ("train", [*DPO, "--max_train_samples", "0"], r"dataset 'suite:add_small:train' is empty with max_train_samples=0"),
    "max-eval-samples-0": ("train", [*DPO, "--eval_dataset", "suite:add_small:test", "--max_eval_samples", "0"],
                           r"dataset 'suite:add_small:test' is empty with max_eval_samples=0"),  # fmt: skip
    "chat-list-of-strings": ("train", [*DPO, "--train_dataset", "{d}/chat_strings.jsonl"], r"chat_strings.jsonl' row 7: field 'chosen' message 0 is a str"),
    "chat-no-role": ("train", [*DPO, "--train_dataset", "{d}/chat_no_role.jsonl"], r"chat_no_role.jsonl' row 7: field 'chosen' message 0 has no 'role'"),
    "chat-no-content": ("train", [*DPO, "--train_dataset", "{d}/chat_no_content.jsonl"], r"row 7: field 'chosen' message 0 has no 'content'"),
    "missing-data-file": ("train", [*DPO, "--train_dataset", "{d}/nope.jsonl"], r"dataset '\S*nope.jsonl': no such file"),
    "unknown-suffix": ("train", [*DPO, "--train_dataset", "{d}/data.txt"], r"data.txt': cannot read .txt files; the readable suffixes are .parquet, .json, .jsonl, .csv"),
    "icl-file-empty": ("train", ["--trainer", "ia2", *TRAIN, "--train_dataset", "{d}/header.csv"], r"dataset '\S*header.csv' is empty"),
    "icl-row-7-empty": ("train", ["--trainer", "ia2", *TRAIN, "--train_dataset", "{d}/icl_row7.csv", "--demo_pool_size", "4"],
                        r"ICL dataset '\S*icl_row7.csv' row 7: field 'answer' is empty"),  # fmt: skip
    # paths
    "missing-model-dir": ("train", [*DPO, "--model_name_or_path", "./no/such/model"], r"model './no/such/model': no such directory"),
    "missing-init-adapter": ("train", ["--trainer", "ia2", *TRAIN, "--ia2_method", "a2t", "--init_adapter", "{d}/nope",
                                      "--train_dataset", "suite:arith", "--demo_pool_size", "4"],
                             r"init_adapter '\S*nope': no such directory"),  # fmt: skip
    "missing-recipe": ("train", ["--config", "{d}/nope.yaml", *TRAIN], r"recipe '\S*nope.yaml': no such file"),
    # recipes and flags
    "recipe-is-a-list": ("train", ["--config", "{d}/list.yaml", *TRAIN], r"recipe '\S*list.yaml' is a YAML list; it must be a mapping"),
    "recipe-is-a-scalar": ("train", ["--config", "{d}/scalar.yaml", *TRAIN], r"recipe '\S*scalar.yaml' is a YAML str"),
    "recipe-not-yaml": ("train", ["--config", "{d}/broken.yaml", *TRAIN], r"recipe '\S*broken.yaml' is not valid YAML"),
    "list-for-a-number": ("train", ["--config", "{d}/alpha_list.yaml", *TRAIN], r"alpha_list.yaml': alpha: \[1, 2\] is a list, but alpha takes one float"),
    "list-for-a-number-config=": ("train", ["--config={d}/alpha_list.yaml", *TRAIN], r"alpha_list.yaml': alpha: \[1, 2\] is a list"),
    "text-for-a-number": ("train", ["--config", "{d}/alpha_text.yaml", *TRAIN], r"argument --alpha: invalid float value: 'abc'; fix it in the recipe or on the command line"),
    "bad-choice": ("train", ["--config", "{d}/bad_loss.yaml", *TRAIN], r"hidden_loss='foo': choose one of"),
    "invalid-side-regex": ("train", ["--config", "{d}/regex.yaml", *TRAIN], r"side_modules: 'q_proj\(' is not a valid regular expression"),
    "lora-target-matches-nothing": ("train", [*DPO, "--adapter", "lora", "--adapter_targets", "q_proj,fc1"],
                                    r"adapter_targets='q_proj,fc1': fc1 matches no module of the model; .*linear modules: down_proj, .*q_proj"),  # fmt: skip
    "single-target-name": ("train", [*DPO, "--adapter", "lora", "--adapter_targets", "fc1"], r"adapter_targets='fc1': fc1 matches no module"),
    "layer-out-of-range": ("train", ["--trainer", "reprpo", *TRAIN, "--layers", "9"], r"layer spec '9' selects layers \[9\], but the model has 4"),
    "misspelled-key": ("train", ["--config", "{d}/typo.yaml", *TRAIN], r"typo.yaml': unknown key learnign_rate; did you mean learning_rate\?"),
    "misspelled-flag": ("train", [*DPO, "--learnign_rate", "1e-4"], r"unknown flag --learnign_rate; did you mean --learning_rate\?"),
    "misspelled-flag=": ("train", [*DPO, "--learnign_rate=1e-4"], r"unknown flag --learnign_rate; did you mean --learning_rate\?"),
    "key-of-another-trainer": ("train", ["--config", "{d}/dpo_alpha.yaml", *TRAIN], r"alpha is a field of trainer\(s\) reprpo.*; this recipe uses trainer dpo"),
    "flag-of-another-trainer": ("train", [*DPO, "--alpha", "2"], r"--alpha is a field of trainer\(s\) reprpo.*; this run uses trainer dpo"),
    "trainer=-form": ("train", ["--config", str(RECIPES / "reprpo_mse.yaml"), "--trainer=dpo", *TRAIN], r"this recipe uses trainer dpo"),
    "unknown-trainer": ("train", ["--trainer", "ppo", *TRAIN], r"trainer='ppo': choose one of \['dpo'"),
    "adapter-section-typo": ("train", ["--config", "{d}/adapter_typo.yaml", *TRAIN], r"adapter section: unknown key 'targtes'; did you mean 'targets'\?"),
    "recipe-without---config": ("train", [*DPO, "{d}/typo.yaml"], r"unexpected argument '\S*typo.yaml'; did you mean --config"),
    "demo-eval-samples": ("demo", [*DPO, "--eval_samples=0"], r"--eval_samples 0: give a positive number of pairs per dataset"),
    "demo-recipe-key": ("demo", ["--config", "{d}/typo.yaml", *TRAIN], r"typo.yaml': unknown key learnign_rate; did you mean"),
    # evaluation, reports, sweeps
    "eval-missing-model": ("eval", [*EVAL, "--models", "{d}/model", "{d}/nope"], r"model '\S*nope': no such directory"),
    "eval-not-a-model-dir": ("eval", [*EVAL, "--models", "{d}/not_a_model"], r"not_a_model' holds neither adapter_config.json"),
    "eval-label-count": ("eval", [*EVAL, "--models", "{d}/model", "--labels", "a", "b"], r"got 2 labels for 1 models"),
    "eval-missing-shift-spec": ("eval", [*EVAL, "--shifts", "{d}/nope.yaml"], r"shift spec '\S*nope.yaml': no such file"),
    "eval-shift-dataset-missing": ("eval", [*EVAL, "--shifts", "{d}/shifts_missing.yaml"], r"dataset '\S*nope.jsonl': no such file"),
    "icl-eval-missing-model": ("icl-eval", [*ICL_EVAL, "--models", "{d}/nope"], r"model '\S*nope': no such directory"),
    "report-not-results": ("report", ["{d}/numbers.csv", "--out", "{d}/out"], r"numbers.csv' is not a reprpo-eval results table: it lacks column\(s\) \['label', 'shift'"),
    "report-missing-file": ("report", ["{d}/nope.parquet", "--out", "{d}/out"], r"results file '\S*nope.parquet': no such file"),
    "report-suffix": ("report", ["{d}/data.txt", "--out", "{d}/out"], r"data.txt': expected .parquet or .csv"),
    "sweep-unknown-trainer": ("sweep", ["--config", "{d}/grid_trainer.yaml"], r"grid_trainer.yaml', method 'bad' \(\S*ppo.yaml\): trainer='ppo'"),
    "sweep-bad-key": ("sweep", ["--config", "{d}/grid_key.yaml"], r"method 'bad' \(\S*typo.yaml\): recipe .*unknown key learnign_rate"),
    "sweep-grid-is-a-list": ("sweep", ["--config", "{d}/grid_list.yaml"], r"sweep grid '\S*grid_list.yaml' is a YAML list"),
    "sweep-code-policy": ("sweep", ["--config", "{d}/grid_policy.yaml"], r"code_revision 'always': choose one of \('record', 'match'\)"),
    # keys of TRL this command does not use; packaged recipes; the suite's split sizes; the one command
    "lora-flag": ("train", [*DPO, "--lora_r", "8"], r"lora_r: use_peft/lora_\* are not used here: describe the adapter in the recipe's `adapter:` section"),
    "lora-recipe-key": ("train", ["--config", "{d}/lora_key.yaml", *TRAIN], r"lora_key.yaml': lora_alpha: use_peft/lora_\* are not used here"),
    "quantized-loading": ("train", [*DPO, "--load_in_4bit", "true"], r"load_in_4bit: quantized loading is not part of reprpo train"),
    "pkg-name-missing": ("train", ["--config", "pkg:nope.yaml", *TRAIN], r"pkg:nope.yaml: the package ships no such file; `reprpo recipes list` lists them"),
    "recipe-path-hint": ("train", ["--config", "{d}/recipes/dpo.yaml", *TRAIN], r"no such file; the package ships it as pkg:dpo.yaml"),
    "suite-split-smaller-than-n": ("train", [*DPO, "--train_dataset", "suite:sub_small:validation", "--max_train_samples", "300"],
                                   r"suite:sub_small:validation has 234 pairs, fewer than the 300 asked for"),  # fmt: skip
    "suite-split-too-large-to-take-whole": ("train", ["--trainer", "dpo", "--model_name_or_path", "{d}/model", "--use_cpu", "true",
                                                      "--output_dir", "{d}/out", "--train_dataset", "suite:add_large:train"],
                                            r"suite:add_large:train is too large to take whole; give a number of pairs"),  # fmt: skip
    "unknown-command": ("reprpo", ["trian", "--config", "x.yaml"], r"unknown command 'trian'; did you mean `reprpo train`\?"),
}  # fmt: skip


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_refused_in_one_line_with_exit_code_2_and_nothing_written(case, d, capsys, monkeypatch):
    command, argv, message = CASES[case]
    for module in (evaluate, evaluate_icl, evaluate_mc):  # each holds its own name for it (imported here, unpatched)
        monkeypatch.setattr(module, "load_base", lambda *a, **k: pytest.fail("a model was evaluated before the check"))
    monkeypatch.delenv("REPRPO_DEBUG", raising=False)
    with pytest.raises(SystemExit) as exit_info:
        MAINS[command]([arg.format(d=d) for arg in argv])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert exit_info.value.code == 2 and len(errors) == 1, err
    assert "Traceback" not in err
    assert re.search(message, errors[0]), errors[0]
    assert not (d / "out").exists()


def test_debug_shows_the_exception(d, monkeypatch):
    argv = ["--config", str(d / "list.yaml"), "--output_dir", str(d / "out")]
    with pytest.raises(InputError, match="is a YAML list"):
        train_cli.main([*argv, "--debug"])
    with pytest.raises(InputError, match="is a YAML list"):  # through `reprpo train`, two wrappers deep
        cli.main(["train", *argv, "--debug"])
    monkeypatch.setenv("REPRPO_DEBUG", "1")
    with pytest.raises(InputError, match="is a YAML list"):
        train_cli.main(argv)


def test_command_line_process_prints_one_line_and_exits_2(d):
    """The real process: `python -m reprpo_trl.train` (what accelerate launch runs)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")])}
    env.pop("REPRPO_DEBUG", None)
    done = subprocess.run([sys.executable, "-m", "reprpo_trl.train", "--config", str(d / "dpo_alpha.yaml"), "--output_dir",
                           str(d / "out")], capture_output=True, text=True, env=env)  # fmt: skip
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("error: recipe") and not (d / "out").exists()


def test_text_that_looks_like_numbers_is_read_as_text(d):
    pairs = load_preference_dataset(str(d / "numbers.csv"))
    assert pairs[7]["chosen"] == " 37" and pairs[7]["rejected"] == " 38"
    examples, pool = load_icl_task(str(d / "icl_numbers.csv"), pool_size=4)
    assert examples[7]["answer"] == "8" and len(pool) == 4


def test_flag_equals_forms_parse_like_spaced_forms():
    recipe = str(RECIPES / "reprpo_mse.yaml")
    spaced = train.parse_args(["--config", recipe, "--learning_rate", "3e-5", "--use_cpu", "true"])
    joined = train.parse_args([f"--config={recipe}", "--learning_rate=3e-5", "--use_cpu=true"])
    assert type(joined[1]) is type(spaced[1]) and joined[1].learning_rate == spaced[1].learning_rate == 3e-5
    assert joined[1].hidden_loss == spaced[1].hidden_loss == "mse" and joined[3].adapter == spaced[3].adapter == "lora"
    dpo = train.parse_args([f"--config={RECIPES / 'dpo.yaml'}", "--trainer=dpo", "--use_cpu", "true"])
    assert type(dpo[1]).__name__ == "DPOConfig" and dpo[0].trainer == "dpo"
