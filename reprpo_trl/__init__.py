"""reprpo_trl: representation-level training methods as HuggingFace TRL trainer subclasses.

The trainer classes load on first use (`from reprpo_trl import ReprPOTrainer` works as usual), so that importing
a light part of the package (the command line's --help, reprpo_trl.errors) does not import torch and TRL.
"""

import importlib

_LAZY = {  # public name -> the module that defines it
    **{name: ".trainers" for name in ("IA2Config", "IA2Trainer", "ProjBPConfig", "ProjBPTrainer", "ProjGradConfig",
                                      "ProjGradTrainer", "ReprPOConfig", "ReprPOTrainer")},
    "SiteTransforms": ".transforms",
}  # fmt: skip
__all__ = sorted(_LAZY)
__version__ = "0.1.0"


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
