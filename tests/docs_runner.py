"""Runs the code blocks of README.md and docs/*.md, as a reader would paste them, on a tiny model (tests/test_docs.py).

A block's fence says what it is:
    ```bash / ```python / ```yaml         runs: shell lines through the package's command line, in process; Python
                                          as a script; YAML is parsed (and checked as a recipe fragment)
    ```yaml file=NAME                      writes the block to NAME in the workspace, for the commands after it
    ```LANG no-run: REASON                 shown, not run; the reason is required (no backticks: CommonMark ends
                                          an info string at one)
    ```text                                not code: a layout, a formula, printed output
Indented code blocks are refused: fence them.

Substitutions (so that every command is a seconds-long version of itself): the embedded model becomes a tiny random
Llama; `reprpo train` (and demo) runs 1 step on 8 pairs; evaluations score 2-4 pairs or documents; a sweep grid
keeps its first two methods, its first learning rate and seed. Commands run in one workspace, in document order,
with the repository's recipes/ linked in, so a later block finds what an earlier one wrote; a command that ran
already (after substitution) is not run again.
"""

import contextlib
import glob
import io
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import yaml
from markdown_it import MarkdownIt

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
EMBEDDED = "embedded/SmolLM2-135M-Instruct"
CHARACTER_TASKS = {"suite:sentiment": "suite:arith"}  # ICL tasks whose labels a character tokenizer can tell apart
NO_RUN = "no-run:"
NOT_CODE = {"text"}
ALIASES = {"reprpo-train": "train", "reprpo-eval": "eval", "reprpo-icl-eval": "icl-eval", "reprpo-report": "report",
           "reprpo-sweep": "sweep", "reprpo-demo": "demo", "reprpo-dynamics": "dynamics"}  # fmt: skip
TRAIN = ["--max_steps", "1", "--max_train_samples", "8", "--max_eval_samples", "4", "--per_device_train_batch_size", "2",
         "--per_device_eval_batch_size", "2", "--gradient_accumulation_steps", "1", "--use_cpu", "true", "--bf16", "false",
         "--fp16", "false", "--report_to", "none", "--logging_steps", "1", "--dataloader_num_workers", "0",
         "--max_truncated_fraction", "1"]  # fmt: skip  (the tiny tokenizer spells text out: long rows are its doing)


@dataclass
class Block:
    doc: Path
    line: int
    lang: str
    info: str
    text: str

    @property
    def where(self) -> str:
        return f"{self.doc.relative_to(ROOT)}:{self.line}"

    @property
    def reason(self) -> str | None:
        """Why the block is not run (None: it runs)."""
        if NO_RUN not in self.info:
            return None
        return self.info.split(NO_RUN, 1)[1].strip()


def blocks(path: Path) -> list[Block]:
    found = []
    for token in MarkdownIt("commonmark").parse(path.read_text()):
        if token.type == "code_block":
            raise AssertionError(f"{path.relative_to(ROOT)}:{token.map[0] + 1}: an indented code block; fence it with a language")
        if token.type == "fence":
            found.append(Block(path, token.map[0] + 1, token.info.split()[0] if token.info else "", token.info, token.content))
    return found


def commands(text: str) -> list[list[str]]:
    """Shell lines (backslash continuations joined, comments dropped) as argument lists."""
    joined = re.sub(r"\\\n", " ", text)
    return [argv for line in joined.splitlines() if (argv := shlex.split(line, comments=True))]


def _flag(argv: list[str], flag: str, value: str) -> list[str]:
    """argv with `flag`'s value replaced (or the flag added)."""
    if flag in argv:
        i = argv.index(flag)
        return argv[: i + 1] + [value] + argv[i + 2 :]
    return argv + [flag, value]


