"""Start-up refusal for launches where a Trainer-level edit would silently do nothing."""


def refuse_sharded_backends(trainer, what: str, advice: str) -> None:
    """DeepSpeed and FSDP run backward, the gradient reduction and the optimizer step inside their own engines, so
    gradients edited (or parameters trained) beside them by the Trainer are never seen: raise instead."""
    backend = "DeepSpeed" if trainer.is_deepspeed_enabled else "FSDP" if trainer.is_fsdp_enabled else None
    if backend:
        raise ValueError(f"{what} cannot run under {backend}, which owns the gradients and the optimizer step: {advice}")
