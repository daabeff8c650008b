"""Command-line tokens, read without importing anything heavy (the library and reprpo_trl.cli share these)."""

from .errors import InputError


def split_flag_values(argv: list[str]) -> list[str]:
    """`--key=value` -> `--key value`, so that --config=x.yaml and --trainer=dpo mean what the spaced forms mean."""
    return [part for arg in argv for part in (arg.split("=", 1) if arg.startswith("--") and "=" in arg else [arg])]


def flag_value(argv: list[str], flag: str) -> str | None:
    """The value after `flag` in `argv` (either form), or None when the flag is absent."""
    argv = split_flag_values(argv)
    if flag not in argv:
        return None
    i = argv.index(flag) + 1
    if i == len(argv) or argv[i].startswith("--"):
        raise InputError(f"{flag} needs a value")
    return argv[i]
