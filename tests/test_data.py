"""The offline suite, the hub/file loader on local files, row validation and the truncation check."""

from pathlib import Path

import pandas as pd
import pytest
from datasets import Dataset

from reprpo_trl.data import (
    FAMILIES,
    SUITE_SHIFTS,
    check_truncation,
    load_preference_dataset,
    make_family,
    to_conversational,
    truncated_fraction,
)
from reprpo_trl.errors import InputError


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_suite_families_are_large_deterministic_and_split(family):
    train, test = make_family(family, "train", n=500), make_family(family, "test", n=500)
    assert len(train) == len(test) == 500
    assert make_family(family, "test", n=500)[:] == test[:]
    assert make_family(family, "test", n=50, seed=1)[:] != test.select(range(50))[:]
    assert not set(train["prompt"]) & set(test["prompt"])
    assert all(c != r for c, r in zip(test["chosen"], test["rejected"]))


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_validation_split_is_disjoint_from_train_and_test(family):
    prompts = {split: set(make_family(family, split, n=100)["prompt"]) for split in ("train", "validation", "test")}
    assert not prompts["validation"] & (prompts["train"] | prompts["test"])
    with pytest.raises(ValueError, match="suite split 'dev'"):
        make_family(family, "dev", n=5)


def test_suite_answers_are_right():
    for row in make_family("add_small", "test", n=100):
        a, b = (int(x) for x in row["prompt"].split("What is ")[1].split("?")[0].split(" + "))
        assert int(row["chosen"]) == a + b != int(row["rejected"])


def test_suite_shifts_name_real_families():
    for specs in SUITE_SHIFTS.values():
        for spec in specs:
            assert len(load_preference_dataset(spec, n=5)) == 5


def test_unknown_family():
    with pytest.raises(ValueError, match="unknown suite family 'mul'"):
        make_family("mul")


def test_conversational_form():
    row = to_conversational(make_family("capitals", "test", n=1)[0])
    assert row["prompt"][0]["role"] == "user" and row["prompt"][0]["content"].endswith("?") or row["prompt"][0]["content"].endswith(".")
    assert row["chosen"][0]["role"] == "assistant" and not row["chosen"][0]["content"].startswith(" ")


def write_pairs(path, rows):
    pd.DataFrame(rows).to_parquet(path)
    return str(path)


def test_local_parquet(tmp_path):
    rows = make_family("add_small", "test", n=20).to_list()
    ds = load_preference_dataset(write_pairs(tmp_path / "pairs.parquet", rows), n=10)
    assert ds[:] == Dataset.from_list(rows[:10])[:]


def test_hub_style_repo_with_configs(tmp_path):
    """The hub code path (`load_dataset(id, config, split=...)`), on a local repo laid out like
    wassname/genies_preferences: one config per family, prompt/chosen/rejected columns."""
    repo = tmp_path / "genies_preferences"
    (repo / "math").mkdir(parents=True)
    rows = make_family("add_word", "test", n=12).to_list()
    write_pairs(repo / "math" / "test.parquet", rows)
    write_pairs(repo / "math" / "train.parquet", rows[:4])
    (repo / "README.md").write_text(
        "---\nconfigs:\n- config_name: math\n  data_files:\n  - split: train\n    path: math/train.parquet\n"
        "  - split: test\n    path: math/test.parquet\n---\n"
    )
    assert len(load_preference_dataset(f"{repo}:math:test")) == 12
    assert len(load_preference_dataset(f"{repo}:math")) == 4  # split defaults to train
    # the shipped GENIES shift specs slice the training split into train and validation
    assert load_preference_dataset(f"{repo}:math:test[:75%]")[:] == Dataset.from_list(rows[:9])[:]
    assert load_preference_dataset(f"{repo}:math:test[75%:]")[:] == Dataset.from_list(rows[9:])[:]


@pytest.mark.parametrize(
    "rows,message",
    [
        ([{"prompt": "q", "chosen": "a"}], r"lacks column\(s\) \['rejected'\]"),
        ([{"prompt": "q", "chosen": "a", "rejected": "b"}, {"prompt": "q", "chosen": " ", "rejected": "b"}], "row 1: field 'chosen' is empty"),
        ([{"prompt": "q", "chosen": "a", "rejected": "a"}], "row 0: chosen equals rejected"),
    ],
)
def test_bad_rows_are_named(tmp_path, rows, message):
    path = write_pairs(tmp_path / "bad.parquet", rows)
    with pytest.raises(ValueError, match=message) as err:
        load_preference_dataset(path)
    assert "bad.parquet" in str(err.value)


def test_missing_file(tmp_path):
    with pytest.raises(InputError, match="nope.parquet'?: no such file"):
        load_preference_dataset(str(tmp_path / "nope.parquet"))


def test_truncation_fraction_and_refusal(tokenizer):
    rows = [{"prompt": "Q" * 10, "chosen": " a", "rejected": " b"}] * 3 + [{"prompt": "Q" * 40, "chosen": " a", "rejected": " bb"}]
    ds = Dataset.from_list(rows)
    assert truncated_fraction(ds, tokenizer, 20) == 0.25  # char tokenizer: 10 + 2 + EOS fits, 40 + 3 + EOS does not
    assert truncated_fraction(ds, tokenizer, None) == 0.0
    assert check_truncation(ds, tokenizer, 20, 0.3, "mine") == 0.25
    with pytest.raises(ValueError, match=r"dataset 'mine': 25.0% of 4 pairs exceed max_length=20"):
        check_truncation(ds, tokenizer, 20, 0.1, "mine")


def test_one_default_suite_seed_everywhere():
    import inspect

    from reprpo_trl import evaluate, evaluate_icl, sweep
    from reprpo_trl.cli import eval as eval_cli
    from reprpo_trl.cli import icl_eval
    from reprpo_trl.data import SUITE_SEED, load_preference_dataset
    from reprpo_trl.icl import load_icl_task
    from reprpo_trl.train import RunArguments

    defaults = [RunArguments().suite_seed, eval_cli.SUITE_SEED, sweep.Grid.__dataclass_fields__["eval_seed"].default,
                eval_cli.parser().get_default("suite_seed"), icl_eval.parser().get_default("suite_seed"),
                *(inspect.signature(f).parameters["seed"].default for f in (load_preference_dataset, load_icl_task, make_family,
                                                                             evaluate.evaluate_models))]  # fmt: skip
    assert defaults == [SUITE_SEED] * len(defaults) == [0] * len(defaults)
    assert inspect.signature(evaluate_icl.evaluate_icl_models).parameters["suite_seed"].default == SUITE_SEED


def test_split_sizes_are_what_docs_data_md_says():
    """A spec without n is the whole split, of the size the table in docs/data.md gives; the families too large
    to take whole are refused without n."""
    import re

    table = (Path(__file__).parents[1] / "docs" / "data.md").read_text()
    rows = re.findall(r"^\| `(\w+)` \| (\d+) \| (\d+) \| (\d+) \|$", table, flags=re.M)
    assert [name for name, *_ in rows] == ["add_small", "sub_small", "capitals"]
    for name, *sizes in rows:
        for split, size in zip(("train", "validation", "test"), sizes):
            assert len(make_family(name, split)) == int(size)
    with pytest.raises(ValueError, match="too large to take whole; give a number of pairs"):
        make_family("add_word", "test")
