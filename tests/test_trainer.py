"""ReprPOTrainer end to end on a tiny random Llama: training changes the right weights, every term is
logged, adapters save and reload, and the precomputed reference gives the live reference's loss."""

import copy

import pytest
import torch
from peft import LoraConfig, PeftModel

from conftest import make_model, on_cpu
from reprpo_trl import ReprPOConfig, ReprPOTrainer
from reprpo_trl.losses import HIDDEN_LOSSES

LORA = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])


def config(tmp_path, **overrides):
    base = dict(
        output_dir=str(tmp_path / "out"),
        max_steps=3,
        per_device_train_batch_size=4,
        learning_rate=5e-3,
        use_cpu=True,
        bf16=False,
        report_to="none",
        logging_steps=1,
        save_strategy="no",
        layers="1,-1",
        seed=0,
    )
    return ReprPOConfig(**{**base, **overrides})


def lora_trainer(tmp_path, tokenizer, pairs, **overrides):
    model = make_model(tokenizer)
    return ReprPOTrainer(
        model,
        args=config(tmp_path, **overrides),
        train_dataset=pairs,
        processing_class=tokenizer,
        peft_config=LoraConfig(**LORA),
    )


def lora_weights(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


@pytest.mark.parametrize("loss", sorted(HIDDEN_LOSSES))
def test_training_changes_adapter_logs_terms_and_saves(loss, tmp_path, tokenizer, pairs):
    trainer = lora_trainer(tmp_path, tokenizer, pairs, hidden_loss=loss)
    before = lora_weights(trainer.model)
    trainer.train()
    after = lora_weights(trainer.model)
    changed = [n for n in before if "lora_B" in n and not torch.equal(before[n], after[n])]
    assert changed, "no LoRA B matrix moved"
    assert all(not p.requires_grad for n, p in trainer.model.named_parameters() if "lora_" not in n)

    logged = trainer.state.log_history[0]
    for key in ("loss/dpo", "loss/hidden", "hidden/layer_1", "hidden/layer_3", "hidden/proj", "hidden/orth", "hidden/cos"):
        assert key in logged, key
    # first step: pi = ref, so every term has its initial value and loss = w_dpo * L_dpo + alpha * L_h
    assert logged["loss/dpo"] == pytest.approx(0.6931, abs=1e-3)
    assert logged["hidden/proj"] == pytest.approx(1.0, abs=1e-3)
    assert logged["loss"] == pytest.approx(logged["loss/dpo"] + logged["loss/hidden"], abs=1e-3)

    trainer.save_model(str(tmp_path / "adapter"))
    reloaded = PeftModel.from_pretrained(make_model(tokenizer), str(tmp_path / "adapter"))
    for name, value in lora_weights(reloaded).items():
        torch.testing.assert_close(value, on_cpu(after[name]))


def test_hidden_term_alone_trains_only_layers_it_reads(tmp_path, tokenizer, pairs):
    """With w_dpo = 0 the gradient comes from the states of layer 1 only: adapters above it get none (the forward
    stops after layer 1) and keep their values."""
    trainer = lora_trainer(tmp_path, tokenizer, pairs, dpo_weight=0.0, layers="1", hidden_loss="mse", max_steps=1)
    grads = {}

    def keep(name):
        return lambda grad: grads.__setitem__(name, grad.abs().sum().item())

    above = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if ".layers.2." in n or ".layers.3." in n}
    for n, p in trainer.model.named_parameters():
        if "lora_A" in n and p.requires_grad:
            p.register_hook(keep(n))
    trainer.train()
    below = [v for n, v in grads.items() if ".layers.0." in n or ".layers.1." in n]
    assert below and not any(n in above for n in grads)
    after = dict(trainer.model.named_parameters())
    assert all(after[n].grad is None and torch.equal(after[n], value) for n, value in above.items())


def test_dpo_weight_zero_stops_the_forward_after_the_deepest_site(tmp_path, tokenizer, pairs):
    """With w_dpo = 0 no layer after the deepest site (layer 1 of 4) and no LM head runs, in the policy and the
    reference forward; the loss and its gradients equal those of the whole forward through TRL's loss (the
    implementation before the early stop, with 0 * L_dpo) to 1e-6."""
    from reprpo_trl.sites import decoder_layers, unwrap

    results = {}
    for stops in (True, False):
        trainer = lora_trainer(tmp_path / str(stops), tokenizer, pairs, dpo_weight=0.0, layers="0,1", hidden_loss="prefvec")
        if not stops:
            trainer.forward_stops_after = None  # TRL's whole forward and loss, as before
        base = unwrap(trainer.model)
        ran = []
        for module in [*decoder_layers(base)[2:], base.get_output_embeddings()]:
            module.register_forward_hook(lambda *args: ran.append(1))
        batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
        trainer.model.train()
        loss = trainer.compute_loss(trainer.model, batch)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
        results[stops] = loss.detach(), grads, len(ran)
    (loss, grads, ran), (whole_loss, whole_grads, whole_ran) = results[True], results[False]
    assert ran == 0 and whole_ran > 0  # the hooks do see the later layers and the head when they run
    torch.testing.assert_close(loss, whole_loss, rtol=0, atol=1e-6)
    assert grads.keys() == whole_grads.keys() and len(grads) == 12  # q, v, down LoRA A and B of layers 0 and 1
    for name, grad in grads.items():
        torch.testing.assert_close(grad, whole_grads[name], rtol=0, atol=1e-6)


