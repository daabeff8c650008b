"""reprpo train: one training run from a YAML recipe, with CLI flags overriding the recipe (the command line is
reprpo_trl.cli.train; this module is the library it calls, and `python -m reprpo_trl.train` for accelerate).

    reprpo train --config recipes/reprpo_prefvec.yaml [--learning_rate 1e-4 ...]     (or --config pkg:reprpo_prefvec.yaml)
    accelerate launch --config_file accelerate_configs/ddp.yaml -m reprpo_trl.train --config recipes/...

The recipe's `trainer` key picks the trainer and so the config class whose fields it may set:
`dpo` (TRL's own DPOTrainer with the run guard, the baseline), `reprpo`, `projgrad`, `projbp`, `ia2`, and `sft` (TRL's
own SFTTrainer with the run guard, on instruction data such as Commonsense-170K, the PEFT-baselines study). Model keys
are TRL's ModelConfig
(model_name_or_path, dtype, ...); the `adapter:` section is `AdapterArguments` (reprpo_trl.adapters); data keys
are `RunArguments` below. `--key=value` means `--key value`. Bad input (an unknown or misspelled key, a value of
the wrong kind, a missing file) is refused before anything is loaded or written, as one line naming the key
(see reprpo_trl.errors; --debug shows the traceback). TRL's use_peft / lora_* and quantized-loading keys, which
this command does not use, are refused and left out of --help.

Input paths written in a recipe (a local dataset file, a shift_eval spec, a local model, a DeepSpeed config)
resolve against the recipe's own directory, `pkg:<name>` against the recipes the package ships; output_dir and
init_adapter (another run's output_dir) against the working directory. A run does only what its recipe asks: with
eval_strategy "no" the eval dataset is not loaded, and a step-based schedule evaluates only at multiples of
eval_steps (transformers' extra evaluation after the last step needs eval_on_end). Every run keeps its log history
in <output_dir>/log_history.jsonl (reprpo_trl.curves) and leaves a run record (reprpo_trl.provenance).
"""

import argparse
import difflib
import os
import sys
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch.distributed as dist
from accelerate import PartialState
from transformers import AutoModelForCausalLM, AutoTokenizer, IntervalStrategy, TrainerCallback
from trl import ModelConfig, TrlParser

from . import packaged
from .adapters import AdapterArguments, build_peft_config, check_combination, flatten_section
from .argv import flag_value, split_flag_values
from .curves import LogHistoryCallback
from .data import SUITE_SEED, check_truncation, load_preference_dataset, load_sft_dataset, on_disk, to_conversational
from .data.loading import local_format, resolve_spec
from .dynamics.callbacks import DynamicsArguments, attach_dynamics
from .checkpoints import STOP_FILE
from .errors import InputError, Stopped
from .eval import load_shift_spec
from .eval.callback import ShiftEvalCallback
from .icl import load_icl_task
from .io import apply_user_mode, input_path, read_yaml, yaml_dir
from .models import resolve_model
from .provenance import write_run_record
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
    suite_seed: int = field(
        default=SUITE_SEED,
        metadata={"help": "Seed that draws generated (suite:...) datasets; the same default in reprpo train, eval, "
                  "icl-eval, demo and sweep. The training `seed` does not change which pairs a run sees."},
    )  # fmt: skip
    eval_on_end: bool = field(
        default=False,
        metadata={"help": "With eval_strategy steps, also evaluate after the last step when it is no multiple of "
                  "eval_steps (transformers' default; off: evaluations happen only where eval_steps puts them)."},
    )  # fmt: skip

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


def trainer_name(argv: list[str], recipe: dict | None = None) -> str:
    """The trainer named by --trainer, else by the recipe's `trainer` key, else the default."""
    name = flag_value(argv, "--trainer") or (recipe or {}).get("trainer", RunArguments.trainer)
    if not isinstance(name, str) or name not in TRAINERS:
        raise InputError(f"trainer={name!r}: choose one of {sorted(TRAINERS)}")
    return name


ADAPTER_HINT = ("describe the adapter in the recipe's `adapter:` section (type: lora, r: 16, ...) or with --adapter lora "
                "--adapter_r 16 ...")  # fmt: skip


