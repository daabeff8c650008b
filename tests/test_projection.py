"""ProjGrad and ProjBP: the projection math against float64, beta = 1 reproduces TRL's DPO exactly, beta = 0 keeps
the gradient (and, with project_update, the update) in span(u), gradient accumulation, LoRA and full fine-tuning."""

import copy

import pytest
import torch
from peft import IA3Config, LoraConfig, PromptTuningConfig, get_peft_model
from torch import nn
from trl import DPOConfig, DPOTrainer

from conftest import make_model, to_device
from reprpo_trl import ProjBPConfig, ProjBPTrainer, ProjGradConfig, ProjGradTrainer
from reprpo_trl.projection import adapted_modules, output_axis_parameters, project_output_axis, project_rows, unit
from reprpo_trl.sites import pool, unwrap

LORA = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])
COMMON = dict(
    max_steps=3, per_device_train_batch_size=4, learning_rate=5e-3, use_cpu=True, bf16=False, report_to="none",
    logging_steps=1, save_strategy="no", seed=0, lr_scheduler_type="constant",
)  # fmt: skip


# --- the math -----------------------------------------------------------------------------------------------------


def reference_split(grad, u, beta):
    g, u = grad.double().reshape(grad.shape[0], -1), u.double()
    parallel = torch.outer(u, u @ g)
    return (parallel + beta * (g - parallel)).reshape(grad.shape)


@pytest.mark.parametrize("shape", [(6, 3), (6,), (6, 1)])
@pytest.mark.parametrize("beta", [0.0, 0.3])
def test_project_output_axis_matches_float64(shape, beta):
    torch.manual_seed(0)
    grad, u = torch.randn(shape), unit(torch.randn(6))
    edited = project_output_axis(grad, u, beta, renorm=False)
    torch.testing.assert_close(edited.double(), reference_split(grad, u, beta), atol=1e-6, rtol=1e-6)
    renormed = project_output_axis(grad, u, beta, renorm=True)
    assert renormed.norm().item() == pytest.approx(grad.norm().item(), rel=1e-6)
    torch.testing.assert_close(unit(renormed.flatten()), unit(edited.flatten()))


def test_beta_zero_lies_in_span_and_beta_one_is_exact():
    torch.manual_seed(0)
    grad, u = torch.randn(6, 3), unit(torch.randn(6))
    inside = project_output_axis(grad, u, 0.0, renorm=False)
    torch.testing.assert_close(inside, torch.outer(u, u @ inside))
    output_grad, directions = torch.randn(2, 5, 6), unit(torch.randn(2, 6))
    for renorm in (False, True):
        assert torch.equal(project_output_axis(grad, u, 1.0, renorm), grad)
        assert torch.equal(project_rows(output_grad, directions, 1.0, renorm), output_grad)


def test_project_rows_matches_float64_per_row_direction():
    torch.manual_seed(0)
    grad, directions = torch.randn(4, 5, 8), unit(torch.randn(4, 8))
    edited = project_rows(grad, directions, 0.25, renorm=False)
    for n in range(4):
        u = directions[n].double()
        g = grad[n].double()
        parallel = (g @ u)[:, None] * u
        torch.testing.assert_close(edited[n].double(), parallel + 0.25 * (g - parallel), atol=1e-6, rtol=1e-6)
    renormed = project_rows(grad, directions, 0.25, renorm=True)
    torch.testing.assert_close(renormed.flatten(1).norm(dim=1), grad.flatten(1).norm(dim=1))


# --- where it applies ---------------------------------------------------------------------------------------------


