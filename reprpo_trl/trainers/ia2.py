"""IA2 — ICL activation alignment (docs/methods.md "IA2"): TRL's SFTTrainer taught to reproduce, without demonstrations,
the self-attention outputs the frozen base model has with them.

Student input: query + target tokens (teacher forcing), labels only on the target tokens. With a_s, a_t the
student's and the cached teacher's self-attention outputs at the positions predicting the targets, and P the
number of target tokens (over the accumulated batch, as TRL counts them):
    act  = Σ_layers mean_{t,d} (a_s − a_t)²
    tok  = cross-entropy on the target tokens (TRL's SFT loss)
    tokl = mean_t KL(p_teacher ‖ p_student) over the vocabulary (top-k teacher: the rest spread uniformly)
    tna  = (1 − w)·act + w·tok
    a2t / t2a: start from a trained act / tok adapter (init_adapter) and train with tok / act, fresh optimizer.
"""

from dataclasses import dataclass, field

import torch
from datasets import Dataset
from peft import PeftModel
from trl import SFTConfig, SFTTrainer
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

from .. import sharding
from ..errors import InputError
from ..icl.prompts import student_prompt, teacher_prompts
from ..icl.targets import LABEL_TYPES, cached_targets
from ..models import cache_dir, check_directory
from ..sites import StateCollector, as_base, attention_sites, unwrap
from .backends import require_config
from .guard import GuardedTrainer, check_nonfinite_policy, nonfinite_field

IA2_METHODS = ("act", "tok", "tokl", "tna", "a2t", "t2a")
LOSS_OF_METHOD = {"act": "act", "tok": "tok", "tokl": "tokl", "tna": "tna", "a2t": "tok", "t2a": "act"}


@dataclass
class IA2Config(SFTConfig):
    """SFTConfig plus the IA2 method, its targets and their cache."""

    ia2_method: str = field(default="act", metadata={"help": f"One of {IA2_METHODS}."})
    tna_weight: float = field(default=0.5, metadata={"help": "w in tna = (1 - w) act + w tok."})
    label_type: str = field(default="icl_outputs", metadata={"help": f"Target tokens: one of {LABEL_TYPES}."})
    num_demos: int = field(default=4, metadata={"help": "Demonstrations k in the teacher prompt."})
    demo_seed: int = field(default=0, metadata={"help": "Seed of the per-example demonstration draw."})
    max_new_tokens: int = field(default=4, metadata={"help": "Greedy target tokens at most (icl_outputs)."})
    tokl_topk: int = field(default=0, metadata={"help": "Keep the teacher's top-k probabilities for tokl (0: all)."})
    init_adapter: str | None = field(default=None, metadata={"help": "Adapter directory to start from (a2t, t2a)."})
    target_cache_dir: str | None = field(default=None, metadata={"help": "Target cache root (default $REPRPO_CACHE)."})
    target_batch_size: int = field(default=8, metadata={"help": "Batch size of the one-time teacher pass."})
    on_nonfinite: str = nonfinite_field()

    def __post_init__(self):
        if self.ia2_method not in IA2_METHODS:
            raise ValueError(f"ia2_method={self.ia2_method!r}: choose one of {IA2_METHODS}")
        if self.label_type not in LABEL_TYPES:
            raise ValueError(f"label_type={self.label_type!r}: choose one of {LABEL_TYPES}")
        if not 0.0 <= self.tna_weight <= 1.0:
            raise ValueError(f"tna_weight={self.tna_weight} must lie in [0, 1]")
        check_nonfinite_policy(self.on_nonfinite)
        if self.ia2_method in ("a2t", "t2a") and not self.init_adapter:
            raise ValueError(f"ia2_method={self.ia2_method!r} continues a trained adapter: set init_adapter to its directory")
        self.dataset_kwargs = {**(self.dataset_kwargs or {}), "skip_prepare_dataset": True}  # IA2 builds its own rows
        self.remove_unused_columns = False  # keep ia2_index
        super().__post_init__()

    @property
    def loss(self) -> str:
        return LOSS_OF_METHOD[self.ia2_method]