def refused(key: str) -> str | None:
    """Why a key of TRL's ModelConfig that reprpo train does not use is refused (None: the key is used)."""
    if key in ("use_peft", "use_rslora", "use_dora") or key.startswith("lora_"):
        return f"{key}: use_peft/lora_* are not used here: {ADAPTER_HINT}"
    if key in ("load_in_8bit", "load_in_4bit", "use_bnb_nested_quant") or key.startswith("bnb_4bit"):
        return f"{key}: quantized loading is not part of reprpo train, so it would be ignored; remove it"
    return None


class _Parser(TrlParser):
    """TrlParser whose errors (a value of the wrong type, an ambiguous flag) are InputErrors, not a usage dump, and
    whose help leaves out the keys reprpo train refuses."""

    def __init__(self, classes, **kwargs):
        super().__init__(classes, **kwargs)
        for action in self._actions:
            if refused(action.dest):
                action.help = argparse.SUPPRESS

    def error(self, message):
        raise InputError(f"{message}; fix it in the recipe or on the command line")


def parser(trainer: str) -> _Parser:
    """The argument parser of a run with `trainer` (what --help shows)."""
    description = (f"Flags of trainer {trainer} ({TRAINERS[trainer][1].__name__} with {TRAINERS[trainer][0].__name__}); "
                   f"each is also a recipe key. `--trainer NAME --help` lists another trainer's: {', '.join(TRAINERS)}.")  # fmt: skip
    return _Parser((RunArguments, TRAINERS[trainer][0], ModelConfig, AdapterArguments), prog="reprpo train", description=description)


INPUT_KEYS = ("train_dataset", "eval_dataset", "shift_eval", "model_name_or_path", "deepspeed")


def resolve_inputs(values: dict, base_dir) -> dict:
    """The input paths among `values` (a recipe, or a sweep grid's train_overrides) resolved against `base_dir`, the
    YAML file's directory: dataset specs naming a local file or directory, a shift spec, a local model (./ ../ or
    an existing directory there), a DeepSpeed JSON; `pkg:` names; only the values that change."""
    resolved = {}
    for key in INPUT_KEYS:
        value = values.get(key)
        if not isinstance(value, str):
            continue
        if key in ("train_dataset", "eval_dataset"):
            new = resolve_spec(value, base_dir)
        elif key == "model_name_or_path":
            local = value.startswith(("./", "../", packaged.PREFIX)) or (Path(base_dir) / value).is_dir()
            new = input_path(value, base_dir) if local else value
        else:
            new = input_path(value, base_dir)
        if new != value:
            resolved[key] = new
    return resolved


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
        if refused(str(key)):
            raise InputError(f"{where}: {refused(str(key))}")
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
    for token in argv:
        if token.startswith("--") and refused(token[2:]):
            raise InputError(refused(token[2:]))
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
    if recipe_path is not None:  # the recipe's file for TrlParser (a pkg: name resolved), then what it adds as flags
        at = argv.index("--config") + 2
        argv[at - 1] = input_path(recipe_path)
        section = recipe.get("adapter")
        inputs = resolve_inputs(recipe, yaml_dir(recipe_path))
        added = (flatten_section(section) if isinstance(section, dict) else []) + [x for k, v in inputs.items() for x in (f"--{k}", v)]
        argv = argv[:at] + added + argv[at:]  # before the command line's own flags, which still win
    trainer = trainer_name(argv, recipe)
    classes = (RunArguments, TRAINERS[trainer][0], ModelConfig, AdapterArguments)
    arguments = parser(trainer)
    check_keys(arguments, classes, recipe, recipe_path, argv, trainer)
    if isinstance(recipe.get("adapter"), dict):  # the section is in the flags now; as a default it would not be a string
        arguments.set_defaults(adapter=AdapterArguments.adapter)
    try:
        run_args, train_args, model_args, adapter_args = arguments.parse_args_and_config(argv)
    except InputError:
        raise
    except ValueError as error:  # a config's __post_init__ refusing a value: the user's input, named there
        raise InputError(str(error)) from error
    check_combination(run_args.trainer, adapter_args.adapter, train_args.gradient_checkpointing)
    return run_args, train_args, model_args, adapter_args


