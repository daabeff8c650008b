"""ReprPO: DPO plus a hidden-state term on pooled residual-stream states (SPEC "Notation", "Sites", "Hidden-state losses").

    L = w_dpo * L_dpo + alpha * mean_over_sites(mean_batch(L_h(hc, hr, rc, rr)))

Policy and reference states are pooled by forward hooks around TRL's own `compute_loss`, which runs the
policy forward first and then the reference (adapter disabled, or the explicit `ref_model`). With
`precompute_ref_log_probs=True` the pooled reference states are computed once per example next to TRL's
reference log-probs, so training runs no reference forward at all.
"""

import os
import warnings
from dataclasses import dataclass, field

import torch
from accelerate.utils import broadcast_object_list
from datasets import Dataset, concatenate_datasets
from datasets.fingerprint import Hasher
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers.trainer_utils import get_last_checkpoint
from trl import DPOConfig, DPOTrainer

from ..losses import HIDDEN_LOSSES, preference_geometry
from ..sites import COLLECTIONS, POOLINGS, SIDE_DEFAULTS, Collection, decoder_layers, parse_layer_spec, side_patterns, unwrap
from ..transforms import ORTHO_MAPS, ORTHOGONAL, TRANSFORMS, SiteTransforms
from .backends import refuse_sharded_backends, require_config

REF_STATES = "ref_states"  # dataset column / batch key: (2, sum of raw site widths) pooled reference states per pair
INVARIANT_LOSSES = ("mse", "innerdpo", "prefvec")  # built from inner products and norms only


