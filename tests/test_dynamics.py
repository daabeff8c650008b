"""Training dynamics: weight statistics against float64 references, the effective update of each adapter against
peft's forward, the callbacks (tables written, training left bit-identical), the LLC on a known answer, and the
HMM on planted phases."""

import json

import numpy as np
import pandas as pd
import pytest
import torch
from peft import HiraConfig, IA3Config, LoraConfig, get_peft_model

from conftest import make_model
from reprpo_trl import ReprPOConfig, ReprPOTrainer
from reprpo_trl.dynamics import LLCArguments, LLCCallback, WeightStatsCallback, linear_regression_llc, weight_statistics
from reprpo_trl.dynamics import hmm
from reprpo_trl.cli.dynamics import main as dynamics_cli
from reprpo_trl.dynamics.llc import trace_diagnostics
from reprpo_trl.dynamics.matrices import trained_matrices
from reprpo_trl.dynamics.phases import FitArguments, fit_runs
from reprpo_trl.dynamics.stats import MATRIX_STATS, dense_stats, diagonal_stats, low_rank_stats
from reprpo_trl.errors import InputError


def reference_stats(m: np.ndarray) -> dict:
    """The statistics of one matrix (docs/methods.md), straight from the definitions in float64 numpy."""
    sigma = np.linalg.svd(m, compute_uv=False)
    kept = np.where(sigma < 1e-5, 0.0, sigma)
    l1, l2 = np.abs(m).sum(), np.sqrt((m**2).sum())
    trace, spectral = np.trace(m), sigma.max()
    return {"l1": l1, "l2": l2, "trace": trace, "spectral": spectral, "code_sparsity": l1 / l2,
            "computational_sparsity": trace / spectral, "sv_mean": kept.mean(), "sv_var": kept.var(),
            "w_mean": m.mean(), "w_median": np.sort(m.ravel())[(m.size - 1) // 2], "w_var": m.var()}  # fmt: skip


def assert_stats_close(ours: dict, reference: dict, rtol=1e-9, atol=1e-12):
    for key, value in reference.items():
        assert ours[key] == pytest.approx(value, rel=rtol, abs=atol), key


@pytest.mark.parametrize("shape", [(7, 3, 5), (4, 2, 9), (6, 6, 6)])
def test_low_rank_and_dense_stats_match_float64_reference(shape):
    m, r, n = shape
    g = torch.Generator().manual_seed(0)
    u, v = torch.randn(m, r, generator=g, dtype=torch.float64), torch.randn(r, n, generator=g, dtype=torch.float64)
    reference = reference_stats((u @ v).numpy())
    assert_stats_close(low_rank_stats(u, v), reference)  # singular values from the r x r core, padded with zeros
    assert_stats_close(dense_stats(u @ v), reference)


def test_singular_values_below_floor_count_as_zero():
    m = np.diag([3.0, 2e-6, 1.0])
    ours = dense_stats(torch.tensor(m))
    assert ours["sv_mean"] == pytest.approx(4.0 / 3) and ours["sv_var"] == pytest.approx(np.var([3.0, 0.0, 1.0]))


@pytest.mark.parametrize("values", [[0.5], [-1.0, 2.0], [0.0, -3.0, 2.0, 1.5], [-2.0, -1.0, -0.5, -3.0, -1.5]])
def test_diagonal_stats_match_dense_reference(values):
    v = torch.tensor(values, dtype=torch.float64)
    assert_stats_close(diagonal_stats(v), reference_stats(np.diag(values)))


def test_zero_update_has_zero_ratios():
    stats = low_rank_stats(torch.zeros(5, 2), torch.randn(2, 4))
    assert stats["code_sparsity"] == 0 and stats["computational_sparsity"] == 0 and stats["l2"] == 0


def _randomise(model):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))


