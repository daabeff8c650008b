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
"""

import hashlib
import random

from datasets import Dataset

from ..errors import InputError

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


def _split_of(key: tuple, test_fraction: float, validation_fraction: float) -> str:
    """Deterministic split by the problem's identity (operands, country), so no two splits share one."""
    u = hashlib.sha256(repr(key).encode()).digest()[0] / 256
    return "test" if u < test_fraction else "validation" if u < test_fraction + validation_fraction else "train"


def make_family(
    name: str, split: str = "train", n: int = 600, seed: int = 0, test_fraction: float = 0.3, validation_fraction: float = 0.1
) -> Dataset:
    """`n` unique preference pairs of family `name` from `split` (one of SPLITS), reproducible by `seed`."""
    if name not in FAMILIES:
        raise InputError(f"unknown suite family {name!r}: choose one of {sorted(FAMILIES)}")
    if split not in SPLITS:
        raise InputError(f"suite split {split!r}: choose one of {SPLITS}")
    rng = random.Random(f"{name}-{seed}")
    rows, seen = [], set()
    for _ in range(200 * n):
        key, prompt, right, wrong = FAMILIES[name](rng)
        if _split_of(key, test_fraction, validation_fraction) != split or (prompt, wrong) in seen:
            continue
        seen.add((prompt, wrong))
        rows.append({"prompt": prompt, "chosen": f" {right}", "rejected": f" {wrong}"})
        if len(rows) == n:
            return Dataset.from_list(rows)
    raise InputError(f"suite family {name!r} split {split!r} has fewer than {n} unique pairs; ask for fewer")


def to_conversational(row: dict) -> dict:
    """Plain row -> TRL's conversational preference format (user prompt, assistant completions)."""
    question = row["prompt"].removeprefix("Question: ").removesuffix("\nAnswer:")
    return {
        "prompt": [{"role": "user", "content": question}],
        "chosen": [{"role": "assistant", "content": row["chosen"].strip()}],
        "rejected": [{"role": "assistant", "content": row["rejected"].strip()}],
    }
