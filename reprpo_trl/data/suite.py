"""The offline preference suite: seeded, generated families with an objectively right answer.

Each family yields {"prompt", "chosen", "rejected"} rows in plain text ("Question: ...\\nAnswer:" and a
completion with a leading space); `to_conversational` turns them into chat messages. Families and the
shift each one plays (see docs/data.md):

    add_small   a + b, a, b in [1, 25]; rejected = right answer off by 1..3     train, in_domain
    add_word    the same sums as short stories                                   cross_domain
    sub_small   a - b with a in [10, 60], b in [1, 9]                            cross_domain
    add_large   a + b with a, b in [1000, 9999]; off by 1, 10 or 100             difficulty
    capitals    capital city of a country; rejected = another country's capital  unrelated

`train`, `validation` and `in_domain` (test) come from the same family but from disjoint operand pairs; the
validation split is for model selection only and is never reported.

Every generated dataset of the package (this suite, the ICL suite, the Commonsense-170K stand-in) is drawn with
`suite_seed`, default SUITE_SEED = 0 in reprpo-train, -eval, -icl-eval, -demo and -sweep alike; the training
`seed` (initialisation, data order) does not change which pairs a run sees. The first n pairs of a split are the
same for every n (rows are drawn in one seeded order). Without n, `make_family` gives the whole split of the
families whose splits are small enough to take whole (SPLIT_SIZES: add_small, sub_small, capitals); add_word
(300,000 pairs in all) and add_large (about 4.9e8) need an n.
"""

import hashlib
import random
from functools import lru_cache

from datasets import Dataset

from ..errors import InputError

SUITE_SEED = 0  # the one default seed of every generated dataset
SUITE_SHIFTS = {  # shift -> dataset specs (see reprpo_trl.data.loading)
    "train": ["suite:add_small:train"],
    "in_domain": ["suite:add_small:test"],
    "cross_domain": ["suite:add_word:test", "suite:sub_small:test"],
    "difficulty": ["suite:add_large:test"],
    "unrelated": ["suite:capitals:test"],
}

CAPITALS = {
    "France": "Paris", "Japan": "Tokyo", "Italy": "Rome", "Spain": "Madrid", "Germany": "Berlin",
    "Egypt": "Cairo", "Canada": "Ottawa", "Russia": "Moscow", "China": "Beijing", "Kenya": "Nairobi",
    "Greece": "Athens", "Portugal": "Lisbon", "Austria": "Vienna", "Poland": "Warsaw", "Norway": "Oslo",
    "Sweden": "Stockholm", "Finland": "Helsinki", "Denmark": "Copenhagen", "Ireland": "Dublin",
    "Hungary": "Budapest", "Peru": "Lima", "Chile": "Santiago", "Cuba": "Havana", "Thailand": "Bangkok",
    "Vietnam": "Hanoi", "Iran": "Tehran", "Iraq": "Baghdad", "Argentina": "Buenos Aires",
    "Mexico": "Mexico City", "South Korea": "Seoul", "Indonesia": "Jakarta", "Philippines": "Manila",
    "Belgium": "Brussels", "Netherlands": "Amsterdam", "Czech Republic": "Prague", "Ukraine": "Kyiv",
    "Turkey": "Ankara", "Ethiopia": "Addis Ababa", "Colombia": "Bogota", "Venezuela": "Caracas",
    "United Kingdom": "London", "Saudi Arabia": "Riyadh",
}  # fmt: skip

_NAMES = ["Tom", "Ana", "Ravi", "Mei", "Lucas", "Zara", "Omar", "Ines", "Kofi", "Yuki"]
_ITEMS = ["apples", "marbles", "books", "stickers", "coins", "pencils", "shells", "cards"]
_CAPITAL_TEMPLATES = [
    "What is the capital of {country}?",
    "Which city is the capital of {country}?",
    "Name the capital city of {country}.",
]


def _question(text: str) -> str:
    return f"Question: {text}\nAnswer:"


def _add_small(rng):
    a, b = rng.randint(1, 25), rng.randint(1, 25)
    wrong = a + b + rng.choice([-3, -2, -1, 1, 2, 3])
    return (a, b), _question(f"What is {a} + {b}?"), a + b, wrong


def _add_word(rng):
    a, b = rng.randint(1, 25), rng.randint(1, 25)
    name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
    text = f"{name} has {a} {item} and gets {b} more. How many {item} does {name} have now?"
    return (a, b, name, item), _question(text), a + b, a + b + rng.choice([-3, -2, -1, 1, 2, 3])


