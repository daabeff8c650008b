"""Start-up checks shared by the trainers: the right config class, and no backend that would ignore an edit."""

from ..errors import InputError


def require_config(trainer_name: str, args, config_class) -> None:
    """Raise TypeError unless `args` is a `config_class` (the trainer's own fields would be missing)."""
    if not isinstance(args, config_class):
        raise TypeError(f"{trainer_name} needs args={config_class.__name__}(...), got {type(args).__name__}")


def refuse_sharded_backends(trainer, what: str, advice: str) -> None:
    """DeepSpeed and FSDP run backward, the gradient reduction and the optimizer step inside their own engines, so
    gradients edited (or parameters trained) beside them by the Trainer are never seen: raise instead."""
    backend = "DeepSpeed" if trainer.is_deepspeed_enabled else "FSDP" if trainer.is_fsdp_enabled else None
    if backend:
        raise InputError(f"{what} cannot run under {backend}, which owns the gradients and the optimizer step: {advice}")
