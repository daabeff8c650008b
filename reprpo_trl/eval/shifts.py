"""Shift specs: which datasets play which distribution shift (docs/methods.md "Evaluation across distribution shifts").

A shift spec is a YAML mapping from shift to a list of dataset specs (see reprpo_trl.data.loading):

    validation: [suite:add_small:validation]   # model selection only, never reported
    train: [suite:add_small:train]
    in_domain: [suite:add_small:test]
    cross_domain: [suite:add_word:test, suite:sub_small:test]
    difficulty: [suite:add_large:test]
    unrelated: [suite:capitals:test]

Local dataset files named in a spec are found relative to the spec's own directory; `pkg:shifts/<name>.yaml`
names the specs the package ships.
"""

from pathlib import Path

from ..data.loading import local_format, resolve_spec
from ..errors import InputError
from ..io import read_yaml, yaml_dir

REPORTED_SHIFTS = ("train", "in_domain", "cross_domain", "difficulty", "unrelated")
SELECTION_SHIFT = "validation"


def check_shift_spec(spec: dict, name: str) -> dict[str, list[str]]:
    """The spec with shifts in canonical order; errors name the spec and the offending key."""
    if not isinstance(spec, dict) or not spec:
        raise InputError(f"shift spec {name!r}: expected a mapping shift -> list of dataset specs")
    allowed = (SELECTION_SHIFT, *REPORTED_SHIFTS)
    for shift, datasets in spec.items():
        if shift not in allowed:
            raise InputError(f"shift spec {name!r}: unknown shift {shift!r}; use {list(allowed)}")
        if not isinstance(datasets, list) or not datasets or not all(isinstance(d, str) for d in datasets):
            raise InputError(f"shift spec {name!r}: shift {shift!r} must be a non-empty list of dataset specs")
        for dataset in datasets:
            local_format(dataset)  # a missing file or an unreadable suffix, before anything loads
    reported = {d for shift in REPORTED_SHIFTS for d in spec.get(shift, [])}
    leaked = sorted(reported & set(spec.get(SELECTION_SHIFT, [])))
    if leaked:
        raise InputError(
            f"shift spec {name!r}: {leaked} is both a {SELECTION_SHIFT!r} dataset and a reported one; a split "
            "used to select models must never be reported"
        )
    return {shift: list(spec[shift]) for shift in allowed if shift in spec}


def load_shift_spec(path: str | Path) -> dict[str, list[str]]:
    """Read and check a shift spec YAML file (or `pkg:` name); local dataset files relative to its directory."""
    spec = read_yaml(path, "shift spec")
    here = yaml_dir(path)
    spec = {shift: [resolve_spec(d, here) if isinstance(d, str) else d for d in datasets] if isinstance(datasets, list) else datasets
            for shift, datasets in spec.items()}  # fmt: skip
    return check_shift_spec(spec, str(path))