@dataclass
class ReprPOConfig(DPOConfig):
    """DPOConfig plus the hidden-state term. Every field is a YAML key and a CLI flag."""

    collection: str = field(
        default="hs",
        metadata={
            "help": f"Which activations the loss reads, one of {COLLECTIONS}: residual output of each layer (hs), "
            "module inputs/outputs matched by side_modules (side), or relu(h_l - h_(l+1)) (suppressed)."
        },
    )
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
    side_modules: str | None = field(
        default=None,
        metadata={
            "help": "collection=side: comma-separated regexes on module names inside each chosen layer; default "
            f"{SIDE_DEFAULTS['input']!r} for side_io=input, {SIDE_DEFAULTS['output']!r} for side_io=output."
        },
    )
    side_io: str = field(
        default="input", metadata={"help": "collection=side: read each matched module's 'input' or 'output'."}
    )
    transform: str = field(
        default="none",
        metadata={"help": f"Map applied to every pooled state before the loss, one instance per site: {TRANSFORMS}."},
    )
    freeze_transform: bool = field(
        default=False, metadata={"help": "Keep the transform at its initialisation instead of training it jointly."}
    )
    ether_blocks: int = field(default=4, metadata={"help": "ether / etherplus: number of diagonal blocks."})
    hra_rank: int = field(default=8, metadata={"help": "hra: number of Householder reflections (even: identity init)."})
    hra_gram_schmidt: bool = field(default=False, metadata={"help": "hra: orthonormalise the reflection vectors."})
    ortho_map: str = field(default="householder", metadata={"help": f"ortho: parametrization, one of {ORTHO_MAPS}."})
    svd_rank: int | None = field(
        default=None, metadata={"help": "svd: number of top lm_head singular directions removed (overrides quantile)."}
    )
    svd_quantile: float = field(
        default=0.75,
        metadata={"help": "svd: remove singular directions whose value is >= this quantile (0.75 -> top quarter)."},
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
        if self.collection not in COLLECTIONS:
            raise ValueError(f"collection={self.collection!r}: choose one of {COLLECTIONS}")
        if self.side_io not in SIDE_DEFAULTS:
            raise ValueError(f"side_io={self.side_io!r}: choose 'input' or 'output'")
        side_patterns(self.side_modules or "")  # syntax only; matches are checked against the model later
        if self.transform not in TRANSFORMS:
            raise ValueError(f"transform={self.transform!r}: choose one of {TRANSFORMS}")
        if self.ortho_map not in ORTHO_MAPS:
            raise ValueError(f"ortho_map={self.ortho_map!r}: choose one of {ORTHO_MAPS}")
        if not 0 < self.svd_quantile < 1:
            raise ValueError(f"svd_quantile={self.svd_quantile} must lie in (0, 1)")
        if self.transform in ORTHOGONAL and self.hidden_loss in INVARIANT_LOSSES:
            warnings.warn(
                f"transform={self.transform} is orthogonal and hidden_loss={self.hidden_loss} depends only on inner "
                "products and norms, so the transform changes nothing but costs compute; pair it with rank or topk, "
                "or use etherplus / svd",
                stacklevel=2,
            )

    @property
    def trains_transform(self) -> bool:
        return self.transform not in ("none", "svd") and not self.freeze_transform

    def transform_kwargs(self) -> dict:
        """The parameters of the selected transform, by name."""
        return {
            "none": {},
            "ether": {"n_blocks": self.ether_blocks},
            "etherplus": {"n_blocks": self.ether_blocks},
            "hra": {"rank": self.hra_rank, "gram_schmidt": self.hra_gram_schmidt},
            "ortho": {"ortho_map": self.ortho_map},
            "svd": {"rank": self.svd_rank, "quantile": self.svd_quantile},
        }[self.transform]

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
        require_config("ReprPOTrainer", args, ReprPOConfig)
        super().__init__(model, ref_model=ref_model, args=args, **kwargs)
        self.layers = parse_layer_spec(args.layers, len(decoder_layers(self.model)))
        models = [self.model] + ([self.ref_model] if self.ref_model is not None else [])
        self.sites = Collection(args.collection, models, self.layers, args.pooling, args.side_modules, args.side_io)
        self.collector = self.sites.collector
        self.hidden_loss_kwargs = args.hidden_loss_kwargs()
        spec = {site: {"name": args.transform, "dim": dim, **args.transform_kwargs()} for site, dim in self.sites.dims.items()}
        unembedding = unwrap(self.model).get_output_embeddings().weight
        self.transforms = SiteTransforms(spec, unembedding).to(self.args.device)
        self.transforms.requires_grad_(args.trains_transform)
        if args.trains_transform:
            refuse_sharded_backends(
                self,
                f"training transform={args.transform} (an optimizer group outside the model)",
                "set freeze_transform=True, or launch single-process or DDP",
            )
        self.data_collator = _WithRefStates(self.data_collator)
        if args.precompute_ref_log_probs:
            self.train_dataset = self.precompute_ref_states(self.train_dataset, "train")
            if isinstance(self.eval_dataset, dict):
                self.eval_dataset = {k: self.precompute_ref_states(v, k) for k, v in self.eval_dataset.items()}
            elif self.eval_dataset is not None:
                self.eval_dataset = self.precompute_ref_states(self.eval_dataset, "eval")

    def create_optimizer(self, model=None):
        """TRL's optimizer, plus a group for the trainable transforms (trained jointly with the adapter)."""
        first_call = self.optimizer is None
        optimizer = super().create_optimizer(model)
        if first_call and self.args.trains_transform:
            optimizer.add_param_group({"params": list(self.transforms.parameters()), "weight_decay": 0.0})
        return optimizer

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        if self.args.trains_transform and self.accelerator.num_processes > 1 and self.accelerator.sync_gradients:
            for parameter in self.transforms.parameters():  # outside the DDP model: average their gradients here
                if parameter.grad is not None:
                    parameter.grad = self.accelerator.reduce(parameter.grad, "mean")
        return loss

    def save_model(self, output_dir=None, _internal_call=False):
        super().save_model(output_dir, _internal_call)
        if self.args.transform != "none" and self.accelerator.is_main_process:
            self.transforms.save(output_dir or self.args.output_dir)

    def train(self, resume_from_checkpoint=None, **kwargs):
        if resume_from_checkpoint and self.args.transform != "none":
            checkpoint = resume_from_checkpoint
            if checkpoint is True:
                checkpoint = get_last_checkpoint(self.args.output_dir)
            self.transforms.load_state_dict(SiteTransforms.load(checkpoint).state_dict())
        return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        if REF_STATES not in self._signature_columns:
            self._signature_columns.append(REF_STATES)

    @torch.no_grad()
    def precompute_ref_states(self, dataset: Dataset, name: str) -> Dataset:
        """Adds column `ref_states` (2, D): pooled reference states of chosen and rejected, raw sites concatenated.

        One reference forward per example, before training, through TRL's `compute_ref_log_probs` (so the
        reference is exactly the one DPO uses). Every process computes the gathered column; a dataset with a cache
        directory gets it cached there (keyed by data, model and sites), an in-memory one holds it in memory.
        """
        if REF_STATES in dataset.column_names:
            return dataset
        sites = (list(self.sites.raw_dims), self.collector.read, self.args.pooling)
        # keyed by the files behind the data (dataset._fingerprint is random after a concatenation); file names can
        # differ between processes, so all of them use the main process's key
        data = [f["filename"] for f in dataset.cache_files] or dataset._fingerprint
        key = Hasher.hash((data, len(dataset), self._precompute_model_hash, sites, REF_STATES))
        fingerprint = broadcast_object_list([key])[0]
        cache_file = dataset._get_cache_file_path(fingerprint) if dataset.cache_files else None
        if cache_file is None or not os.path.exists(cache_file):
            ref_states = self._reference_states(dataset, name)
            if cache_file is None:
                column = Dataset.from_dict({REF_STATES: ref_states.tolist()})
                return concatenate_datasets([dataset, column], axis=1)
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

    def _reference_states(self, dataset: Dataset, name: str) -> torch.Tensor:
        """(N, 2, D) pooled reference states of every example, gathered across processes in dataset order."""
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
            chosen, rejected = torch.cat([states[site][0] for site in self.sites.raw_dims], dim=1).chunk(2)
            rows.append(self.accelerator.gather_for_metrics(torch.stack([chosen, rejected], dim=1)).cpu())
        return torch.cat(rows)

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
        policy = {site: values[0] for site, values in states.items()}
        if ref_states is not None:
            ref_rows = torch.cat([ref_states[:, 0], ref_states[:, 1]]).to(dpo_loss.device)  # [B chosen; B rejected]
            reference = dict(zip(self.sites.raw_dims, ref_rows.split(list(self.sites.raw_dims.values()), dim=1)))
        else:
            reference = {site: values[1].detach() for site, values in states.items()}
        hidden_loss = self.hidden_state_loss(self.sites.derive(policy), self.sites.derive(reference), mode)
        loss = self.args.dpo_weight * dpo_loss + self.args.alpha * hidden_loss
        self._log_metric(mode, "loss/dpo", dpo_loss)
        self._log_metric(mode, "loss/hidden", hidden_loss)
        return (loss, output[1]) if return_outputs else loss

    def hidden_state_loss(self, policy, reference, mode):
        """mean over sites of mean_batch L_h on transformed states; logs each site's loss and the diagnostics.

        policy, reference: {site: (2B, d)} pooled states, rows [B chosen; B rejected]."""
        loss_fn = HIDDEN_LOSSES[self.args.hidden_loss]
        site_losses, diagnostics = [], {}
        for site in policy:
            hc, hr = self.transforms(site, policy[site]).chunk(2)
            rc, rr = self.transforms(site, reference[site]).chunk(2)  # states detached; transform still learns
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