def will_evaluate(run_args: RunArguments, train_args) -> bool:
    """Whether the run evaluates at all: not with eval_strategy "no", nor with a step schedule whose first
    evaluation lies beyond max_steps (and no eval_on_start or eval_on_end); then its eval set is not even loaded."""
    if train_args.eval_strategy == "no":
        return False
    if train_args.eval_strategy == "steps" and train_args.max_steps > 0 and not (run_args.eval_on_end or train_args.eval_on_start):
        steps = train_args.eval_steps or train_args.logging_steps
        return not (steps >= 1 and train_args.max_steps < steps)
    return True


def load_data(run_args: RunArguments, train_args, tokenizer):
    """Train and eval datasets from their specs, checked for truncation against `max_length`."""
    datasets = {}
    evaluates = will_evaluate(run_args, train_args)
    if run_args.eval_dataset and not evaluates:
        print(f"eval dataset {run_args.eval_dataset}: not loaded, this run evaluates nowhere (eval_strategy "
              f"{train_args.eval_strategy}, eval_steps {train_args.eval_steps}, max_steps {train_args.max_steps})")  # fmt: skip
    if not evaluates:
        train_args.eval_strategy = IntervalStrategy.NO  # nothing to evaluate on: the Trainer would refuse the schedule
    for split, spec, n in (
        ("train", run_args.train_dataset, run_args.max_train_samples),
        ("eval", run_args.eval_dataset if evaluates else None, run_args.max_eval_samples),
    ):
        if spec is None:
            continue
        load = load_sft_dataset if run_args.trainer == "sft" else load_preference_dataset
        dataset = load(spec, n=n, seed=run_args.suite_seed)
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


class EvaluateOnlyAsAsked(TrainerCallback):
    """Drop the evaluation transformers adds after the last step of a step-based schedule when that step is no
    multiple of eval_steps (unless eval_on_end): a run evaluates where its recipe says, and nowhere else."""

    def on_step_end(self, args, state, control, **kwargs):
        if args.eval_strategy == "steps" and state.global_step >= state.max_steps and state.global_step % state.eval_steps:
            control.should_evaluate = False


class UserFileMode(TrainerCallback):
    """Give every file a checkpoint save wrote the mode of the user's umask (safetensors writes 0600)."""

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            apply_user_mode(args.output_dir)


def name_base_model(model, name: str) -> None:
    """Record `name`, as the recipe gives it (the embedded name, a hub id, a path), as the base model of the adapter
    the run saves, rather than the directory it was loaded from (for the embedded model, a cache path that means
    nothing on another machine)."""
    for config in getattr(model, "peft_config", {}).values():
        config.base_model_name_or_path = name


def finish(trainer, run_args: RunArguments, model_args: ModelConfig):
    """What every trainer built here gets: its log history kept on disk, its files in the user's mode, evaluations
    only where asked, the base model named as given, and the training-dynamics callbacks the recipe asks for."""
    trainer.add_callback(LogHistoryCallback())
    trainer.add_callback(UserFileMode())
    if not run_args.eval_on_end:
        trainer.add_callback(EvaluateOnlyAsAsked())
    name_base_model(trainer.model, model_args.model_name_or_path)
    return attach_dynamics(trainer, run_args)


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
                                       pool_size=run_args.demo_pool_size, seed=run_args.suite_seed)  # fmt: skip
        peft_config = None if train_args.init_adapter else build_peft_config(adapter_args, model)  # a2t/t2a: its own
        trainer = trainer_class(model, args=train_args, train_dataset=examples, demo_pool=pool, processing_class=tokenizer,
                                peft_config=peft_config)  # fmt: skip
        return finish(trainer, run_args, model_args)
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
                batch_size=train_args.per_device_eval_batch_size, seed=run_args.suite_seed,
            )
        )  # fmt: skip
    return finish(trainer, run_args, model_args)


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
        apply_user_mode(train_args.output_dir)
        write_run_record(train_args.output_dir, run_args, train_args, model_args, adapter_args, _recipe_path(argv), trainer)
    return trainer


def close_process_group() -> None:
    """Destroy torch.distributed's default process group once every rank has finished, or stopped at the same step:
    left to the interpreter's exit, gloo's worker threads can abort it (SIGABRT, "terminate called without an active
    exception") and fail a run that succeeded. Not after an error: a rank still inside a collective would hang."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":  # `python -m reprpo_trl.train` / `accelerate launch -m reprpo_trl.train`: reprpo train
    from .cli.train import main

    main()