@pytest.mark.parametrize("config", [
    LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"]),
    LoraConfig(r=4, lora_alpha=8, use_rslora=True, target_modules=["v_proj"]),
    HiraConfig(r=4, target_modules=["q_proj", "down_proj"]),
    IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"]),
], ids=["lora", "rslora", "hira", "ia3"])  # fmt: skip
def test_effective_update_matches_peft_forward(config, tokenizer):
    """LoRA/HiRA: adapter(x) - base(x) = dW x. IA3: y = l * (W x) or W (l * x), so the change is
    diag(l - 1) W x or W diag(l - 1) x, with diag(l - 1) the matrix the statistics describe."""
    model = get_peft_model(make_model(tokenizer), config)
    _randomise(model)
    matrices = {m.name.rsplit(".", 1)[0]: m.to_dense().double() for m in trained_matrices(model)[0]}
    assert matrices
    for name, module in model.named_modules():
        if name not in matrices:
            continue
        weight = module.get_base_layer().weight.double()
        x = torch.randn(3, weight.shape[1], dtype=torch.float64)
        with torch.no_grad():
            adapted = module.double()(x)
            with model.disable_adapter():
                base = module(x)
            module.float()
        change = matrices[name]
        if isinstance(config, IA3Config):
            expected = x @ (weight @ change).T if module.is_feedforward else x @ (change @ weight).T
        else:
            expected = x @ change.T
        torch.testing.assert_close(adapted - base, expected, rtol=1e-5, atol=1e-6)  # dW is formed in float32


def test_full_finetuning_reads_trainable_weights_and_biases(tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = make_model(tokenizer).config
    config.attention_bias = True
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**config.to_dict()))
    for name, p in model.named_parameters():
        p.requires_grad_(".layers.0." in name)  # train one layer only
    matrices, biases = trained_matrices(model)
    layer0 = [p for n, p in model.named_parameters() if ".layers.0." in n]
    assert len(matrices) == sum(p.dim() == 2 for p in layer0) == 7
    assert len(biases) == 4  # q, k, v, o biases; norm weights are neither
    stats = weight_statistics(model)
    reference = [reference_stats(m.dense.double().numpy()) for m in matrices]
    for key in MATRIX_STATS:
        assert stats[key] == pytest.approx(np.mean([r[key] for r in reference]), rel=1e-4, abs=1e-7), key
    assert stats["b_var"] == pytest.approx(np.mean([b.double().var(correction=0).item() for b in biases]), rel=1e-5)
    assert stats["n_matrices"] == 7


def test_no_trained_matrix_is_an_input_error(tokenizer):
    model = make_model(tokenizer).requires_grad_(False)
    with pytest.raises(InputError, match="no trained matrix"):
        trained_matrices(model)


LORA = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])
PROBE = LLCArguments(llc_probe_size=8, llc_batch_size=4, llc_chains=2, llc_draws=3, llc_epsilon=1e-4, llc_gamma=100.0)


def reprpo_trainer(tmp_path, model, pairs, tokenizer, **overrides):
    args = dict(output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=4, learning_rate=5e-3, use_cpu=True,
                bf16=False, report_to="none", logging_steps=1, save_strategy="no", layers="1,-1", seed=0)  # fmt: skip
    return ReprPOTrainer(model, args=ReprPOConfig(**{**args, **overrides}), train_dataset=pairs, processing_class=tokenizer,
                         peft_config=LoraConfig(**LORA))  # fmt: skip


