"""Start-up check shared by the trainers: the right config class."""


def require_config(trainer_name: str, args, config_class) -> None:
    """Raise TypeError unless `args` is a `config_class` (the trainer's own fields would be missing)."""
    if not isinstance(args, config_class):
        raise TypeError(f"{trainer_name} needs args={config_class.__name__}(...), got {type(args).__name__}")
