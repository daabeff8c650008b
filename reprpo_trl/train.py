"""reprpo-train: one training run from a YAML recipe, with CLI flags overriding the recipe.

    reprpo-train --config recipes/reprpo_prefvec.yaml [--learning_rate 1e-4 ...]
    accelerate launch --config_file accelerate_configs/ddp.yaml -m reprpo_trl.train --config recipes/...

The recipe's `trainer` key picks the trainer and so the config class whose fields it may set:
`dpo` (TRL's own DPOTrainer, the baseline), `reprpo`, `projgrad`, `projbp`, `ia2`, and `sft` (TRL's own SFTTrainer on
instruction data such as Commonsense-170K, the PEFT-baselines study). Model keys are TRL's ModelConfig
(model_name_or_path, dtype, ...); the `adapter:` section is `AdapterArguments` (reprpo_trl.adapters); data keys
are `RunArguments` below.
"""

import sys
from dataclasses import dataclass, field

import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import DPOConfig, DPOTrainer, ModelConfig, SFTConfig, SFTTrainer, TrlParser

from .adapters import AdapterArguments, build_peft_config, check_combination, flatten_section
from .data import check_truncation, load_preference_dataset, load_sft_dataset, on_disk, to_conversational
from .eval import load_shift_spec
from .eval.callback import ShiftEvalCallback
from .models import resolve_model
from .provenance import write_run_record
from .icl import load_icl_task
from .trainers import (
    IA2Config,
    IA2Trainer,
    ProjBPConfig,
    ProjBPTrainer,
    ProjGradConfig,
    ProjGradTrainer,
    ReprPOConfig,
    ReprPOTrainer,
)

TRAINERS = {
    "dpo": (DPOConfig, DPOTrainer),
    "reprpo": (ReprPOConfig, ReprPOTrainer),
    "projgrad": (ProjGradConfig, ProjGradTrainer),
    "projbp": (ProjBPConfig, ProjBPTrainer),
    "ia2": (IA2Config, IA2Trainer),
    "sft": (SFTConfig, SFTTrainer),
}


