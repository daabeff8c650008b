"""The adapter a run trains (SPEC "Adapters"): one recipe section, one builder, used by every trainer.

    adapter:
      type: lora        # lora | ia3 | hira | prompt | prefix | full
      r: 16             # lora, hira
      alpha: 32         # lora (hira has no alpha: dW = W0 * (B A))
      dropout: 0.0      # lora, hira
      targets: qkvo     # letters q k v o g u d (q_proj ... down_proj) or comma-separated module names
      virtual_tokens: 16  # prompt, prefix

`full` trains every weight without peft; the reference is then a frozen copy or precomputed.
"""

from dataclasses import dataclass, field

from peft import HiraConfig, IA3Config, LoraConfig, PrefixTuningConfig, PromptTuningConfig, TaskType

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
            raise ValueError(f"adapter={self.adapter!r}: choose one of {ADAPTERS}")


def target_modules(spec: str) -> list[str]:
    """'qkvo' -> [q_proj, k_proj, v_proj, o_proj]; 'q_proj,fc1' -> [q_proj, fc1]."""
    spec = spec.strip()
    if "," in spec or "_" in spec:
        return [name.strip() for name in spec.split(",") if name.strip()]
    unknown = sorted(set(spec) - set(TARGET_LETTERS))
    if unknown:
        raise ValueError(f"adapter_targets={spec!r}: unknown letter(s) {unknown}; use {''.join(TARGET_LETTERS)} or module names")
    return [TARGET_LETTERS[letter] for letter in dict.fromkeys(spec)]


def flatten_section(section: dict) -> list[str]:
    """The recipe's `adapter:` mapping as command-line flags."""
    flags = []
    for key, value in section.items():
        name = "adapter" if key == "type" else f"adapter_{key}"
        if name not in AdapterArguments.__dataclass_fields__:
            raise ValueError(f"adapter section: unknown key {key!r}; use type, r, alpha, dropout, targets, virtual_tokens")
        flags += [f"--{name}", str(value)]
    return flags


def check_combination(trainer: str, adapter: str, gradient_checkpointing: bool = False) -> None:
    """Refuse a trainer/adapter pair (or adapter/setting) that cannot work, saying why."""
    refused, reason = REFUSED.get(trainer, ((), ""))
    if adapter in refused:
        raise ValueError(f"trainer {trainer!r} cannot train adapter {adapter!r}: {reason}. Use lora, ia3, hira or full.")
    if adapter == "prefix" and gradient_checkpointing:
        raise ValueError(
            "adapter 'prefix' with gradient_checkpointing: transformers drops the prefix key/value cache in "
            "checkpointed layers, so the prefix would never train. Set gradient_checkpointing: false."
        )


def build_peft_config(args: AdapterArguments):
    """The peft config of `args`, or None for full fine-tuning."""
    task = TaskType.CAUSAL_LM
    if args.adapter == "full":
        return None
    if args.adapter in PROMPT_LEARNING:
        config_class = PromptTuningConfig if args.adapter == "prompt" else PrefixTuningConfig
        return config_class(task_type=task, num_virtual_tokens=args.adapter_virtual_tokens)
    targets = target_modules(args.adapter_targets)
    if args.adapter == "lora":
        return LoraConfig(task_type=task, r=args.adapter_r, lora_alpha=args.adapter_alpha, lora_dropout=args.adapter_dropout,
                          target_modules=targets)  # fmt: skip
    if args.adapter == "hira":
        return HiraConfig(task_type=task, r=args.adapter_r, hira_dropout=args.adapter_dropout, target_modules=targets)
    return IA3Config(task_type=task, target_modules=targets, feedforward_modules=[t for t in targets if t in FEEDFORWARD])
