"""Tensor caches that are used only when they check out.

A cache file is a safetensors file whose metadata holds the sha256 of its tensors (name, dtype, shape and bytes,
in name order), written atomically. `load_tensors` returns None, with a warning naming the file, for a file that
is missing, truncated, unreadable or whose tensors no longer match the checksum; the caller then recomputes it.
"""

import hashlib
import os
import warnings
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .io import apply_user_mode

CHECKSUM = "reprpo_sha256"


def checksum(tensors: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def save_tensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor]) -> None:
    """Write `tensors` with their checksum to `path`: a temporary file beside it, then a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {name: tensor.detach().cpu().contiguous() for name, tensor in tensors.items()}
    partial = path.with_name(f".{path.name}.{os.getpid()}")
    save_file(tensors, str(partial), metadata={CHECKSUM: checksum(tensors)})
    apply_user_mode(partial)  # safetensors writes 0600
    os.replace(partial, path)


def load_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor] | None:
    """The tensors of a cache file written by `save_tensors`, or None (with a warning) when it does not check out."""
    path = Path(path)
    if not path.exists():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            expected = (f.metadata() or {}).get(CHECKSUM)
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except Exception as error:  # truncated or scribbled headers fail in many ways; all mean "recompute"
        warnings.warn(f"cache file {path} is unreadable ({type(error).__name__}: {error}); recomputing it", stacklevel=2)
        return None
    if expected is None or checksum(tensors) != expected:
        warnings.warn(f"cache file {path} does not match its checksum (altered or partly written); recomputing it", stacklevel=2)
        return None
    return tensors