def test_weights_scale_the_terms(tmp_path, tokenizer, pairs):
    trainer = lora_trainer(tmp_path, tokenizer, pairs, alpha=3.0, dpo_weight=0.5, max_steps=1, hidden_loss="mse")
    trainer.train()
    logged = trainer.state.log_history[0]
    assert logged["loss/hidden"] == pytest.approx(1.0, abs=1e-2)  # mse is g'/g = 1 - eps/g at init
    assert logged["loss"] == pytest.approx(0.5 * logged["loss/dpo"] + 3.0 * logged["loss/hidden"], abs=1e-4)


@pytest.mark.parametrize("loss", ["prefvec", "mse"])
def test_precomputed_reference_gives_live_first_step_loss(loss, tmp_path, tokenizer, pairs):
    live = lora_trainer(tmp_path / "live", tokenizer, pairs, hidden_loss=loss, max_steps=2)
    pre = lora_trainer(tmp_path / "pre", tokenizer, pairs, hidden_loss=loss, max_steps=2, precompute_ref_log_probs=True)
    assert "ref_states" in pre.train_dataset.column_names
    assert len(pre.train_dataset[0]["ref_states"]) == 2  # chosen, rejected
    live.train()
    pre.train()
    for key in ("loss", "loss/dpo", "loss/hidden", "hidden/layer_1"):
        assert pre.state.log_history[0][key] == pytest.approx(live.state.log_history[0][key], abs=1e-4), key
    # after one update the policy differs from the reference in both modes alike
    assert pre.state.log_history[1]["loss/hidden"] == pytest.approx(live.state.log_history[1]["loss/hidden"], abs=1e-3)


def test_precompute_runs_no_reference_forward(tmp_path, tokenizer, pairs):
    trainer = lora_trainer(tmp_path, tokenizer, pairs, precompute_ref_log_probs=True, max_steps=2)
    calls = []
    layer = trainer.collector.sites["layer_1"][0]
    layer.register_forward_hook(lambda *a: calls.append(1))
    trainer.train()
    assert len(calls) == 2  # one policy forward per step


def test_full_finetuning_with_frozen_reference(tmp_path, tokenizer, pairs):
    model = make_model(tokenizer)
    ref = copy.deepcopy(model)
    ref_before = {n: p.clone() for n, p in ref.named_parameters()}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = ReprPOTrainer(
        model, ref_model=ref, args=config(tmp_path, hidden_loss="innerdpo"), train_dataset=pairs, processing_class=tokenizer
    )
    assert len(trainer.collector.sites["layer_1"]) == 2  # policy and reference layer
    trainer.train()
    moved = [n for n, p in trainer.model.named_parameters() if not torch.equal(on_cpu(p), before[n])]
    assert "model.layers.1.self_attn.q_proj.weight" in moved
    assert all(torch.equal(on_cpu(p), ref_before[n]) for n, p in ref.named_parameters())  # the Trainer placed ref
    assert trainer.state.log_history[0]["hidden/proj"] == pytest.approx(1.0, abs=1e-3)


def test_eval_logs_terms(tmp_path, tokenizer, pairs):
    trainer = lora_trainer(tmp_path, tokenizer, pairs)
    trainer.eval_dataset = trainer._prepare_dataset(pairs.select(range(8)), tokenizer, trainer.args, "eval")
    metrics = trainer.evaluate()
    assert metrics["eval_loss/hidden"] == pytest.approx(0.6931, abs=1e-3)
    assert "eval_hidden/layer_3" in metrics


def test_precompute_needs_states_for_new_eval_data(tmp_path, tokenizer, pairs):
    trainer = ReprPOTrainer(
        make_model(tokenizer),
        args=config(tmp_path, precompute_ref_log_probs=True),
        train_dataset=pairs,
        eval_dataset={"held_out": pairs.select(range(4))},
        processing_class=tokenizer,
        peft_config=LoraConfig(**LORA),
    )
    assert "ref_states" in trainer.eval_dataset["held_out"].column_names
    assert trainer.evaluate()["eval_loss/hidden"] == pytest.approx(0.6931, abs=1e-3)
    with pytest.raises(ValueError, match="no precomputed reference states"):
        trainer.evaluate(pairs.select(range(4)))


def test_tensorboard_logging(tmp_path, tokenizer, pairs):
    trainer = lora_trainer(tmp_path, tokenizer, pairs, report_to="tensorboard")
    trainer.train()
    events = list((tmp_path / "out").rglob("events.out.tfevents*"))
    assert events and max(e.stat().st_size for e in events) > 1000


def test_layers_checked_against_model(tmp_path, tokenizer, pairs):
    with pytest.raises(ValueError, match=r"selects layers \[7\], but the model has 4"):
        lora_trainer(tmp_path, tokenizer, pairs, layers="7")


def test_needs_reprpo_config(tmp_path, tokenizer, pairs):
    from trl import DPOConfig

    with pytest.raises(TypeError, match="ReprPOConfig"):
        ReprPOTrainer(make_model(tokenizer), args=DPOConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False), train_dataset=pairs)


@pytest.mark.parametrize(
    "overrides,message",
    [
        ({"hidden_loss": "cosine"}, "hidden_loss='cosine'"),
        ({"pooling": "max"}, "pooling='max'"),
        ({"alpha": -1.0}, "alpha=-1.0 must be >= 0"),
        ({"alpha": 0.0, "dpo_weight": 0.0}, "nothing would be trained"),
        ({"beta_h": 0.0}, "beta_h=0.0 must be > 0"),
        ({"topk_T": 1.0}, "topk_T=1.0 must be > 1"),
        ({"topk_k": 0}, "topk_k=0 must be >= 1"),
        ({"layers": "range(1)"}, "needs 2 or 3 arguments"),
    ],
)
def test_config_validation(overrides, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        config(tmp_path, **overrides)