class Workspace:
    """Where the blocks of the documentation run: `root` (the working directory), a tiny model at `tiny`."""

    def __init__(self, root: Path, tiny: str, monkeypatch):
        self.root, self.tiny, self.monkeypatch = root, tiny, monkeypatch
        for name in ("recipes", "accelerate_configs", "slurm"):
            (root / name).symlink_to(ROOT / name)
        self.done: set[tuple] = set()

    # --- substitutions -------------------------------------------------------------------------------------------
    def model(self, value: str) -> str:
        return self.tiny if value == EMBEDDED else value

    def train_args(self, argv: list[str]) -> list[str]:
        from reprpo_trl.argv import flag_value, split_flag_values
        from reprpo_trl.io import input_path

        argv = [self.model(a) for a in split_flag_values(argv)]
        recipe = flag_value(argv, "--config")
        trainer = flag_value(argv, "--trainer") or (yaml.safe_load(Path(input_path(recipe)).read_text()) if recipe else {}).get("trainer")
        extra = ["--model_name_or_path", self.tiny] if self.model(flag_value(argv, "--model_name_or_path") or EMBEDDED) == self.tiny else []
        if trainer == "ia2":
            extra += ["--num_demos", "2", "--demo_pool_size", "8", "--target_cache_dir", str(self.root / "ia2_cache")]
        if trainer == "sft":  # Alpaca prompts spelled out character by character
            extra += ["--max_length", "1024"]
        if "--llc" in argv:
            extra += ["--llc_probe_size", "4", "--llc_batch_size", "2", "--llc_draws", "2", "--llc_steps", "1"]
        if "--save_steps" in argv:
            extra += ["--save_steps", "1"]
        return argv + TRAIN + extra

    def grid(self, path: str) -> str:
        """A copy of the grid with two methods, two learning rates, one seed and tiny runs."""
        from reprpo_trl.sweep import load_grid

        grid = load_grid(path)
        small = {"output_dir": grid.output_dir, "methods": dict(list(grid.methods.items())[:2]), "seeds": grid.seeds[:1],
                 "learning_rates": grid.learning_rates[:1], "shifts": grid.shifts, "eval_samples": 2, "eval_batch_size": 2,
                 "train_overrides": {**grid.train_overrides, "model_name_or_path": self.tiny,
                                     **{k.lstrip("-"): v for k, v in zip(TRAIN[::2], TRAIN[1::2])}, "max_length": 1024},
                 "mc_tasks": grid.mc_tasks, "mc_include_path": grid.mc_include_path, "mc_limit": 2, "mc_batch_size": 4,
                 "eval_seed": grid.eval_seed, "code_revision": grid.code_revision}  # fmt: skip
        target = self.root / ".grids" / Path(path).name
        target.parent.mkdir(exist_ok=True)
        target.write_text(yaml.safe_dump({k: v for k, v in small.items() if v not in (None, [])}))
        return str(target)

    def substitute(self, command: str, argv: list[str]) -> list[str]:
        if command in ("train", "demo"):
            return self.train_args(argv) + (["--eval_samples", "2"] if command == "demo" else [])
        if command in ("eval", "icl-eval"):
            argv = _flag(argv, "--base", self.model(argv[argv.index("--base") + 1]) if "--base" in argv else self.tiny)
            if argv[:1] == ["mc"]:
                return _flag(argv, "--limit", "2")
            if command == "icl-eval":  # the tiny tokenizer spells words out: labels that share a first letter (or the
                argv = [CHARACTER_TASKS.get(a, a) for a in argv]  # space before them) are one token to it
                return _flag(_flag(argv, "--n", "4"), "--k", "2")
            return _flag(argv, "--n", "4")
        if command == "sweep":
            return _flag(argv, "--config", self.grid(argv[argv.index("--config") + 1]))
        if command == "models":
            return [self.model(a) for a in argv]
        return argv

    # --- running -------------------------------------------------------------------------------------------------
    def expand(self, argv: list[str]) -> list[str]:
        out = []
        for arg in argv:
            matches = sorted(glob.glob(arg, root_dir=self.root)) if any(c in arg for c in "*?[") else []
            out += matches or [arg]
        return out

    def run_shell(self, block: Block) -> None:
        text = block.text.replace(f'"$(reprpo models path {EMBEDDED})"', self.tiny)
        for argv in commands(text):
            stdout = None
            if ">" in argv:
                i = argv.index(">")
                argv, stdout = argv[:i], argv[i + 1]
            self.run(block, self.expand(argv), stdout)

    def run(self, block: Block, argv: list[str], stdout: str | None) -> None:
        from reprpo_trl import cli

        program, rest = argv[0], argv[1:]
        if program == "python" and rest[:2] == ["-m", "reprpo_trl.train"]:
            program, rest = "reprpo", ["train", *rest[2:]]
        if program in ALIASES:
            program, rest = "reprpo", [ALIASES[program], *rest]
        if program == "trl" and rest[:1] == ["dpo"]:
            return self.trl_dpo(rest[1:])
        if program != "reprpo":
            raise AssertionError(f"{block.where}: `{shlex.join(argv)}` runs no package command; run it here or mark the "
                                 f"block ```{block.lang} {NO_RUN} <why>")  # fmt: skip
        command = rest[0] if rest else ""
        final = [command, *self.substitute(command, rest[1:])] if command else []
        if tuple(final) in self.done:
            return
        buffer = io.StringIO()
        with contextlib.redirect_stdout(buffer) if stdout else contextlib.nullcontext():
            try:
                cli.main(final)
            except SystemExit as exit_:
                if exit_.code not in (0, None):
                    raise AssertionError(f"{block.where}: `reprpo {shlex.join(final)}` exited with {exit_.code}") from None
        if stdout:
            (self.root / stdout).write_text(buffer.getvalue())
        self.done.add(tuple(final))

    def trl_dpo(self, argv: list[str]) -> None:
        """TRL's own `trl dpo`, in process, shortened like reprpo train."""
        from trl.scripts import dpo

        short = [a for a in argv] + ["--max_steps", "1", "--per_device_train_batch_size", "2", "--use_cpu", "true",
                                     "--bf16", "false", "--report_to", "none"]  # fmt: skip
        parser = dpo.make_parser()
        args = parser.parse_args_and_config(short)
        args[2].model_name_or_path = self.model(args[2].model_name_or_path)
        dpo.main(*args)

    def run_python(self, block: Block) -> None:
        code = block.text.replace(f'"{EMBEDDED}"', repr(self.tiny))
        code = re.sub(r"\bn=\d+", "n=8", code)
        exec(compile(code, block.where, "exec"), {"__name__": "__docs__"})

    def run_yaml(self, block: Block) -> None:
        content = yaml.safe_load(block.text)
        target = re.search(r"file=(\S+)", block.info)
        if target:
            (self.root / target.group(1)).write_text(block.text)
            return
        assert isinstance(content, dict), f"{block.where}: a YAML block must be a mapping"
        recipe = self.root / ".fragment.yaml"  # a fragment of a recipe: it must parse as one
        recipe.write_text(yaml.safe_dump({"trainer": "dpo", **content}))
        from reprpo_trl.train import parse_args

        parse_args(["--config", str(recipe), "--use_cpu", "true", "--model_name_or_path", self.tiny])

    def run_block(self, block: Block) -> None:
        if block.lang in NOT_CODE or block.reason is not None:
            assert block.reason != "", f"{block.where}: `{NO_RUN}` needs a reason"
            return
        runner = {"bash": self.run_shell, "sh": self.run_shell, "python": self.run_python, "yaml": self.run_yaml}.get(block.lang)
        assert runner, f"{block.where}: a ```{block.lang or '(no language)'} block; use bash, python, yaml or text, or mark it {NO_RUN}"
        self.monkeypatch.chdir(self.root)
        runner(block)
