"""IA2 targets (docs/methods.md "IA2"): what the frozen base model does *with* demonstrations, computed once and cached.

For example i with teacher prompt x_i (k demonstrations + query) and target tokens y_i (T_i tokens: greedy
decoding of the base with x_i, `icl_outputs`, or the tokenised answer, `ground_truth`):
    acts_i[t, l]  = output of layer l's self-attention block at the position predicting y_i[t]
                    (the last prompt token for t = 0), t = 0..T_i-1
    probs_i[t]    = the teacher's next-token distribution there (for `tokl`; optionally its top-k)
Stored in fp16 under <cache_dir>/ia2_targets/<key>.safetensors, keyed by the model, the prompts and answers and
every setting that changes a target, written atomically; a second run loads the file and never runs the teacher.
"""

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm
from trl.trainer.utils import hash_module

from ..cache import load_tensors, save_tensors
from ..sites import StateCollector, attention_sites

LABEL_TYPES = ("icl_outputs", "ground_truth")


@dataclass
class Targets:
    """Flattened over examples: row offsets[i]:offsets[i+1] of each tensor belongs to example i."""

    token_ids: torch.Tensor  # (P,) int64
    acts: torch.Tensor  # (P, L, d) fp16
    offsets: torch.Tensor  # (N + 1,) int64
    probs: torch.Tensor | None = None  # (P, K) fp16, K = vocab or top-k
    prob_ids: torch.Tensor | None = None  # (P, K) int64 vocabulary ids of top-k `probs`; None: the whole vocabulary

    def targets_of(self, i: int) -> list[int]:
        return self.token_ids[self.offsets[i] : self.offsets[i + 1]].tolist()

    def rows(self, index: torch.Tensor) -> torch.Tensor:
        """Flat row numbers of the examples in `index`, in order (example by example, token by token)."""
        return torch.cat([torch.arange(self.offsets[i], self.offsets[i + 1]) for i in index.tolist()])


def left_padded(sequences: list[list[int]], pad_id: int):
    """Left-padded ids, attention mask and position ids (counted from each row's first real token)."""
    width = max(map(len, sequences))
    ids = torch.tensor([[pad_id] * (width - len(s)) + s for s in sequences])
    mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in sequences])
    return ids, mask, (mask.cumsum(1) - 1).clamp(min=0)


def cut_answer(tokens: list[int], tokenizer, eos_id) -> list[int]:
    """Greedy tokens up to (not including) EOS or the first token that contains a line break; at least one."""
    for t, token in enumerate(tokens):
        if token == eos_id or "\n" in tokenizer.decode([token]):
            return tokens[:t] or tokens[:1]
    return tokens


@torch.no_grad()
def compute_targets(model, tokenizer, prompts: list[str], answers: list[str], label_type: str = "icl_outputs",
                    max_new_tokens: int = 4, distributions: bool = False, topk: int = 0, batch_size: int = 8) -> Targets:  # fmt: skip
    """Run the (frozen, adapter-free) `model` on the teacher prompts; see the module docstring."""
    if label_type not in LABEL_TYPES:
        raise ValueError(f"label_type={label_type!r}: choose one of {LABEL_TYPES}")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    collector = StateCollector(attention_sites(model), detach=True)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    token_ids, acts, probs, prob_ids, offsets = [], [], [], [], [0]
    for start in tqdm(range(0, len(prompts), batch_size), desc="IA2 targets (teacher with demonstrations)", leave=False):
        batch_prompts = [tokenizer(p)["input_ids"] for p in prompts[start : start + batch_size]]
        if label_type == "ground_truth":
            targets = [tokenizer(" " + a, add_special_tokens=False)["input_ids"] for a in answers[start : start + batch_size]]
        else:
            ids, mask, _ = left_padded(batch_prompts, pad_id)
            # one process decodes alone (weights gathered under ZeRO-3): no step-by-step sync with the others
            out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
                                 do_sample=False, pad_token_id=pad_id, synced_gpus=False)  # fmt: skip
            targets = [cut_answer(row[ids.shape[1] :].tolist(), tokenizer, tokenizer.eos_token_id) for row in out]
        ids, mask, positions = left_padded([p + t for p, t in zip(batch_prompts, targets)], pad_id)
        width = ids.shape[1]
        rows = torch.cat([torch.full((len(t),), b) for b, t in enumerate(targets)])
        cols = torch.cat([torch.arange(width - len(t) - 1, width - 1) for t in targets])
        with collector.capture(reduce=lambda h: h[rows, cols].to(torch.float16).cpu()) as states:
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=positions.to(device)).logits
        acts.append(torch.stack([states[f"layer_{i}"][0] for i in range(len(states))], dim=1))
        if distributions:
            p = logits[rows.to(device), cols.to(device)].float().softmax(-1)
            if topk:
                p, ids_k = p.topk(topk, dim=-1)
                prob_ids.append(ids_k.cpu())
            probs.append(p.to(torch.float16).cpu())
        for t in targets:
            token_ids.extend(t)
            offsets.append(offsets[-1] + len(t))
    model.train(was_training)
    return Targets(
        token_ids=torch.tensor(token_ids, dtype=torch.int64),
        acts=torch.cat(acts),
        offsets=torch.tensor(offsets, dtype=torch.int64),
        probs=torch.cat(probs) if distributions else None,
        prob_ids=torch.cat(prob_ids) if distributions and topk else None,
    )


def model_fingerprint(model) -> str:
    """Name, config and a checksum of every weight (TRL's hash_module): tells any two models apart."""
    digest = hashlib.sha256(model.config.to_json_string().encode() + hash_module(model).encode())
    return f"{getattr(model.config, '_name_or_path', '')}:{digest.hexdigest()[:16]}"


def targets_key(model, prompts: list[str], answers: list[str], **settings) -> str:
    digest = hashlib.sha256(json.dumps({"model": model_fingerprint(model), **settings}, sort_keys=True).encode())
    for prompt, answer in zip(prompts, answers):
        digest.update(f"{prompt}\x00{answer}\x01".encode())
    return digest.hexdigest()[:24]


def cached_targets(model, tokenizer, prompts, answers, cache_dir, **settings) -> tuple[Targets, Path, bool]:
    """(targets, cache file, whether it was computed now): the cache file's targets if it checks out
    (reprpo_trl.cache), else computed with `compute_targets(**settings)` and saved with a checksum."""
    path = Path(cache_dir) / "ia2_targets" / f"{targets_key(model, prompts, answers, **settings)}.safetensors"
    cached = load_tensors(path)
    if cached is not None:
        return Targets(**cached), path, False
    targets = compute_targets(model, tokenizer, prompts, answers, **settings)
    save_tensors(path, {k: v for k, v in vars(targets).items() if v is not None})
    return targets, path, True
