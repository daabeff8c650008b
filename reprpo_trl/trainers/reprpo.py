"""ReprPO: DPO plus a hidden-state term on pooled residual-stream states (docs/methods.md: "Notation", "Sites", "Hidden-state losses").

    L = w_dpo * L_dpo + alpha * mean_over_sites(mean_batch(L_h(hc, hr, rc, rr)))

Policy and reference states are pooled by forward hooks around TRL's own `compute_loss`, which runs the
policy forward first and then the reference (adapter disabled, or the explicit `ref_model`). With
`precompute_ref_log_probs=True` the pooled reference states are computed once per example next to TRL's
reference log-probs, so training runs no reference forward at all.
"""

import contextlib
import hashlib
import json
import warnings
from dataclasses import dataclass, field

import torch
from accelerate.utils import broadcast_object_list
from datasets import Dataset, concatenate_datasets
from peft import PeftModel
from torch.nn.utils import parametrize
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from trl.models.utils import disable_gradient_checkpointing
from trl.trainer.utils import use_adapter

from .. import sharding
from ..cache import load_tensors, save_tensors
from ..errors import InputError
from ..losses import HIDDEN_LOSSES, preference_geometry
from ..models import cache_dir
from ..sites import COLLECTIONS, POOLINGS, SIDE_DEFAULTS, Collection, decoder_layers, parse_layer_spec, side_patterns, truncated, unwrap
from ..transforms import ORTHO_MAPS, ORTHOGONAL, TRANSFORMS, SiteTransforms
from .backends import require_config
from .dpo import DPOConfig, DPOTrainer

