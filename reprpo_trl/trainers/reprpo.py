"""ReprPO: DPO plus a hidden-state term on pooled residual-stream states (SPEC "Notation", "Sites", "Hidden-state losses").

    L = w_dpo * L_dpo + alpha * mean_over_sites(mean_batch(L_h(hc, hr, rc, rr)))

Policy and reference states are pooled by forward hooks around TRL's own `compute_loss`, which runs the
policy forward first and then the reference (adapter disabled, or the explicit `ref_model`). With
`precompute_ref_log_probs=True` the pooled reference states are computed once per example next to TRL's
reference log-probs, so training runs no reference forward at all.
"""

import os
from dataclasses import dataclass, field

import torch
from datasets import Dataset, concatenate_datasets
from datasets.fingerprint import Hasher
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from trl import DPOConfig, DPOTrainer

from ..losses import HIDDEN_LOSSES, preference_geometry
from ..sites import POOLINGS, StateCollector, decoder_layers, layer_sites, parse_layer_spec

REF_STATES = "ref_states"  # dataset column / batch key: (2, n_sites, d) pooled reference states per pair


@dataclass
class ReprPOConfig(DPOConfig):
    """DPOConfig plus the hidden-state term. Every field is a YAML key and a CLI flag."""

    layers: str = field(
        default="0.25,0.5,0.75",
        metadata={
            "help": "Decoder layers whose residual output is read: comma-separated ints, negative ints, fractions "
            "of depth (0.5 -> int(0.5 * n_layers)) or range(a, b[, step]) of those forms."
        },
    )
    pooling: str = field(
        default="completion_mean",
        metadata={"help": f"How token states become one vector per completion: one of {POOLINGS}."},
    )
    hidden_loss: str = field(
        default="prefvec",
        metadata={"help": f"Hidden-state loss L_h: one of {sorted(HIDDEN_LOSSES)}."},
    )
    alpha: float = field(default=1.0, metadata={"help": "Weight of the hidden-state term (mean over sites)."})
    dpo_weight: float = field(default=1.0, metadata={"help": "Weight w_dpo of TRL's DPO loss; 0 turns it off."})
    beta_h: float = field(
        default=1.0, metadata={"help": "Temperature of the innerdpo / prefvec / rank logistic terms."}
    )
    retain_weight: float = field(default=1.0, metadata={"help": "mse: weight lambda_retain of the retain term."})
    orth_weight: float = field(default=1.0, metadata={"help": "prefvec: weight gamma_orth of the orthogonal term."})
    angle_weight: float = field(default=0.0, metadata={"help": "prefvec: weight gamma_angle of 1 - |cos(q, u)|."})
    bidirectional: bool = field(
        default=False, metadata={"help": "innerdpo / prefvec: count separation in either direction along p."}
    )
    topk_k: int | None = field(
        default=None, metadata={"help": "topk: number of coordinates of largest |p|; default min(100, d // 4)."}
    )
    topk_T: float = field(default=2.0, metadata={"help": "topk: upper bound T of the separation ratio (> 1)."})

    def __post_init__(self):
        super().__post_init__()
        if self.hidden_loss not in HIDDEN_LOSSES:
            raise ValueError(f"hidden_loss={self.hidden_loss!r}: choose one of {sorted(HIDDEN_LOSSES)}")
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling={self.pooling!r}: choose one of {POOLINGS}")
        for name in ("alpha", "dpo_weight", "retain_weight", "orth_weight", "angle_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 0")
        if self.alpha == 0 and self.dpo_weight == 0:
            raise ValueError("alpha and dpo_weight are both 0: nothing would be trained; set one of them > 0")
        if self.beta_h <= 0:
            raise ValueError(f"beta_h={self.beta_h} must be > 0")
        if self.topk_k is not None and self.topk_k < 1:
            raise ValueError(f"topk_k={self.topk_k} must be >= 1 (or unset for min(100, d // 4))")
        if self.topk_T <= 1:
            raise ValueError(f"topk_T={self.topk_T} must be > 1: it bounds the separation ratio, which is 1 at init")
        parse_layer_spec(self.layers, n_layers=10**6)  # syntax only; indices are checked against the model later

    def hidden_loss_kwargs(self) -> dict:
        """The parameters of the selected L_h, by name."""
        return {
            "mse": {"retain_weight": self.retain_weight},
            "innerdpo": {"beta_h": self.beta_h, "bidirectional": self.bidirectional},
            "prefvec": {
                "beta_h": self.beta_h,
                "bidirectional": self.bidirectional,
                "orth_weight": self.orth_weight,
                "angle_weight": self.angle_weight,
            },
            "rank": {"beta_h": self.beta_h},
            "topk": {"k": self.topk_k, "T": self.topk_T},
        }[self.hidden_loss]


class _WithRefStates:
    """Wraps a preference collator: also stacks the precomputed pooled reference states, when present."""

    def __init__(self, collator):
        self.collator = collator

    def __call__(self, examples):
        batch = self.collator(examples)
        if REF_STATES in examples[0]:
            batch[REF_STATES] = torch.tensor([example[REF_STATES] for example in examples], dtype=torch.float32)
        return batch