def answer_positions(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, positions) of the tokens that predict the labelled ones (label at j is predicted at j − 1), in
    row-major order: example by example, target by target. Positions count real tokens; prompt-tuning's
    virtual tokens come first, so states are indexed as h[:, -T:]."""
    return (labels[:, 1:] != -100).nonzero(as_tuple=True)


class IA2Collator(DataCollatorForLanguageModeling):
    """TRL's padding collator, passing each row's index into the cached targets along."""

    def torch_call(self, examples):
        batch = super().torch_call([{k: e[k] for k in ("input_ids", "labels")} for e in examples])
        batch["ia2_index"] = torch.tensor([e["ia2_index"] for e in examples])
        return batch


class IA2Trainer(GuardedTrainer, SFTTrainer):
    """SFTTrainer on (query, answer) rows plus a demonstration pool; see the module docstring."""

    reads_hooked_states = True  # act and tokl backpropagate through hooked attention outputs and final states

    def __init__(self, model, args: IA2Config, train_dataset: Dataset, demo_pool: Dataset, processing_class, peft_config=None, **kwargs):
        require_config("IA2Trainer", args, IA2Config)
        if args.init_adapter:
            check_directory(args.init_adapter, "init_adapter")  # here, not at parse time: a sweep may train it first
        if kwargs.get("eval_dataset") is not None:
            raise ValueError("IA2Trainer takes no eval_dataset: evaluate with reprpo_trl.eval.icl (accuracy with/without demos)")
        zero3 = args.deepspeed_plugin is not None and args.deepspeed_plugin.zero_stage == 3
        if zero3 and args.gradient_checkpointing and args.loss in ("act", "tna"):
            raise InputError(
                f"ia2_method={args.ia2_method} under DeepSpeed ZeRO-3 with gradient checkpointing: the loss reads every "
                "layer's attention output inside the checkpointed layers, and ZeRO-3 re-partitions a frozen weight "
                "during the recompute (torch CheckpointError). Set gradient_checkpointing: false, or use ZeRO-2."
            )
        tokenizer = processing_class
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        prompts = teacher_prompts(train_dataset, demo_pool, args.num_demos, args.demo_seed)
        placed = args.deepspeed or args.fsdp or getattr(model, "hf_device_map", None) or getattr(model, "is_quantized", False)
        if not placed:
            model.to(args.device)  # the teacher pass runs where training will (the Trainer would move it next anyway)
        # ZeRO-3 loads the weights partitioned: every rank gathers them for the one-time teacher pass (and its cache key)
        with sharding.gathered(model), args.main_process_first(desc="IA2 targets"), as_base(model):
            self.targets, self.targets_path, computed = cached_targets(
                model, tokenizer, prompts, list(train_dataset["answer"]), args.target_cache_dir or cache_dir(),
                label_type=args.label_type, max_new_tokens=args.max_new_tokens, distributions=args.loss == "tokl",
                topk=args.tokl_topk, batch_size=args.target_batch_size,
            )  # fmt: skip
        print(f"IA2 targets {'computed and cached' if computed else 'loaded'}: {self.targets_path}")
        if args.init_adapter:
            if peft_config is not None or isinstance(model, PeftModel):
                raise ValueError("init_adapter brings its own adapter: pass the base model and no peft_config")
            model = PeftModel.from_pretrained(model, args.init_adapter, is_trainable=True)
        super().__init__(
            model, args=args, train_dataset=self._student_rows(train_dataset, tokenizer, args.max_length),
            data_collator=IA2Collator(pad_token_id=tokenizer.pad_token_id), processing_class=tokenizer,
            peft_config=peft_config, **kwargs,
        )  # fmt: skip
        sites = attention_sites(self.model)
        if args.loss == "tokl":
            sites["final"] = [unwrap(self.model).get_decoder().norm]
        self.collector = StateCollector(sites)

    def _student_rows(self, examples: Dataset, tokenizer, max_length: int | None) -> Dataset:
        rows = {"input_ids": [], "labels": [], "ia2_index": []}
        for i, query in enumerate(examples["query"]):
            prompt, targets = tokenizer(student_prompt(query))["input_ids"], self.targets.targets_of(i)
            if max_length is not None and len(prompt) + len(targets) > max_length:
                raise InputError(
                    f"IA2 example {i}: query + {len(targets)} target tokens is {len(prompt) + len(targets)} tokens, over "
                    f"max_length={max_length}; targets must not be truncated. Raise max_length or drop the row."
                )
            rows["input_ids"].append(prompt + targets)
            rows["labels"].append([-100] * len(prompt) + targets)
            rows["ia2_index"].append(i)
        return Dataset.from_dict(rows)

    def _per_token(self, total: torch.Tensor, count: int, num_items_in_batch) -> torch.Tensor:
        """`total` (a sum over target tokens) divided the way TRL divides its SFT loss."""
        if num_items_in_batch is None:
            return total / max(count, 1)
        loss = total / torch.as_tensor(num_items_in_batch, device=total.device).clamp(min=1)
        if self.args.average_tokens_across_devices:
            loss = loss * self.accelerator.num_processes
        return loss

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        index = inputs.pop("ia2_index")
        labels = inputs["labels"]
        rows, positions = answer_positions(labels)
        width = labels.shape[1]
        with self.collector.capture(reduce=lambda h: h[:, -width:][rows, positions].float()) as states:
            tok = super().compute_loss(model, inputs, num_items_in_batch=num_items_in_batch)
        flat = self.targets.rows(index.cpu())
        if len(flat) != len(rows):
            raise RuntimeError(f"batch has {len(rows)} target positions but its cached targets have {len(flat)}")
        losses = {"tok": tok}
        if self.args.loss in ("act", "tna"):
            teacher = self.targets.acts[flat].to(labels.device, torch.float32)  # (P, L, d)
            squared = sum(((states[f"layer_{l}"][0] - teacher[:, l]) ** 2).mean(-1).sum() for l in range(teacher.shape[1]))
            losses["act"] = self._per_token(squared, len(rows), num_items_in_batch)
        if self.args.loss == "tokl":
            losses["tokl"] = self._per_token(self._kl_sum(model, states["final"][0], flat), len(rows), num_items_in_batch)
        w = self.args.tna_weight
        loss = (1 - w) * losses["act"] + w * tok if self.args.loss == "tna" else losses[self.args.loss]
        if self.is_fsdp_enabled and self.args.loss == "act":
            # FSDP2 gathers a layer's weights for backward when the gradient reaches the layer's output; act reaches
            # the last layer only through its attention output, so that layer's output must be in the graph
            loss = loss + 0.0 * tok
        for name, value in losses.items():  # per-token terms; with num_items_in_batch each is its share of the step
            self.record(f"ia2/{name}", value, reduce="mean" if num_items_in_batch is None else "sum")
        return loss

    def _kl_sum(self, model, hidden: torch.Tensor, flat: torch.Tensor) -> torch.Tensor:
        """Σ_t KL(p_teacher ‖ p_student) at the target positions, from the final hidden states."""
        head = unwrap(model).get_output_embeddings()  # called as a module, so ZeRO-3 gathers its weight
        log_q = torch.log_softmax(head(hidden.to(head.weight.dtype)).float(), dim=-1)
        p = self.targets.probs[flat].to(hidden.device, torch.float32)
        if self.targets.prob_ids is not None:  # top-k: the remaining mass spread evenly over the other tokens
            top, ids = p, self.targets.prob_ids[flat].to(hidden.device)
            rest = (1 - top.sum(-1, keepdim=True)).clamp(min=0) / max(log_q.shape[-1] - top.shape[-1], 1)
            p = rest.expand_as(log_q).clone().scatter_(-1, ids, top)
        return (torch.special.xlogy(p, p) - p * log_q).sum()