def test_output_axis_parameters(tokenizer):
    lora = get_peft_model(make_model(tokenizer), LoraConfig(**LORA))
    modules = adapted_modules(lora)
    assert len(modules) == 3 * 4 and all(name.endswith(("q_proj", "v_proj", "down_proj")) for name in modules)
    q_proj = modules["model.layers.0.self_attn.q_proj"]
    assert output_axis_parameters(q_proj) == [q_proj.lora_B["default"].weight]

    ia3 = get_peft_model(make_model(tokenizer), IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"]))
    ia3_modules = adapted_modules(ia3)
    assert [p.shape for p in output_axis_parameters(ia3_modules["model.layers.0.self_attn.k_proj"])] == [(16, 1)]
    assert output_axis_parameters(ia3_modules["model.layers.0.mlp.down_proj"]) == []  # scales the input

    full = make_model(tokenizer)
    full_modules = adapted_modules(full, pattern=r"layers\.1\.")
    assert len(full_modules) == 7
    assert output_axis_parameters(full_modules["model.layers.1.mlp.up_proj"]) == [full.model.layers[1].mlp.up_proj.weight]


def test_prompt_tuning_has_no_adapted_module(tokenizer):
    model = get_peft_model(make_model(tokenizer), PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
    with pytest.raises(ValueError, match="prompt and prefix tuning have none"):
        adapted_modules(model)


# --- the trainers -------------------------------------------------------------------------------------------------


def build(kind, tmp_path, tokenizer, pairs, adapter="lora", lora=LORA, hidden=32, **overrides):
    model = make_model(tokenizer, hidden=hidden)
    kwargs = dict(train_dataset=pairs, processing_class=tokenizer)
    if adapter == "lora":
        kwargs["peft_config"] = LoraConfig(**lora)
    else:
        kwargs["ref_model"] = copy.deepcopy(model)
    args = dict(COMMON, output_dir=str(tmp_path / kind), **overrides)
    if kind == "dpo":
        return DPOTrainer(model, args=DPOConfig(**args), **kwargs)
    trainer_class, config_class = {"projgrad": (ProjGradTrainer, ProjGradConfig), "projbp": (ProjBPTrainer, ProjBPConfig)}[kind]
    return trainer_class(model, args=config_class(**args), **kwargs)


def trainable(trainer):
    return {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("adapter", ["lora", "full"])
@pytest.mark.parametrize("kind,overrides", [("projgrad", {}), ("projgrad", {"renorm": True}), ("projbp", {})])
def test_beta_one_reproduces_trl_dpo_exactly(kind, overrides, adapter, tmp_path, tokenizer, pairs):
    dpo = build("dpo", tmp_path, tokenizer, pairs, adapter)
    projected = build(kind, tmp_path, tokenizer, pairs, adapter, proj_beta=1.0, **overrides)
    before = trainable(projected)
    dpo.train()
    projected.train()
    expected, got = trainable(dpo), trainable(projected)
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[n], got[n]) for n in expected)
    assert any(not torch.equal(before[n], got[n]) for n in got)


@pytest.mark.parametrize("adapter", ["lora", "full"])
@pytest.mark.parametrize("kind", ["projgrad", "projbp"])
def test_projection_changes_training(kind, adapter, tmp_path, tokenizer, pairs):
    dpo = build("dpo", tmp_path, tokenizer, pairs, adapter)
    projected = build(kind, tmp_path, tokenizer, pairs, adapter, proj_beta=0.2)
    before = trainable(projected)
    dpo.train()
    projected.train()
    after = trainable(projected)
    moved = [n for n in after if not torch.equal(before[n], after[n])]
    assert moved
    assert any(not torch.allclose(trainable(dpo)[n], after[n], atol=1e-6) for n in moved)


def first_batch_directions(trainer):
    """Independently: unit(sum over the step's pairs of r_c - r_r) for each module, from a reference forward."""
    examples = [trainer.train_dataset[i] for i in range(len(trainer.train_dataset))]
    batch = to_device(trainer.data_collator(examples), trainer.model)  # where the Trainer placed the model
    outputs = {}
    handles = [
        m.register_forward_hook(lambda m, a, o, name=name: outputs.__setitem__(name, o))
        for name, m in trainer.projected.items()
    ]
    with torch.no_grad(), trainer.model.disable_adapter():
        trainer.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    for handle in handles:
        handle.remove()
    directions = {}
    for name, output in outputs.items():
        chosen, rejected = pool(output, batch["completion_mask"], batch["attention_mask"], "completion_mean").chunk(2)
        directions[name] = unit((chosen - rejected).sum(0))
    return directions


def lora_b(trainer):
    return {name: m.lora_B["default"].weight for name, m in trainer.projected.items()}


@pytest.mark.parametrize("beta", [0.0, 0.3])
def test_the_edited_gradient_is_the_one_sgd_consumed(beta, tmp_path, tokenizer, pairs):
    """One SGD step on the whole dataset: Delta = -lr G', G' = split(G, u) with u from the reference, and for
    beta = 0 every LoRA B update lies in span(u) along its output axis."""
    data = pairs.select(range(4))
    runs = {}
    for b in (1.0, beta):
        trainer = build("projgrad", tmp_path / str(b), tokenizer, data, proj_beta=b, max_steps=1, optim="sgd", max_grad_norm=0.0)
        start = {name: w.detach().clone() for name, w in lora_b(trainer).items()}
        trainer.train()
        runs[b] = (trainer, {name: (w.detach() - start[name]) / -trainer.args.learning_rate for name, w in lora_b(trainer).items()})
    trainer, edited = runs[beta]
    _, raw = runs[1.0]
    independent = first_batch_directions(trainer)
    for name, u in trainer.directions.items():
        torch.testing.assert_close(u, independent[name], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(edited[name].double(), reference_split(raw[name], u, beta), atol=1e-6, rtol=1e-4)
        if beta == 0.0:
            torch.testing.assert_close(edited[name], torch.outer(u, u @ edited[name]), atol=1e-7, rtol=1e-5)
    assert 0 < trainer.state.log_history[0]["projgrad/parallel_fraction"] <= 1


def out_of_span(update, u):
    return (update - torch.outer(u, u @ update)).norm() / update.norm()


@pytest.mark.parametrize("project_update", [False, True])
def test_project_update_keeps_adamw_updates_in_span(project_update, tmp_path, tokenizer, pairs):
    trainer = build("projgrad", tmp_path, tokenizer, pairs, proj_beta=0.0, project_update=project_update, max_steps=1)
    start = {name: w.detach().clone() for name, w in lora_b(trainer).items()}
    trainer.train()
    residual = max(out_of_span(w.detach() - start[name], trainer.directions[name]) for name, w in lora_b(trainer).items())
    if project_update:
        assert residual < 1e-5
    else:
        assert residual > 0.1  # Adam's per-element scaling takes the update out of span(u): why project_update exists


def test_gradient_accumulation_gives_the_same_result(tmp_path, tokenizer, pairs):
    results = []
    for batch, accumulation in ((4, 1), (2, 2)):
        trainer = build(
            "projgrad", tmp_path / str(batch), tokenizer, pairs, proj_beta=0.3, max_steps=2,
            per_device_train_batch_size=batch, gradient_accumulation_steps=accumulation,
        )  # fmt: skip
        trainer.train()
        results.append((trainable(trainer), dict(trainer.directions)))
    (params_a, dirs_a), (params_b, dirs_b) = results
    for name in dirs_a:
        torch.testing.assert_close(dirs_a[name], dirs_b[name], atol=1e-5, rtol=1e-4)
    for name in params_a:
        torch.testing.assert_close(params_a[name], params_b[name], atol=1e-5, rtol=1e-4)  # padding differs


def test_policy_direction_source_allows_precompute(tmp_path, tokenizer, pairs):
    with pytest.raises(ValueError, match="precompute_ref_log_probs=True skips it"):
        ProjGradConfig(output_dir=str(tmp_path), use_cpu=True, precompute_ref_log_probs=True)
    trainer = build("projbp", tmp_path, tokenizer, pairs, direction_source="policy", precompute_ref_log_probs=True)
    before = trainable(trainer)
    trainer.train()
    assert any(not torch.equal(before[n], p) for n, p in trainable(trainer).items())


def test_projbp_edits_reach_earlier_layers(tmp_path, tokenizer, pairs):
    """Projecting the output gradient of the last layer's down_proj changes the gradient of layer 0's adapter."""
    grads = {}
    for beta in (1.0, 0.0):
        trainer = build("projbp", tmp_path / str(beta), tokenizer, pairs, proj_beta=beta, proj_modules=r"layers\.3\.mlp", max_steps=1)
        assert list(trainer.projected) == ["model.layers.3.mlp.down_proj"]
        weight = unwrap(trainer.model).model.layers[0].self_attn.q_proj.lora_B["default"].weight
        weight.register_hook(lambda g, beta=beta: grads.__setitem__(beta, g.clone()))
        trainer.train()
    assert not torch.allclose(grads[1.0], grads[0.0])


def test_config_validation(tmp_path):
    with pytest.raises(ValueError, match="proj_beta=1.5 must lie in"):
        ProjGradConfig(output_dir=str(tmp_path), use_cpu=True, proj_beta=1.5)
    with pytest.raises(ValueError, match="direction_source='model'"):
        ProjBPConfig(output_dir=str(tmp_path), use_cpu=True, direction_source="model")
    with pytest.raises(TypeError, match="ProjGradConfig"):
        ProjGradTrainer(nn.Linear(2, 2), args=ProjBPConfig(output_dir=str(tmp_path), use_cpu=True))


def step_peak_bytes(trainer) -> int:
    """Peak of the torch CPU allocator's running total over one training step (torch.profiler memory events); on
    a GPU, the CUDA allocator's peak over the step above what it held when the step began."""
    from torch.profiler import ProfilerActivity, profile
    from transformers import TrainerCallback

    peak = {}

    class Profiled(TrainerCallback):
        def on_step_begin(self, *args, **kwargs):
            self.profiler = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
            self.profiler.__enter__()

        def on_step_end(self, *args, **kwargs):
            self.profiler.__exit__(None, None, None)
            events = sorted((e.start_ns(), e.nbytes()) for e in self.profiler.profiler.kineto_results.events() if e.name() == "[memory]")
            total = peak["bytes"] = 0
            for _, nbytes in events:
                total += nbytes
                peak["bytes"] = max(peak["bytes"], total)

    class CudaPeak(TrainerCallback):
        def on_step_begin(self, *args, **kwargs):
            torch.cuda.reset_peak_memory_stats()
            self.start = torch.cuda.memory_allocated()

        def on_step_end(self, *args, **kwargs):
            peak["bytes"] = torch.cuda.max_memory_allocated() - self.start

    trainer.add_callback(CudaPeak() if trainer.args.device.type == "cuda" else Profiled())
    trainer.train()
    return peak["bytes"]


@pytest.mark.parametrize("checkpointing", [True, False])
def test_projbp_keeps_no_module_output_beyond_dpo(checkpointing, tmp_path, tokenizer, pairs):
    """With every linear layer adapted, ProjBP's peak step memory is DPO's: the hooks keep no module output alive
    (with gradient checkpointing, DPO itself keeps only layer inputs; the old hooks kept 7 outputs per layer)."""
    long_pairs = pairs.map(lambda row: {"chosen": row["chosen"] * 20, "rejected": row["rejected"] * 20})
    every_linear = dict(LORA, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    peaks = {}
    for kind in ("dpo", "projbp"):
        trainer = build(kind, tmp_path, tokenizer, long_pairs, lora=every_linear, hidden=128, max_steps=1, max_length=256,
                        gradient_checkpointing=checkpointing)  # fmt: skip
        peaks[kind] = step_peak_bytes(trainer)
    assert peaks["projbp"] <= 1.05 * peaks["dpo"], peaks
