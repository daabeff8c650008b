"""ReprPOTrainer with side and suppressed sites and with transforms: every loss trains, precomputed references
agree with live ones, transforms train (or stay frozen), are saved beside the adapter and come back on resume."""

import pytest
import torch

from reprpo_trl import losses
from reprpo_trl.losses import HIDDEN_LOSSES
from reprpo_trl.transforms import SiteTransforms
from test_trainer import lora_trainer, lora_weights

INIT_VALUE = {"mse": 1.0, "innerdpo": 0.6931, "prefvec": 0.6931, "rank": 0.6931, "topk": 0.25}  # topk: (1 - T)^2 / T^2, T = 2


@pytest.mark.parametrize("loss", sorted(HIDDEN_LOSSES))
@pytest.mark.parametrize("collection", ["side", "suppressed"])
def test_every_loss_trains_on_every_collection(collection, loss, tmp_path, tokenizer, pairs, monkeypatch):
    # The initial values hold exactly without the normalisers' eps; on a random tiny model some pairs' reference
    # gaps are small enough (|p|^2 ~ 1e-5) for eps = 1e-6 to move them, so this test takes eps out.
    monkeypatch.setattr(losses, "EPS", 1e-12)
    trainer = lora_trainer(tmp_path, tokenizer, pairs, collection=collection, hidden_loss=loss, layers="1,2", max_steps=2)
    before = lora_weights(trainer.model)
    trainer.train()
    after = lora_weights(trainer.model)
    assert any(not torch.equal(before[n], after[n]) for n in before if "lora_B" in n)
    logged = trainer.state.log_history[0]
    site = "hidden/layer_1.self_attn.o_proj" if collection == "side" else "hidden/suppressed_1"
    assert site in logged
    # pi = ref at the first step. The relu'd suppressed gaps of a random tiny model are ~1e-3, where even small
    # eps-like effects shift the initial values; there only the exact ones are checked (retain = 0, rank = log 2).
    assert logged.get("hidden/retain", 0.0) == 0.0
    if collection == "side" or loss == "rank":
        assert logged["loss/hidden"] == pytest.approx(INIT_VALUE[loss], abs=1e-2)


@pytest.mark.parametrize("collection", ["side", "suppressed"])
def test_precomputed_reference_states_for_other_collections(collection, tmp_path, tokenizer, pairs):
    kwargs = dict(collection=collection, hidden_loss="mse", layers="1,2", max_steps=2)
    live = lora_trainer(tmp_path / "live", tokenizer, pairs, **kwargs)
    pre = lora_trainer(tmp_path / "pre", tokenizer, pairs, precompute_ref_log_probs=True, **kwargs)
    assert len(pre.train_dataset[0]["ref_states"][0]) == sum(pre.sites.raw_dims.values())
    live.train()
    pre.train()
    for step in (0, 1):
        assert pre.state.log_history[step]["loss/hidden"] == pytest.approx(
            live.state.log_history[step]["loss/hidden"], abs=1e-4
        )


def transform_params(trainer):
    return [p.detach().clone() for p in trainer.transforms.parameters()]


@pytest.mark.parametrize("transform", ["ether", "etherplus", "hra", "ortho"])
def test_transform_trains_jointly_with_the_adapter(transform, tmp_path, tokenizer, pairs):
    trainer = lora_trainer(tmp_path, tokenizer, pairs, transform=transform, hidden_loss="rank", max_steps=2)
    before = transform_params(trainer)
    trainer.train()
    assert trainer.state.log_history[0]["loss/hidden"] == pytest.approx(0.6931, abs=1e-3)  # log 2 at init
    assert all(not torch.equal(a, b) for a, b in zip(before, transform_params(trainer)))
    group = trainer.optimizer.param_groups[-1]["params"]
    assert {id(p) for p in group} == {id(p) for p in trainer.transforms.parameters()}


def test_frozen_transform_stays_put(tmp_path, tokenizer, pairs):
    trainer = lora_trainer(tmp_path, tokenizer, pairs, transform="ether", hidden_loss="topk", freeze_transform=True)
    before = transform_params(trainer)
    trainer.train()
    assert all(torch.equal(a, b) for a, b in zip(before, transform_params(trainer)))
    optimized = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert not optimized & {id(p) for p in trainer.transforms.parameters()}


def test_svd_transform_changes_the_loss_and_has_no_parameters(tmp_path, tokenizer, pairs):
    plain = lora_trainer(tmp_path / "a", tokenizer, pairs, hidden_loss="rank", max_steps=2)
    svd = lora_trainer(tmp_path / "b", tokenizer, pairs, hidden_loss="rank", transform="svd", svd_rank=8, max_steps=2)
    assert not list(svd.transforms.parameters())
    plain.train()
    svd.train()
    assert svd.state.log_history[1]["loss/hidden"] != pytest.approx(plain.state.log_history[1]["loss/hidden"], abs=1e-7)


def test_transforms_saved_with_the_adapter_and_restored_on_resume(tmp_path, tokenizer, pairs):
    trainer = lora_trainer(
        tmp_path, tokenizer, pairs, transform="hra", hidden_loss="rank", max_steps=2, save_strategy="steps", save_steps=2
    )
    trainer.train()
    checkpoint = tmp_path / "out" / "checkpoint-2"
    assert (checkpoint / "reprpo_transforms.json").exists() and (checkpoint / "adapter_model.safetensors").exists()
    trainer.save_model(str(tmp_path / "final"))
    loaded = SiteTransforms.load(str(tmp_path / "final"))
    h = torch.randn(3, 32).to(trainer.args.device)  # where the trainer placed its transforms
    torch.testing.assert_close(loaded.to(trainer.args.device)("layer_1", h), trainer.transforms("layer_1", h))

    resumed = lora_trainer(tmp_path, tokenizer, pairs, transform="hra", hidden_loss="rank", max_steps=2)
    assert not torch.allclose(resumed.transforms("layer_1", h), trainer.transforms("layer_1", h))
    resumed.train(resume_from_checkpoint=True)
    torch.testing.assert_close(resumed.transforms("layer_1", h), trainer.transforms("layer_1", h))


def test_transforms_train_without_weight_decay(tmp_path, tokenizer, pairs):
    """AdamW's weight decay on torch's householder parametrization collapses the map to zero: transforms are kept out
    of the decayed group even when the adapter is decayed."""
    trainer = lora_trainer(tmp_path, tokenizer, pairs, transform="ortho", hidden_loss="rank", max_steps=2, weight_decay=0.1)
    trainer.train()
    decayed = {id(p) for group in trainer.optimizer.param_groups if group["weight_decay"] > 0 for p in group["params"]}
    assert decayed and not decayed & {id(p) for p in trainer.transforms.parameters()}
    eye = torch.eye(32, dtype=torch.float64, device=trainer.args.device)
    m = trainer.transforms("layer_1", eye)
    assert torch.allclose(m @ m.T, eye, atol=1e-10)