@dataclass
class RunArguments:
    """What to train on, and with which trainer."""

    trainer: str = field(default="reprpo", metadata={"help": f"Trainer: one of {sorted(TRAINERS)}."})
    train_dataset: str = field(
        default="suite:add_small:train",
        metadata={"help": "Dataset spec: suite:<family>:<split>, a local parquet/json/csv, or <hub id>[:config[:split]]. "
                  "For trainer ia2 an ICL task: suite:<task>, sst2, agnews, gsm8k, sciq or a local file. For trainer sft "
                  "instruction rows (instruction/input/output): suite:commonsense:<split>, commonsense_170k, a file or a hub id."},
    )
    eval_dataset: str | None = field(default=None, metadata={"help": "Dataset spec for evaluation during training."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Use at most this many training pairs."})
    demo_pool_size: int = field(default=64, metadata={"help": "ia2: demonstrations held out of the training data."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Use at most this many evaluation pairs."})
    conversational: bool = field(
        default=False, metadata={"help": "Turn plain prompt/chosen/rejected rows into chat messages first."}
    )
    shift_eval: str | None = field(
        default=None, metadata={"help": "Shift spec YAML to evaluate every shift_eval_steps steps (generalisation curves)."}
    )
    shift_eval_steps: int = field(default=50, metadata={"help": "Steps between shift evaluations."})
    shift_eval_samples: int = field(default=32, metadata={"help": "Pairs per dataset in each shift evaluation."})
    max_truncated_fraction: float = field(
        default=0.05,
        metadata={"help": "Refuse to train when more than this fraction of pairs is longer than max_length."},
    )


def trainer_name(argv: list[str], recipe: dict | None = None) -> str:
    """The trainer named by --trainer, else by the recipe's `trainer` key, else the default."""
    if "--trainer" in argv:
        name = argv[argv.index("--trainer") + 1]
    else:
        name = (recipe or {}).get("trainer", RunArguments.trainer)
    if name not in TRAINERS:
        raise ValueError(f"trainer={name!r}: choose one of {sorted(TRAINERS)}")
    return name


def _recipe(argv: list[str]) -> dict:
    if "--config" not in argv:
        return {}
    with open(argv[argv.index("--config") + 1]) as f:
        return yaml.safe_load(f) or {}


def parse_args(argv: list[str] | None = None):
    """(RunArguments, trainer config, ModelConfig, AdapterArguments); the recipe's `adapter:` section becomes
    --adapter* flags placed before the command line's own, so command-line flags still win."""
    argv = list(sys.argv[1:] if argv is None else argv)
    recipe = _recipe(argv)
    if recipe.get("use_peft") or "--use_peft" in argv:
        raise ValueError("use_peft/lora_* are not used here: describe the adapter in the recipe's `adapter:` section "
                         "(type: lora, r: 16, ...) or with --adapter lora --adapter_r 16 ...")  # fmt: skip
    section = recipe.get("adapter")
    if isinstance(section, dict):
        argv = argv[: argv.index("--config") + 2] + flatten_section(section) + argv[argv.index("--config") + 2 :]
    config_class, _ = TRAINERS[trainer_name(argv, recipe)]
    parser = TrlParser((RunArguments, config_class, ModelConfig, AdapterArguments))
    if isinstance(section, dict):  # the section is in the flags now; as a default it would not be a string
        parser.set_defaults(adapter=AdapterArguments.adapter)
    run_args, train_args, model_args, adapter_args = parser.parse_args_and_config(argv)
    check_combination(run_args.trainer, adapter_args.adapter, train_args.gradient_checkpointing)
    return run_args, train_args, model_args, adapter_args


def load_data(run_args: RunArguments, train_args, tokenizer):
    """Train and eval datasets from their specs, checked for truncation against `max_length`."""
    datasets = {}
    for split, spec, n in (
        ("train", run_args.train_dataset, run_args.max_train_samples),
        ("eval", run_args.eval_dataset, run_args.max_eval_samples),
    ):
        if spec is None:
            continue
        load = load_sft_dataset if run_args.trainer == "sft" else load_preference_dataset
        dataset = load(spec, n=n, seed=train_args.seed)
        if run_args.conversational and run_args.trainer == "sft":
            raise ValueError("conversational: true turns preference pairs into chat messages; trainer sft trains on the "
                             "Alpaca prompt of instruction rows. Remove conversational from the recipe.")  # fmt: skip
        if run_args.conversational and isinstance(dataset[0]["prompt"], str):
            dataset = dataset.map(to_conversational, desc=f"Chat format for {spec}")
        fraction = check_truncation(dataset, tokenizer, train_args.max_length, run_args.max_truncated_fraction, spec)
        print(f"{split} dataset {spec}: {len(dataset)} rows, {fraction:.1%} longer than max_length")
        with train_args.main_process_first(desc=f"saving {spec}"):
            datasets[split] = on_disk(dataset)
    return datasets


def build_trainer(run_args: RunArguments, train_args, model_args: ModelConfig, adapter_args: AdapterArguments):
    """Load model, tokenizer and data and construct the trainer the recipe names."""
    path = resolve_model(model_args.model_name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(path, revision=model_args.model_revision)
    model = AutoModelForCausalLM.from_pretrained(
        path,
        revision=model_args.model_revision,
        dtype=model_args.dtype or "auto",
        attn_implementation=model_args.attn_implementation,
    )
    _, trainer_class = TRAINERS[run_args.trainer]
    if run_args.trainer == "ia2":
        examples, pool = load_icl_task(run_args.train_dataset, "train", n=run_args.max_train_samples,
                                       pool_size=run_args.demo_pool_size, seed=train_args.seed)  # fmt: skip
        peft_config = None if train_args.init_adapter else build_peft_config(adapter_args)  # a2t/t2a: its own adapter
        return trainer_class(model, args=train_args, train_dataset=examples, demo_pool=pool, processing_class=tokenizer,
                             peft_config=peft_config)  # fmt: skip
    datasets = load_data(run_args, train_args, tokenizer)
    trainer = trainer_class(
        model,
        args=train_args,
        train_dataset=datasets["train"],
        eval_dataset=datasets.get("eval"),
        processing_class=tokenizer,
        peft_config=build_peft_config(adapter_args),
    )
    if run_args.shift_eval:
        trainer.add_callback(
            ShiftEvalCallback(
                trainer, load_shift_spec(run_args.shift_eval), every=run_args.shift_eval_steps, n=run_args.shift_eval_samples,
                batch_size=train_args.per_device_eval_batch_size, seed=train_args.seed,
            )
        )  # fmt: skip
    return trainer


def _recipe_path(argv: list[str] | None) -> str | None:
    argv = list(sys.argv[1:] if argv is None else argv)
    return argv[argv.index("--config") + 1] if "--config" in argv else None


def run(argv: list[str] | None = None):
    """Parse, train, save the model (the adapter, for peft) and the run record to output_dir; return the trainer."""
    run_args, train_args, model_args, adapter_args = parse_args(argv)
    trainer = build_trainer(run_args, train_args, model_args, adapter_args)
    trainer.train()
    trainer.save_model(train_args.output_dir)
    if trainer.is_world_process_zero():
        write_run_record(train_args.output_dir, run_args, train_args, model_args, adapter_args.adapter, _recipe_path(argv))
    return trainer


def main(argv: list[str] | None = None) -> None:
    run(argv)


if __name__ == "__main__":
    main()