def test_callbacks_record_and_leave_training_bit_identical(tmp_path, tokenizer, pairs):
    """Weight statistics every 2 steps and the LLC at the last step: the run ends with the same parameters and
    logs as one without callbacks; the tables hold the statistics of the model at those steps, joined with
    the step's logged loss terms; the LLC's L(w*) is the trainer's own loss on the probe set."""
    plain = reprpo_trainer(tmp_path / "plain", make_model(tokenizer), pairs, tokenizer)
    plain.train()
    watched = reprpo_trainer(tmp_path / "watched", make_model(tokenizer), pairs, tokenizer)
    llc_callback = LLCCallback(watched, PROBE, every=0)
    watched.add_callback(WeightStatsCallback(watched, every=2))
    watched.add_callback(llc_callback)
    watched.train()

    for (name, a), b in zip(plain.model.named_parameters(), watched.model.parameters()):
        assert torch.equal(a, b), name
    for a, b in zip(plain.state.log_history, watched.state.log_history):
        assert {k: v for k, v in a.items() if "runtime" not in k and "per_second" not in k} == pytest.approx(
            {k: v for k, v in b.items() if "runtime" not in k and "per_second" not in k})  # fmt: skip

    stats = pd.read_parquet(tmp_path / "watched" / "dynamics" / "weight_stats.parquet")
    assert stats.step.tolist() == [2, 4]
    final = weight_statistics(watched.model)
    assert stats.iloc[-1][list(final)].to_dict() == pytest.approx(final)
    log_at_4 = next(e for e in watched.state.log_history if e.get("step") == 4 and "loss" in e)
    for key in ("loss", "loss/dpo", "loss/hidden", "rewards/accuracies"):
        assert stats.iloc[-1][key] == pytest.approx(log_at_4[key]), key

    llc = pd.read_parquet(tmp_path / "watched" / "dynamics" / "llc.parquet")
    assert llc.step.tolist() == [4] and np.isfinite(llc.llc_mean).all() and llc.finite.all()
    traces = pd.read_parquet(tmp_path / "watched" / "dynamics" / "llc_traces.parquet")
    assert len(traces) == PROBE.llc_chains * PROBE.llc_draws
    assert (tmp_path / "watched" / "dynamics" / "llc.png").stat().st_size > 0
    watched.model.eval()
    with torch.no_grad():
        own = np.mean([watched.compute_loss(watched.model, batch).item() for batch in llc_callback.batches])
    assert llc.init_loss.iloc[0] == pytest.approx(own, rel=1e-5)


def test_offline_stats_and_llc_match_the_callbacks(tmp_path, saved_model, tokenizer):
    """reprpo-dynamics stats / llc over saved checkpoints give what the callbacks measured during training."""
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        f"trainer: dpo\nmodel_name_or_path: {saved_model}\nadapter:\n  type: lora\n  r: 4\n  targets: qvd\n"
        f"train_dataset: suite:add_small:train\nmax_train_samples: 16\nmax_length: 64\nper_device_train_batch_size: 4\n"
        f"max_steps: 4\nlearning_rate: 5.0e-3\nsave_strategy: steps\nsave_steps: 2\nlogging_steps: 1\nreport_to: none\n"
        f"use_cpu: true\nbf16: false\ngradient_checkpointing: false\noutput_dir: {tmp_path / 'run'}\n"
        f"weight_stats: true\nllc: true\nllc_steps: 2\nllc_probe_size: 8\nllc_batch_size: 4\nllc_chains: 1\nllc_draws: 3\n"
    )  # fmt: skip
    from reprpo_trl.train import run

    run(["--config", str(recipe)])
    checkpoints = [str(tmp_path / "run" / f"checkpoint-{s}") for s in (4, 2)]
    live = pd.read_parquet(tmp_path / "run" / "dynamics" / "weight_stats.parquet").set_index("step")
    dynamics_cli(["stats", *checkpoints, "--base", saved_model, "--out", str(tmp_path / "offline.parquet")])
    offline = pd.read_parquet(tmp_path / "offline.parquet").set_index("step")
    assert offline.index.tolist() == [2, 4]
    for column in MATRIX_STATS + ("loss",):
        np.testing.assert_allclose(offline[column], live.loc[[2, 4], column], rtol=1e-5, atol=1e-9, err_msg=column)

    live_llc = pd.read_parquet(tmp_path / "run" / "dynamics" / "llc.parquet").set_index("step")
    dynamics_cli(["llc", *checkpoints, "--out", str(tmp_path / "offline_llc"), "--config", str(recipe)])
    offline_llc = pd.read_parquet(tmp_path / "offline_llc" / "llc.parquet").set_index("step")
    np.testing.assert_allclose(offline_llc.init_loss, live_llc.loc[[2, 4], "init_loss"], rtol=1e-5)
    np.testing.assert_allclose(offline_llc.llc_mean, live_llc.loc[[2, 4], "llc_mean"], rtol=1e-3, atol=1e-6)