class ReprPOTrainer(DPOTrainer):
    """TRL's DPOTrainer with a hidden-state loss on residual-stream sites; see the module docstring."""

    _tag_names = ["trl", "dpo", "reprpo"]

    def __init__(self, model, ref_model=None, args: ReprPOConfig | None = None, **kwargs):
        if not isinstance(args, ReprPOConfig):
            raise TypeError(f"ReprPOTrainer needs args=ReprPOConfig(...), got {type(args).__name__}")
        super().__init__(model, ref_model=ref_model, args=args, **kwargs)
        n_layers = len(decoder_layers(self.model))
        self.layers = parse_layer_spec(args.layers, n_layers)
        models = [self.model] + ([self.ref_model] if self.ref_model is not None else [])
        self.collector = StateCollector(layer_sites(models, self.layers), args.pooling)
        self.hidden_loss_kwargs = args.hidden_loss_kwargs()
        self.data_collator = _WithRefStates(self.data_collator)
        if args.precompute_ref_log_probs:
            self.train_dataset = self.precompute_ref_states(self.train_dataset, "train")
            if isinstance(self.eval_dataset, dict):
                self.eval_dataset = {k: self.precompute_ref_states(v, k) for k, v in self.eval_dataset.items()}
            elif self.eval_dataset is not None:
                self.eval_dataset = self.precompute_ref_states(self.eval_dataset, "eval")

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        if REF_STATES not in self._signature_columns:
            self._signature_columns.append(REF_STATES)

    @torch.no_grad()
    def precompute_ref_states(self, dataset: Dataset, name: str) -> Dataset:
        """Adds column `ref_states` (2, n_sites, d): pooled reference states of chosen and rejected.

        One reference forward per example, before training, through TRL's `compute_ref_log_probs` (so the
        reference is exactly the one DPO uses). Cached beside the dataset, keyed by data, model and sites.
        """
        if REF_STATES in dataset.column_names:
            return dataset
        key = (dataset._fingerprint, self._precompute_model_hash, self.layers, self.args.pooling, REF_STATES)
        fingerprint = Hasher.hash(key)
        cache_file = dataset._get_cache_file_path(fingerprint)
        if not os.path.exists(cache_file):
            loader = DataLoader(
                dataset,
                batch_size=self.args.precompute_ref_batch_size or self.args.per_device_train_batch_size,
                collate_fn=self.data_collator.collator,
                num_workers=self.args.dataloader_num_workers,
                shuffle=False,
            )
            model = getattr(self, "_precompute_engine", None) or self.ref_model or self.model
            rows = []
            for batch in tqdm(self.accelerator.prepare(loader), desc=f"Reference states for {name} dataset"):
                with self.collector.capture(batch["completion_mask"], batch["attention_mask"]) as states:
                    self.compute_ref_log_probs(model, batch)
                stacked = torch.stack([states[site][0] for site in self.collector.sites], dim=1)  # (2B, S, d)
                chosen, rejected = stacked.chunk(2)
                rows.append(self.accelerator.gather_for_metrics(torch.stack([chosen, rejected], dim=1)).cpu())
            ref_states = torch.cat(rows)
            if self.accelerator.is_main_process:
                dataset.map(
                    lambda _, idx: {REF_STATES: ref_states[idx].tolist()},
                    with_indices=True,
                    batched=True,
                    remove_columns=dataset.column_names,
                    new_fingerprint=fingerprint,
                    cache_file_name=cache_file,
                    desc=f"Caching reference states for {name} dataset",
                )
            self.accelerator.wait_for_everyone()
        return concatenate_datasets([dataset, Dataset.from_file(cache_file)], axis=1)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = "train" if self.model.training else "eval"
        inputs = dict(inputs)
        ref_states = inputs.pop(REF_STATES, None)
        if ref_states is None and self.args.precompute_ref_log_probs:
            raise ValueError(
                "precompute_ref_log_probs=True but this batch has no precomputed reference states: pass evaluation "
                "data as eval_dataset (a dataset or a dict of them) when constructing ReprPOTrainer, where its "
                "reference states are precomputed, then call trainer.evaluate() without a dataset argument."
            )
        with self.collector.capture(inputs["completion_mask"], inputs["attention_mask"]) as states:
            output = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        dpo_loss = output[0] if return_outputs else output
        hidden_loss = self.hidden_state_loss(states, ref_states, mode)
        loss = self.args.dpo_weight * dpo_loss + self.args.alpha * hidden_loss
        self._log_metric(mode, "loss/dpo", dpo_loss)
        self._log_metric(mode, "loss/hidden", hidden_loss)
        return (loss, output[1]) if return_outputs else loss

    def hidden_state_loss(self, states, ref_states, mode):
        """mean over sites of mean_batch L_h; logs each site's loss and the loss's diagnostics."""
        loss_fn = HIDDEN_LOSSES[self.args.hidden_loss]
        site_losses, diagnostics = [], {}
        for i, site in enumerate(self.collector.sites):
            hc, hr = states[site][0].chunk(2)
            if ref_states is not None:
                rc, rr = ref_states[:, 0, i].to(hc.device), ref_states[:, 1, i].to(hc.device)
            else:
                rc, rr = states[site][1].detach().chunk(2)
            per_example, diag = loss_fn(hc, hr, rc, rr, **self.hidden_loss_kwargs)
            with torch.no_grad():
                diag = {**preference_geometry(hc, hr, rc, rr), **diag}
            site_losses.append(per_example.mean())
            self._log_metric(mode, f"hidden/{site}", site_losses[-1])
            for name, value in diag.items():
                diagnostics.setdefault(name, []).append(value.mean())
        for name, values in diagnostics.items():
            self._log_metric(mode, f"hidden/{name}", torch.stack(values).mean())
        return torch.stack(site_losses).mean()

    def _log_metric(self, mode, name, value):
        self._metrics[mode][name].append(self.accelerator.gather_for_metrics(value.detach()).mean().item())