def _sub_small(rng):
    a, b = rng.randint(10, 60), rng.randint(1, 9)
    return (a, b), _question(f"What is {a} - {b}?"), a - b, a - b + rng.choice([-3, -2, -1, 1, 2, 3])


def _add_large(rng):
    a, b = rng.randint(1000, 9999), rng.randint(1000, 9999)
    return (a, b), _question(f"What is {a} + {b}?"), a + b, a + b + rng.choice([-100, -10, -1, 1, 10, 100])


def _capitals(rng):
    country, other = rng.sample(sorted(CAPITALS), 2)
    template = rng.choice(_CAPITAL_TEMPLATES)
    return (country,), _question(template.format(country=country)), CAPITALS[country], CAPITALS[other]


FAMILIES = {
    "add_small": _add_small,
    "add_word": _add_word,
    "sub_small": _sub_small,
    "add_large": _add_large,
    "capitals": _capitals,
}


SPLITS = ("train", "validation", "test")
TEST_FRACTION, VALIDATION_FRACTION = 0.3, 0.1
_OFFSETS = (-3, -2, -1, 1, 2, 3)


def _every_pair(name: str):
    """Every (key, prompt, rejected) the generator of family `name` can draw, for the families small enough to
    take whole; None for the others."""
    if name == "add_small":
        return (((a, b), _question(f"What is {a} + {b}?"), a + b + d) for a in range(1, 26) for b in range(1, 26) for d in _OFFSETS)
    if name == "sub_small":
        return (((a, b), _question(f"What is {a} - {b}?"), a - b + d) for a in range(10, 61) for b in range(1, 10) for d in _OFFSETS)
    if name == "capitals":
        return (((country,), _question(t.format(country=country)), CAPITALS[other])
                for country in CAPITALS for t in _CAPITAL_TEMPLATES for other in CAPITALS if other != country)  # fmt: skip
    return None


@lru_cache(maxsize=None)
def split_size(name: str, split: str) -> int | None:
    """How many distinct pairs `split` of family `name` has (None: too many to take whole)."""
    pairs = _every_pair(name)
    if pairs is None:
        return None
    return len({(prompt, wrong) for key, prompt, wrong in pairs if _split_of(key, TEST_FRACTION, VALIDATION_FRACTION) == split})


def _split_of(key: tuple, test_fraction: float, validation_fraction: float) -> str:
    """Deterministic split by the problem's identity (operands, country), so no two splits share one."""
    u = hashlib.sha256(repr(key).encode()).digest()[0] / 256
    return "test" if u < test_fraction else "validation" if u < test_fraction + validation_fraction else "train"


def make_family(name: str, split: str = "train", n: int | None = None, seed: int = SUITE_SEED) -> Dataset:
    """`n` unique preference pairs of family `name` from `split` (one of SPLITS), reproducible by `seed`; without
    `n`, the whole split (refused for the families too large to take whole)."""
    if name not in FAMILIES:
        raise InputError(f"unknown suite family {name!r}: choose one of {sorted(FAMILIES)}")
    if split not in SPLITS:
        raise InputError(f"suite split {split!r}: choose one of {SPLITS}")
    size = split_size(name, split)
    if n is not None and n < 1:
        raise InputError(f"suite:{name}:{split} with n={n}: ask for at least one pair")
    if n is None and size is None:
        raise InputError(f"suite:{name}:{split} is too large to take whole; give a number of pairs (max_train_samples, "
                         "max_eval_samples, --n)")  # fmt: skip
    if size is not None and (n or 0) > size:
        raise InputError(f"suite:{name}:{split} has {size} pairs, fewer than the {n} asked for; ask for at most {size}")
    target = size if n is None else n
    rng = random.Random(f"{name}-{seed}")
    rows, seen = [], set()
    for _ in range(200 * target):
        key, prompt, right, wrong = FAMILIES[name](rng)
        if _split_of(key, TEST_FRACTION, VALIDATION_FRACTION) != split or (prompt, wrong) in seen:
            continue
        seen.add((prompt, wrong))
        rows.append({"prompt": prompt, "chosen": f" {right}", "rejected": f" {wrong}"})
        if len(rows) == target:
            return Dataset.from_list(rows)
    raise InputError(f"suite family {name!r} split {split!r} has fewer than {target} unique pairs; ask for fewer")


def to_conversational(row: dict) -> dict:
    """Plain row -> TRL's conversational preference format (user prompt, assistant completions)."""
    question = row["prompt"].removeprefix("Question: ").removesuffix("\nAnswer:")
    return {
        "prompt": [{"role": "user", "content": question}],
        "chosen": [{"role": "assistant", "content": row["chosen"].strip()}],
        "rejected": [{"role": "assistant", "content": row["rejected"].strip()}],
    }