def test_llc_of_linear_regression_is_d_over_2():
    """A regular model at its minimum has LLC d/2. Stated tolerance: 10% (4 chains x 400 full-batch SGLD steps,
    eps = 3e-4, n_beta = n = 1000, gamma = 1: the chains' spread gives a standard error of about 4%)."""
    args = LLCArguments(llc_epsilon=3e-4, llc_gamma=1.0, llc_chains=4, llc_draws=400, llc_probe_size=1, llc_batch_size=1)
    summary, trace = linear_regression_llc(4, args)
    assert summary["llc_mean"] == pytest.approx(2.0, rel=0.10)
    assert summary["bounded"] and summary["finite"]
    assert len(trace) == 4 * 400


def test_llc_diagnostics_flag_a_diverging_step_size():
    args = LLCArguments(llc_epsilon=0.05, llc_gamma=1.0, llc_chains=1, llc_draws=50, llc_probe_size=1, llc_batch_size=1)
    with pytest.warns(UserWarning, match="Chain failed"):
        summary, _ = linear_regression_llc(4, args)
    assert not summary["bounded"] and not summary["finite"]


def test_trace_diagnostics_tell_a_level_chain_from_a_climbing_one():
    g = torch.Generator().manual_seed(0)
    level = torch.zeros(4, 400)
    for t in range(1, 400):  # AR(1): autocorrelated like SGLD, stationary
        level[:, t] = 0.9 * level[:, t - 1] + 0.1 * torch.randn(4, generator=g)
    assert trace_diagnostics(1 + level, 1.0, 10.0)["bounded"]
    climbing = trace_diagnostics(1 + level + torch.linspace(0, 1, 400), 1.0, 10.0)
    assert not climbing["bounded"] and climbing["drift"] == pytest.approx(10 * 0.5, rel=0.2)


@pytest.mark.parametrize("field, value, message", [
    ("llc_epsilon", 0.0, "must be > 0"), ("llc_chains", 0, "must be >= 1"), ("llc_gamma", -1.0, "must be >= 0"),
    ("llc_batch_size", 64, "exceeds llc_probe_size"),
])  # fmt: skip
def test_llc_arguments_refuse_bad_values(field, value, message):
    with pytest.raises(InputError, match=message):
        LLCArguments(**{field: value})


FEATURES = ("l1", "l2", "spectral", "w_var")


def planted_runs(tmp_path, n_runs=5, length=30, seed=0):
    """Runs with three phases: features piecewise-stationary (phase means 3 sd apart plus unit noise), change
    points drawn per run; a loss that decays until the last phase."""
    rng = np.random.default_rng(seed)
    means = np.array([[0.0, 0.0, 0.0, 0.0], [3.0, -3.0, 3.0, 0.0], [6.0, 0.0, -3.0, 3.0]])
    paths, planted = [], {}
    for r in range(n_runs):
        first = int(rng.integers(6, 12))
        second = first + int(rng.integers(6, 12))
        phase = np.searchsorted([first, second], np.arange(length), side="right")
        table = pd.DataFrame(means[phase] + rng.normal(size=(length, 4)), columns=FEATURES)
        table["step"] = 10 * np.arange(1, length + 1)
        table["loss"] = np.where(phase == 2, 0.1, 1.0) + 0.01 * rng.normal(size=length)
        path = tmp_path / f"run{r}.parquet"
        table.to_parquet(path)
        paths.append(str(path))
        planted[f"run{r}"] = [10 * (first + 1), 10 * (second + 1)]
    return paths, planted