REF_STATES = "ref_states"  # dataset column / batch key: (2, sum of raw site widths) pooled reference states per pair
TRANSFORMS_MODULE = "reprpo_transforms"  # the SiteTransforms' name inside the model, so the engine owns them
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
    dpo_weight: float = field(
        default=1.0,
        metadata={
            "help": "Weight w_dpo of TRL's DPO loss; 0 turns it off, and then training forwards stop after the deepest "
            "site (no later layer, no LM head, no log-probs; loss/dpo is not logged), except under DeepSpeed and "
            "FSDP, whose engines gather and release each layer around a forward that runs to its end."
        },
    )
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
        if self.alpha == 0 and self.trains_transform:
            raise ValueError(
                f"alpha=0 with a trained transform={self.transform}: the transform would get no gradient; set alpha "
                "> 0, freeze_transform=True or transform=none"
            )
        if self.trains_transform:  # used after the forward: DDP's unused-parameter search would count it unused
            if self.ddp_find_unused_parameters:
                raise ValueError(
                    "ddp_find_unused_parameters=True with a trained transform: the transform runs after the model's "
                    "forward, so DDP's search would mark its parameters unused and then see their gradients; leave "
                    "ddp_find_unused_parameters unset (every trainable parameter gets a gradient each step)"
                )
            self.ddp_find_unused_parameters = False
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
    reads_hooked_states = True  # the hidden-state loss backpropagates through hooked states

    def __init__(self, model, ref_model=None, args: ReprPOConfig | None = None, **kwargs):
        require_config("ReprPOTrainer", args, ReprPOConfig)
        super().__init__(model, ref_model=ref_model, args=args, **kwargs)
        self.layers = parse_layer_spec(args.layers, len(decoder_layers(self.model)))
        models = [self.model] + ([self.ref_model] if self.ref_model is not None else [])
        self.sites = Collection(args.collection, models, self.layers, args.pooling, args.side_modules, args.side_io)
        self.collector = self.sites.collector
        self.hidden_loss_kwargs = args.hidden_loss_kwargs()
        kwargs = args.transform_kwargs()
        base = unwrap(self.model)
        # DeepSpeed and FSDP flatten or shard the model's parameters in one dtype, the transforms' included
        sharded_dtype = next(base.parameters()).dtype if self.is_deepspeed_enabled or self.is_fsdp_enabled else None
        if args.transform == "ortho" and sharded_dtype is not None:
            if args.bf16 or args.fp16 or sharded_dtype != torch.float32:
                raise InputError(
                    "transform=ortho under DeepSpeed or FSDP with 16-bit weights: the engine keeps the transform in "
                    "the model's 16-bit dtype, for which torch's orthogonal parametrization has no kernels. Use hra "
                    "or ether (orthogonal too), or train in float32 (bf16: false, dtype: float32)."
                )
            kwargs["dtype"] = "float32"
        spec = {site: {"name": args.transform, "dim": dim, **kwargs} for site, dim in self.sites.dims.items()}
        self.transforms = SiteTransforms(spec, base.get_output_embeddings().weight).to(self.args.device, sharded_dtype)
        self.transforms.requires_grad_(args.trains_transform)
        # A submodule of the model: zeroed, optimized, all-reduced and checkpointed with it; kept out of its weights
        base.add_module(TRANSFORMS_MODULE, self.transforms)
        ignored = {f"{TRANSFORMS_MODULE}.{key}" for key in self.transforms.state_dict()}
        base._keys_to_ignore_on_save = set(base._keys_to_ignore_on_save or ()) | ignored
        # dpo_weight 0: the forwards stop after the deepest site; what runs after it gets no gradient, so it is frozen
        # (its gradient was exactly 0 before; frozen, DDP expects none and the optimizer leaves it as it was).
        # DeepSpeed and FSDP run the whole forward, whose later layers then get a zero gradient.
        sharded = self.is_deepspeed_enabled or self.is_fsdp_enabled
        self.forward_stops_after = self.sites.deepest_layer if args.dpo_weight == 0 and not sharded else None
        if self.forward_stops_after is not None:
            unread = [*decoder_layers(base)[self.forward_stops_after + 1 :], base.get_decoder().norm, base.get_output_embeddings()]
            shared = {id(p) for p in base.get_input_embeddings().parameters()}
            for parameter in (p for module in unread for p in module.parameters() if id(p) not in shared):
                parameter.requires_grad_(False)
        self.data_collator = _WithRefStates(self.data_collator)
        if args.precompute_ref_log_probs:
            self.train_dataset = self.precompute_ref_states(self.train_dataset, "train")
            if isinstance(self.eval_dataset, dict):
                self.eval_dataset = {k: self.precompute_ref_states(v, k) for k, v in self.eval_dataset.items()}
            elif self.eval_dataset is not None:
                self.eval_dataset = self.precompute_ref_states(self.eval_dataset, "eval")

    def get_decay_parameter_names(self, model) -> list[str]:
        """TRL's, less the transforms: they train with the adapter, without weight decay."""
        return [name for name in super().get_decay_parameter_names(model) if TRANSFORMS_MODULE not in name]

    def save_model(self, output_dir=None, _internal_call=False):
        super().save_model(output_dir, _internal_call)
        if self.args.transform != "none":
            weights = sharding.full_state_dict(self.transforms)  # on every rank: ZeRO-3 gathers, FSDP2 assembles
            if self.accelerator.is_main_process:
                self.transforms.save(output_dir or self.args.output_dir, weights)

    def load_extra_state(self, checkpoint):
        if checkpoint and self.args.transform != "none":
            self.transforms.load_state_dict(SiteTransforms.load(checkpoint).state_dict())

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        if REF_STATES not in self._signature_columns:
            self._signature_columns.append(REF_STATES)

    @torch.no_grad()
    def precompute_ref_states(self, dataset: Dataset, name: str) -> Dataset:
        """Adds column `ref_states` (2, D): pooled reference states of chosen and rejected, raw sites concatenated.

        One reference forward per example, before training, through TRL's `compute_ref_log_probs` (so the
        reference is exactly the one DPO uses). Cached in $REPRPO_CACHE/ref_states/ under a key of the tokenized
        data, the reference weights, the sites and every setting that changes a state, with a checksum: a rerun
        finds it wherever its output goes, and a damaged file is recomputed (reprpo_trl.cache).
        """
        if REF_STATES in dataset.column_names:
            return dataset
        key = broadcast_object_list([self._ref_states_key(dataset)])[0]  # the main process's key for everyone
        path = cache_dir() / "ref_states" / f"{key}.safetensors"
        cached = load_tensors(path) if self.accelerator.is_main_process else None
        if broadcast_object_list([cached is not None])[0]:
            states = cached[REF_STATES] if cached is not None else load_tensors(path)[REF_STATES]
        else:
            states = self._reference_states(dataset, name)
            if self.accelerator.is_main_process:
                save_tensors(path, {REF_STATES: states})
            self.accelerator.wait_for_everyone()
        if len(states) != len(dataset):
            raise RuntimeError(f"reference states cache {path}: {len(states)} rows for {len(dataset)} examples")
        return concatenate_datasets([dataset, Dataset.from_dict({REF_STATES: states.numpy()})], axis=1)

    def _ref_states_key(self, dataset: Dataset) -> str:
        """sha256 of what the pooled reference states depend on: tokens, reference weights, sites, settings."""
        args = self.args
        settings = {
            "model": self._precompute_model_hash, "sites": self.sites.raw_dims, "collection": args.collection,
            "side_io": args.side_io, "pooling": args.pooling, "max_length": args.max_length,
            "truncation_mode": args.truncation_mode, "bf16": args.bf16, "fp16": args.fp16, "format": 1,
        }  # fmt: skip
        digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
        columns = [c for c in ("prompt_ids", "chosen_ids", "rejected_ids") if c in dataset.column_names]
        for batch in dataset.select_columns(columns).iter(batch_size=1024):
            digest.update(json.dumps([batch[c] for c in columns]).encode())
        return digest.hexdigest()[:32]

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
        inputs = dict(inputs)
        ref_states = inputs.pop(REF_STATES, None)
        if ref_states is None and self.args.precompute_ref_log_probs:
            raise ValueError(
                "precompute_ref_log_probs=True but this batch has no precomputed reference states: pass evaluation "
                "data as eval_dataset (a dataset or a dict of them) when constructing ReprPOTrainer, where its "
                "reference states are precomputed, then call trainer.evaluate() without a dataset argument."
            )
        stops_early = self.forward_stops_after is not None and self.model.training  # evaluation runs TRL's whole loss
        with self.collector.capture(inputs["completion_mask"], inputs["attention_mask"]) as states:
            if stops_early:
                output = self._truncated_forwards(model, inputs, reference=ref_states is None)
            else:
                output = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        dpo_loss = output[0] if return_outputs else output
        policy = {site: values[0] for site, values in states.items()}
        if ref_states is not None:
            ref_rows = torch.cat([ref_states[:, 0], ref_states[:, 1]]).to(dpo_loss.device)  # [B chosen; B rejected]
            reference = dict(zip(self.sites.raw_dims, ref_rows.split(list(self.sites.raw_dims.values()), dim=1)))
        else:
            reference = {site: values[1].detach() for site, values in states.items()}
        hidden_loss = self.hidden_state_loss(self.sites.derive(policy), self.sites.derive(reference))
        if stops_early:
            loss = self.args.alpha * hidden_loss
        else:
            loss = self.args.dpo_weight * dpo_loss + self.args.alpha * hidden_loss
            self.record("loss/dpo", dpo_loss)
        self.record("loss/hidden", hidden_loss)
        return (loss, output[1]) if return_outputs else loss

    def _truncated_forwards(self, model, inputs, reference: bool):
        """dpo_weight 0: the policy forward, then (unless precomputed) the reference forward as TRL runs it (adapter
        disabled, or the explicit reference model; no grad), each through the deepest site only: no later layer, no
        LM head, no log-probs. Returns a zero standing in for the DPO term, which is neither computed nor logged."""
        model_kwargs = {k: v for k, v in inputs.items() if k not in ("completion_mask", "ref_chosen_logps", "ref_rejected_logps")}
        with truncated(model, self.forward_stops_after):
            model(**model_kwargs, use_cache=False)
        if reference:
            if self.ref_model is not None:
                ref_model, adapter = self.ref_model, contextlib.nullcontext()
            else:
                ref_model, unwrapped = model, self.accelerator.unwrap_model(self.model)
                adapter = use_adapter(unwrapped, "ref" if "ref" in unwrapped.peft_config else None) if isinstance(unwrapped, PeftModel) else contextlib.nullcontext()
            disabled = disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs)
            with torch.no_grad(), disabled, adapter, truncated(ref_model, self.forward_stops_after):
                ref_model(**model_kwargs, use_cache=False)
        return torch.zeros((), device=self.accelerator.device)

    def hidden_state_loss(self, policy, reference):
        """mean over sites of mean_batch L_h on transformed states; logs each site's loss and the diagnostics.

        policy, reference: {site: (2B, d)} pooled states, rows [B chosen; B rejected]. A parametrized map (ortho)
        is built once per call here, not once per use (torch's parametrize cache)."""
        loss_fn = HIDDEN_LOSSES[self.args.hidden_loss]
        site_losses, diagnostics = [], {}
        with parametrize.cached():
            for site in policy:
                hc, hr = self.transforms(site, policy[site]).chunk(2)
                rc, rr = self.transforms(site, reference[site]).chunk(2)  # states detached; transform still learns
                per_example, diag = loss_fn(hc, hr, rc, rr, **self.hidden_loss_kwargs)
                with torch.no_grad():
                    diag = {**preference_geometry(hc, hr, rc, rr), **diag}
                site_losses.append(per_example.mean())
                self.record(f"hidden/{site}", site_losses[-1])
                for name, value in diag.items():
                    diagnostics.setdefault(name, []).append(value.mean())
        for name, values in diagnostics.items():
            self.record(f"hidden/{name}", torch.stack(values).mean())
        return torch.stack(site_losses).mean()
