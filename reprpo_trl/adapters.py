"""The adapter a run trains (docs/methods.md "Adapters"): one recipe section, one builder, used by every trainer.

    adapter:
      type: lora        # lora | ia3 | hira | prompt | prefix | full
      r: 16             # lora, hira
      alpha: 32         # lora (hira has no alpha: dW = W0 * (B A))
      dropout: 0.0      # lora, hira
      targets: qkvo     # letters q k v o g u d (q_proj ... down_proj), or module names: q_proj,fc1 or fc1
      virtual_tokens: 16  # prompt, prefix

`full` trains every weight without peft; the reference is then a frozen copy or precomputed.
"""

import difflib
from dataclasses import dataclass, field

from peft import HiraConfig, IA3Config, LoraConfig, PrefixTuningConfig, PromptTuningConfig, TaskType
from torch import nn

from .errors import InputError

ADAPTERS = ("lora", "ia3", "hira", "prompt", "prefix", "full")
PROMPT_LEARNING = ("prompt", "prefix")
TARGET_LETTERS = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj", "g": "gate_proj", "u": "up_proj", "d": "down_proj"}
FEEDFORWARD = ("gate_proj", "up_proj", "down_proj")
# trainer -> adapters it refuses, and why
_NO_OUTPUT_AXIS = "gradient projection acts on the output axis of adapted weights; prompt and prefix tuning have none"
REFUSED = {"projgrad": (PROMPT_LEARNING, _NO_OUTPUT_AXIS), "projbp": (PROMPT_LEARNING, _NO_OUTPUT_AXIS)}


@dataclass
class AdapterArguments:
    """What trains: the `adapter` recipe section, flattened to flags (--adapter lora --adapter_r 8 ...)."""

    adapter: str = field(default="full", metadata={"help": f"Adapter type: one of {ADAPTERS}."})
    adapter_r: int = field(default=16, metadata={"help": "Rank (lora, hira)."})
    adapter_alpha: float = field(default=32.0, metadata={"help": "LoRA scaling alpha (lora only)."})
    adapter_dropout: float = field(default=0.0, metadata={"help": "Dropout on the adapter input (lora, hira)."})
    adapter_targets: str = field(
        default="qkvogud", metadata={"help": "Target modules: letters of q,k,v,o,g,u,d or comma-separated module names."}
    )
    adapter_virtual_tokens: int = field(default=16, metadata={"help": "Virtual tokens (prompt, prefix)."})

    def __post_init__(self):
        if self.adapter not in ADAPTERS:
            raise InputError(f"adapter={self.adapter!r}: choose one of {ADAPTERS}")
        if not target_modules(self.adapter_targets):
            raise InputError("adapter_targets is empty: give letters of qkvogud or comma-separated module names")


def target_modules(spec: str) -> list[str]:
    """'qkvo' -> [q_proj, k_proj, v_proj, o_proj] (letters, when every character is one of qkvogud);
    otherwise module names: 'q_proj,fc1' -> [q_proj, fc1], 'fc1' -> [fc1]."""
    spec = spec.strip()
    if spec and set(spec) <= set(TARGET_LETTERS):
        return [TARGET_LETTERS[letter] for letter in dict.fromkeys(spec)]
    return [name.strip() for name in spec.split(",") if name.strip()]


def check_targets(model: nn.Module, spec: str) -> None:
    """Refuse target names that match no module of `model`: peft matches a name against the end of each module's
    dotted name and silently drops one that matches nothing when another target does match."""
    names = [name for name, _ in model.named_modules()]
    missing = [t for t in target_modules(spec) if not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
        verb = "matches" if len(missing) == 1 else "match"
        raise InputError(f"adapter_targets={spec!r}: {', '.join(missing)} {verb} no module of the model; use letters "
                         f"of {''.join(TARGET_LETTERS)} or names of its linear modules: {', '.join(linear)}")  # fmt: skip


def flatten_section(section: dict) -> list[str]:
    """The recipe's `adapter:` mapping as command-line flags."""
    flags = []
    for key, value in section.items():
        name = "adapter" if key == "type" else f"adapter_{key}"
        if name not in AdapterArguments.__dataclass_fields__:
            keys = ["type", *(f.removeprefix("adapter_") for f in AdapterArguments.__dataclass_fields__ if f != "adapter")]
            close = difflib.get_close_matches(str(key), keys, n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"use {', '.join(keys)}"
            raise InputError(f"adapter section: unknown key {key!r}; {hint}")
        if isinstance(value, list) and key == "targets":  # targets: [q_proj, fc1]
            value = ",".join(map(str, value))
        if isinstance(value, (list, dict)):
            raise InputError(f"adapter section: {key}: {value!r} is a {type(value).__name__}; {key} takes one value")
        flags += [f"--{name}", str(value)]
    return flags


def check_combination(trainer: str, adapter: str, gradient_checkpointing: bool = False) -> None:
    """Refuse a trainer/adapter pair (or adapter/setting) that cannot work, saying why."""
    refused, reason = REFUSED.get(trainer, ((), ""))
    if adapter in refused:
        raise InputError(f"trainer {trainer!r} cannot train adapter {adapter!r}: {reason}. Use lora, ia3, hira or full.")
    if adapter == "prefix" and gradient_checkpointing:
        raise InputError(
            "adapter 'prefix' with gradient_checkpointing: transformers drops the prefix key/value cache in "
            "checkpointed layers, so the prefix would never train. Set gradient_checkpointing: false."
        )


def build_peft_config(args: AdapterArguments, model: nn.Module | None = None):
    """The peft config of `args`, or None for full fine-tuning; given the `model`, its targets are checked."""
    task = TaskType.CAUSAL_LM
    if args.adapter == "full":
        return None
    if args.adapter in PROMPT_LEARNING:
        config_class = PromptTuningConfig if args.adapter == "prompt" else PrefixTuningConfig
        return config_class(task_type=task, num_virtual_tokens=args.adapter_virtual_tokens)
    if model is not None:
        check_targets(model, args.adapter_targets)
    targets = target_modules(args.adapter_targets)
    if args.adapter == "lora":
        return LoraConfig(task_type=task, r=args.adapter_r, lora_alpha=args.adapter_alpha, lora_dropout=args.adapter_dropout,
                          target_modules=targets)  # fmt: skip
    if args.adapter == "hira":
        return HiraConfig(task_type=task, r=args.adapter_r, hira_dropout=args.adapter_dropout, target_modules=targets)
    return IA3Config(task_type=task, target_modules=targets, feedforward_modules=[t for t in targets if t in FEEDFORWARD])