def test_hmm_recovers_planted_phases(tmp_path):
    """Stated tolerance: the selected model has the planted 3 states and every change point of every run is
    within one collection interval (10 steps) of the planted one."""
    paths, planted = planted_runs(tmp_path)
    result = fit_runs(paths, tmp_path / "out", FitArguments(max_states=4, covariance="diag", restarts=2))
    assert result["selected"] == (3, "diag")
    for name, rows in result["states"].groupby("run"):
        states, steps = rows.state.to_numpy(), rows.step.to_numpy()
        changes = steps[1:][states[1:] != states[:-1]]
        assert len(changes) == 2, name
        assert np.abs(changes - planted[name]).max() <= 10, name
        assert states[0] == 0 and states[-1] == 2  # renumbered by time
    moves = result["transitions"]
    assert moves[["source", "target"]].values.tolist() == [[0, 1], [1, 2]] and moves["count"].tolist() == [5, 5]
    assert moves.top_features.iloc[0].startswith(("l1", "l2", "spectral"))  # the features that moved 3 sd
    for name in ("summary.md", "model_selection.png", "states.png", "transitions.png", "model_selection.parquet", "hmm.pkl"):
        assert (tmp_path / "out" / name).exists(), name
    table = pd.read_parquet(tmp_path / "out" / "model_selection.parquet")
    assert table.n_states.tolist() == [1, 2, 3, 4] and table.test_ll.notna().all()


def test_zscore_within_run_and_constant_features():
    table = pd.DataFrame({"a": [1.0, 2.0, 3.0], "b": [5.0, 5.0, 5.0]})
    z = hmm.zscore(table, ["a", "b"])
    np.testing.assert_allclose(z[:, 0], [-np.sqrt(1.5), 0, np.sqrt(1.5)])
    assert (z[:, 1] == 0).all()


def test_convergence_step_and_detours():
    table = pd.DataFrame({"step": [10, 20, 30, 40, 50], "loss": [1.0, 0.6, 0.2, 0.11, 0.1]})
    assert hmm.convergence_step(table, tolerance=0.1, window=1) == 40  # |0.2 - 0.1| > 0.09 >= |0.11 - 0.1|
    # runs that visit state 2 converge 50 steps later: coefficient 50, R^2 = 1
    states = pd.DataFrame({"run": ["a"] * 2 + ["b"] * 3 + ["c"] * 2 + ["d"] * 3,
                           "state": [0, 1, 0, 2, 1, 0, 1, 0, 2, 1]})  # fmt: skip
    detours, fit = hmm.detours(states, {"a": 100.0, "b": 150.0, "c": 100.0, "d": 150.0}, n_states=3)
    assert detours.coefficient_steps.tolist()[2] == pytest.approx(50.0)
    assert np.isnan(detours.coefficient_steps.tolist()[0])  # visited by every run: no contrast
    assert fit["r2"] == pytest.approx(1.0) and fit["intercept"] == pytest.approx(100.0)


def test_fit_refuses_runs_without_tables(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="weight_stats.parquet"):
        hmm.load_runs([str(tmp_path / "empty")])
    paths, _ = planted_runs(tmp_path, n_runs=2)
    with pytest.raises(InputError, match="missing from run"):
        hmm.feature_columns(hmm.load_runs(paths), extra=("eval_loss",))


def test_stats_cli_refuses_a_directory_that_is_no_checkpoint(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        dynamics_cli(["stats", str(tmp_path)])
    assert exit_info.value.code == 2
    assert "not a checkpoint" in capsys.readouterr().err


def test_fit_cli_refuses_an_unknown_covariance(tmp_path, capsys):
    paths, _ = planted_runs(tmp_path, n_runs=2)
    with pytest.raises(SystemExit) as exit_info:
        dynamics_cli(["fit", *paths, "--out", str(tmp_path / "out"), "--covariance", "spherical"])
    assert exit_info.value.code == 2
    assert "covariance='spherical': choose diag, full or both" in capsys.readouterr().err


def test_checkpoint_step_from_trainer_state(tmp_path):
    from reprpo_trl.dynamics.checkpoints import checkpoint_step

    (tmp_path / "saved").mkdir()
    (tmp_path / "saved" / "trainer_state.json").write_text(json.dumps({"global_step": 7}))
    assert checkpoint_step(tmp_path / "saved") == 7
    with pytest.raises(InputError, match="cannot tell its step"):
        checkpoint_step(tmp_path)
