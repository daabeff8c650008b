"""reprpo-train: one training run from a YAML recipe, with CLI flags overriding the recipe.

    reprpo-train --config recipes/reprpo_prefvec.yaml [--learning_rate 1e-4 ...]
    accelerate launch --config_file accelerate_configs/ddp.yaml -m reprpo_trl.train --config recipes/...

The recipe's `trainer` key picks the trainer and so the config class whose fields it may set:
`dpo` (TRL's own DPOTrainer with the run guard, the baseline), `reprpo`, `projgrad`, `projbp`, `ia2`, and `sft` (TRL's
own SFTTrainer with the run guard, on instruction data such as Commonsense-170K, the PEFT-baselines study). Model keys
are TRL's ModelConfig
(model_name_or_path, dtype, ...); the `adapter:` section is `AdapterArguments` (reprpo_trl.adapters); data keys
are `RunArguments` below. `--key=value` means `--key value`. Bad input (an unknown or misspelled key, a value of
the wrong kind, a missing file) is refused before anything is loaded or written, as one line naming the key
(see reprpo_trl.errors; --debug shows the traceback).
"""

import difflib
import os
import sys
import typing
from dataclasses import dataclass, field, fields

from accelerate import PartialState
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import ModelConfig, TrlParser

from .adapters import AdapterArguments, build_peft_config, check_combination, flatten_section
from .data import check_truncation, load_preference_dataset, load_sft_dataset, on_disk, to_conversational
from .data.loading import local_format
from .dynamics.callbacks import DynamicsArguments, attach_dynamics
from .checkpoints import STOP_FILE
from .errors import InputError, Stopped, command
from .eval import load_shift_spec
from .eval.callback import ShiftEvalCallback
from .io import read_yaml, removed_on_error
from .models import resolve_model
from .provenance import write_run_record
from .icl import load_icl_task
from .trainers import (
    DPOConfig,
    DPOTrainer,
    IA2Config,
    IA2Trainer,
    ProjBPConfig,
    ProjBPTrainer,
    ProjGradConfig,
    ProjGradTrainer,
    ReprPOConfig,
    ReprPOTrainer,
    SFTConfig,
    SFTTrainer,
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
class RunArguments(DynamicsArguments):
    """What to train on, and with which trainer; the training-dynamics keys (weight_stats, llc, ...) come from
    reprpo_trl.dynamics."""

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

    def __post_init__(self):
        super().__post_init__()
        for name, spec in (("max_train_samples", self.train_dataset), ("max_eval_samples", self.eval_dataset)):
            n = getattr(self, name)
            if n is not None and n < 1:
                raise InputError(f"dataset {spec!r} is empty with {name}={n}: set it to at least 1, or leave it unset "
                                 "to use every row")  # fmt: skip
        for spec in (self.train_dataset, self.eval_dataset):
            if spec is not None:
                local_format(spec)  # a missing file or an unreadable suffix, before any model loads
        if self.shift_eval:
            load_shift_spec(self.shift_eval)


def split_flag_values(argv: list[str]) -> list[str]:
    """`--key=value` -> `--key value`, so that --config=x.yaml and --trainer=dpo mean what the spaced forms mean."""
    return [part for arg in argv for part in (arg.split("=", 1) if arg.startswith("--") and "=" in arg else [arg])]


def flag_value(argv: list[str], flag: str) -> str | None:
    """The value after `flag` in `argv` (either form), or None when the flag is absent."""
    argv = split_flag_values(argv)
    if flag not in argv:
        return None
    i = argv.index(flag) + 1
    if i == len(argv) or argv[i].startswith("--"):
        raise InputError(f"{flag} needs a value")
    return argv[i]


def trainer_name(argv: list[str], recipe: dict | None = None) -> str:
    """The trainer named by --trainer, else by the recipe's `trainer` key, else the default."""
    name = flag_value(argv, "--trainer") or (recipe or {}).get("trainer", RunArguments.trainer)
    if not isinstance(name, str) or name not in TRAINERS:
        raise InputError(f"trainer={name!r}: choose one of {sorted(TRAINERS)}")
    return name


class _Parser(TrlParser):
    """TrlParser whose errors (a value of the wrong type, an ambiguous flag) are InputErrors, not a usage dump."""

    def error(self, message):
        raise InputError(f"{message}; fix it in the recipe or on the command line")


def _unknown(key: str, known: set[str], trainer: str, flag: bool = False) -> str:
    """Why `key` is refused: it belongs to other trainers, or it is unknown (with the closest accepted keys)."""
    name = f"--{key}" if flag else key
    owners = [t for t, (config, _) in TRAINERS.items() if key in {f.name for f in fields(config)}]
    if owners:
        source = "run" if flag else "recipe"
        return f"{name} is a field of trainer(s) {', '.join(owners)}; this {source} uses trainer {trainer}"
    close = [f"--{c}" if flag else c for c in difflib.get_close_matches(key, known, n=3)]
    hint = f"did you mean {' or '.join(close)}?" if close else f"reprpo-train --trainer {trainer} --help lists them"
    return f"unknown {'flag' if flag else 'key'} {name}; {hint}"


def _number_type(field_type) -> str | None:
    """'int', 'float' or 'bool' for a field of that type (or that type or None), else None."""
    options = [t for t in typing.get_args(field_type) if t is not type(None)] or [field_type]
    return options[0].__name__ if len(options) == 1 and options[0] in (int, float, bool) else None


def check_keys(parser: TrlParser, classes: tuple, recipe: dict, recipe_path: str | None, argv: list[str], trainer: str):
    """Refuse recipe keys and flags that no dataclass of this trainer takes, and lists or mappings where one number
    belongs, before TrlParser would refuse them without saying which key was meant."""
    known = {action.dest for action in parser._actions if action.dest != "help"}
    numbers = {f.name: _number_type(f.type) for c in classes for f in fields(c)}
    where = f"recipe {recipe_path!r}"
    for key, value in recipe.items():
        if key not in known and key != "env":
            raise InputError(f"{where}: {_unknown(str(key), known, trainer)}")
        if numbers.get(key) and isinstance(value, (list, dict)):
            raise InputError(f"{where}: {key}: {value!r} is a {type(value).__name__}, but {key} takes one "
                             f"{numbers[key]}; write one recipe per value to compare several")  # fmt: skip
    if "-h" in argv or "--help" in argv:  # TrlParser prints the help, with the recipe's values as defaults
        return
    if recipe_path is not None:
        i = argv.index("--config")
        argv = argv[:i] + argv[i + 2 :]
    for token in parser.parse_known_args(argv)[1]:
        if token.startswith("--"):
            raise InputError(_unknown(token[2:], known, trainer, flag=True))
        hint = f"did you mean --config {token}?" if token.endswith((".yaml", ".yml")) else "flags take the form --key value"
        raise InputError(f"unexpected argument {token!r}; {hint}")


def parse_args(argv: list[str] | None = None):
    """(RunArguments, trainer config, ModelConfig, AdapterArguments); the recipe's `adapter:` section becomes
    --adapter* flags placed before the command line's own, so command-line flags still win. Every error about
    the recipe or the flags is an InputError naming the key."""
    argv = split_flag_values(sys.argv[1:] if argv is None else argv)
    recipe_path = flag_value(argv, "--config")
    recipe = {} if recipe_path is None else read_yaml(recipe_path, "recipe")
    if recipe.get("use_peft") or "--use_peft" in argv:
        raise InputError("use_peft/lora_* are not used here: describe the adapter in the recipe's `adapter:` section "
                         "(type: lora, r: 16, ...) or with --adapter lora --adapter_r 16 ...")  # fmt: skip
    section = recipe.get("adapter")
    if isinstance(section, dict):
        argv = argv[: argv.index("--config") + 2] + flatten_section(section) + argv[argv.index("--config") + 2 :]
    trainer = trainer_name(argv, recipe)
    classes = (RunArguments, TRAINERS[trainer][0], ModelConfig, AdapterArguments)
    parser = _Parser(classes)
    check_keys(parser, classes, recipe, recipe_path, argv, trainer)
    if isinstance(section, dict):  # the section is in the flags now; as a default it would not be a string
        parser.set_defaults(adapter=AdapterArguments.adapter)
    try:
        run_args, train_args, model_args, adapter_args = parser.parse_args_and_config(argv)
    except InputError:
        raise
    except ValueError as error:  # a config's __post_init__ refusing a value: the user's input, named there
        raise InputError(str(error)) from error
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
            raise InputError("conversational: true turns preference pairs into chat messages; trainer sft trains on the "
                             "Alpaca prompt of instruction rows. Remove conversational from the recipe.")  # fmt: skip
        if run_args.conversational and isinstance(dataset[0]["prompt"], str):
            dataset = dataset.map(to_conversational, desc=f"Chat format for {spec}")
        fraction = check_truncation(dataset, tokenizer, train_args.max_length, run_args.max_truncated_fraction, spec)
        print(f"{split} dataset {spec}: {len(dataset)} rows, {fraction:.1%} longer than max_length")
        with train_args.main_process_first(desc=f"saving {spec}"):
            datasets[split] = on_disk(dataset)
    return datasets


def check_world() -> None:
    """Refuse a launch whose processes do not form the world the launcher started (a GPU accelerate config on a
    machine without GPUs gives processes that each believe they are alone), before any of them writes anything."""
    launched, found = int(os.environ.get("WORLD_SIZE", "1")), PartialState().num_processes
    if found != launched:
        raise InputError(
            f"the launcher started {launched} processes, but each sees a world of {found}: the accelerate config asks "
            "for a backend this machine lacks (no GPU?). On CPU add `use_cpu: true` to the accelerate config or pass "
            "`accelerate launch --cpu` (docs/launch.md)"
        )


def build_trainer(run_args: RunArguments, train_args, model_args: ModelConfig, adapter_args: AdapterArguments):
    """Load model, tokenizer and data and construct the trainer the recipe names."""
    check_world()
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
        peft_config = None if train_args.init_adapter else build_peft_config(adapter_args, model)  # a2t/t2a: its own
        trainer = trainer_class(model, args=train_args, train_dataset=examples, demo_pool=pool, processing_class=tokenizer,
                                peft_config=peft_config)  # fmt: skip
        return attach_dynamics(trainer, run_args)
    datasets = load_data(run_args, train_args, tokenizer)
    trainer = trainer_class(
        model,
        args=train_args,
        train_dataset=datasets["train"],
        eval_dataset=datasets.get("eval"),
        processing_class=tokenizer,
        peft_config=build_peft_config(adapter_args, model),
    )
    if run_args.shift_eval:
        trainer.add_callback(
            ShiftEvalCallback(
                trainer, load_shift_spec(run_args.shift_eval), every=run_args.shift_eval_steps, n=run_args.shift_eval_samples,
                batch_size=train_args.per_device_eval_batch_size, seed=train_args.seed,
            )
        )  # fmt: skip
    return attach_dynamics(trainer, run_args)


def _recipe_path(argv: list[str] | None) -> str | None:
    return flag_value(sys.argv[1:] if argv is None else argv, "--config")


def run(argv: list[str] | None = None):
    """Parse, train, save the model (the adapter, for peft) and the run record to output_dir; return the trainer."""
    run_args, train_args, model_args, adapter_args = parse_args(argv)
    trainer = build_trainer(run_args, train_args, model_args, adapter_args)
    trainer.train(resume_from_checkpoint=train_args.resume_from_checkpoint)  # a path, or auto / true (checkpoints.py)
    if (step := trainer.stop_and_save.stopped_at) is not None:  # not finished: no final model, no run record
        raise Stopped(f"stopped at step {step} on {trainer.stop_and_save.signal or STOP_FILE}: checkpoint-{step} in "
                      f"{train_args.output_dir} is complete; resume with --resume_from_checkpoint auto")  # fmt: skip
    trainer.save_model(train_args.output_dir)
    if trainer.is_world_process_zero():
        write_run_record(train_args.output_dir, run_args, train_args, model_args, adapter_args.adapter, _recipe_path(argv))
    return trainer


@command
def main(argv: list[str] | None = None) -> None:
    """reprpo-train: `run`; a refused run leaves no output directory behind (the Trainer creates it when built)."""
    with removed_on_error(parse_args(argv)[1].output_dir):
        run(argv)


if __name__ == "__main__":
    main()
