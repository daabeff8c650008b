"""Commonsense-170K (LLM-Adapters) for supervised fine-tuning, and an offline stand-in of the same format.

Commonsense-170K mixes the training sets of BoolQ, PIQA, Social IQA, HellaSwag, WinoGrande, ARC-e/c and
OpenBookQA, each row rewritten as an instruction with numbered options and an answer label:

    {"instruction": "Please choose the correct answer to the question: ...\\n\\nAnswer1: ...\\n\\nAnswer2: ..."
                    "\\n\\nAnswer format: answer1/answer2",
     "input": "", "output": "the correct answer is answer2", "answer": "answer2"}

It is on the hub as `zwhe99/commonsense_170k` (also the file `ft-training_set/commonsense_170k.json` of the
LLM-Adapters repository). Rows become TRL prompt/completion pairs with the Alpaca template LLM-Adapters trains
with: prompt = template(instruction, input) ending in "### Response:\\n", completion = output.

The offline stand-in (`suite:commonsense:<split>`) is generated here: seven families, one per answer format of
Commonsense-170K (true/false, solution1/2, answer1..3, ending1..4, option1/2, answer1..4, answer1..5), over
arithmetic, capital cities and word categories, so every answer is objectively right. `make_mc_docs` gives the
held-out multiple-choice documents the package's lm-eval tasks (reprpo_trl/mc_tasks) score.
"""

import random

from datasets import Dataset

from .loading import load_file_or_hub
from .suite import CAPITALS, SPLITS, SUITE_SEED, _split_of

COMMONSENSE_170K = "zwhe99/commonsense_170k"
INSTRUCTION_FIELDS = ("instruction", "input", "output")

_PROMPT = ("Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
           "### Instruction:\n{instruction}\n\n### Response:\n")  # fmt: skip
_PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. Write a response "
    "that appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ANSWER_PREFIX = "the correct answer is"


def alpaca_prompt(instruction: str, input: str = "") -> str:
    """The LLM-Adapters (Alpaca) training prompt of one instruction row."""
    if input and input.strip():
        return _PROMPT_WITH_INPUT.format(instruction=instruction, input=input)
    return _PROMPT.format(instruction=instruction)


# --- the offline stand-in ------------------------------------------------------------------------------------

CATEGORIES = {
    "fruit": ["apple", "banana", "cherry", "grape", "lemon", "mango", "peach", "pear"],
    "animal": ["horse", "tiger", "rabbit", "eagle", "whale", "sheep", "monkey", "zebra"],
    "colour": ["red", "green", "blue", "yellow", "purple", "orange", "brown", "pink"],
    "vehicle": ["car", "bus", "train", "bicycle", "truck", "boat", "airplane", "tractor"],
    "musical instrument": ["piano", "violin", "guitar", "drum", "flute", "trumpet", "cello", "harp"],
    "tool": ["hammer", "saw", "wrench", "screwdriver", "drill", "shovel", "chisel", "pliers"],
}  # fmt: skip
_NAMES = ["Tom", "Ana", "Ravi", "Mei", "Lucas", "Zara", "Omar", "Ines", "Kofi", "Yuki"]
_ITEMS = ["apples", "marbles", "books", "stickers", "coins", "pencils", "shells", "cards"]


def _near(rng, right: int, k: int) -> list[int]:
    """`right` and k - 1 distinct wrong integers near it, shuffled."""
    wrong = rng.sample([right + d for d in (-3, -2, -1, 1, 2, 3) if right + d >= 0], k - 1)
    options = [right, *wrong]
    rng.shuffle(options)
    return options


def _truefalse(rng):
    if rng.random() < 0.5:
        a, b = rng.randint(1, 30), rng.randint(1, 30)
        claimed = a + b if rng.random() < 0.5 else a + b + rng.choice([-2, -1, 1, 2])
        return (a, b, claimed), f"is {a} + {b} equal to {claimed}?", ["true", "false"], int(claimed != a + b)
    country, other = rng.sample(sorted(CAPITALS), 2)
    city = CAPITALS[country] if rng.random() < 0.5 else CAPITALS[other]
    return (country, city), f"is {city} the capital of {country}?", ["true", "false"], int(city != CAPITALS[country])


def _solution(rng):
    a, b, sign = rng.randint(10, 200), rng.randint(2, 9), rng.choice([1, -1])
    options = [f"add {b} to it", f"subtract {b} from it"]
    rng.shuffle(options)
    right = options.index(f"add {b} to it" if sign > 0 else f"subtract {b} from it")
    return (a, b, sign), f"To turn the number {a} into {a + sign * b}, you", options, right


def _answer3(rng):
    a, b = rng.randint(10, 40), rng.randint(1, 9)
    name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
    options = _near(rng, a - b, 3)
    text = f"{name} has {a} {item} and gives {b} of them to a friend. How many {item} does {name} have left?"
    return (a, b, name, item), text, [str(x) for x in options], options.index(a - b)


def _ending4(rng):
    country, *others = rng.sample(sorted(CAPITALS), 4)
    cities = [CAPITALS[country], *(CAPITALS[c] for c in others)]
    rng.shuffle(cities)
    return (country,), f"Looking at the map of {country}, she found its capital city,", [f"{c}." for c in cities], cities.index(CAPITALS[country])


def _option2(rng):
    x, y = rng.sample(range(1, 100), 2)
    big = max(x, y)
    return (x, y), f"Between {x} and {y}, the larger number is _.", [str(x), str(y)], [x, y].index(big)


def _answer4(rng):
    a, b = rng.randint(1, 50), rng.randint(1, 50)
    options = _near(rng, a + b, 4)
    return (a, b), f"What is {a} + {b}?", [str(x) for x in options], options.index(a + b)


def _answer5(rng):
    category, *others = rng.sample(sorted(CATEGORIES), 5)
    right = rng.choice(CATEGORIES[category])
    options = [right, *(rng.choice(CATEGORIES[c]) for c in others)]
    rng.shuffle(options)
    return (category, right, tuple(sorted(options))), f"Which of these is a {category}?", options, options.index(right)


# family -> (generator, LLM-Adapters instruction opening, option label, benchmark whose format it copies)
FAMILIES = {
    "truefalse": (_truefalse, "Please answer the following question with true or false, question: ", None, "BoolQ"),
    "solution": (_solution, "Please choose the correct solution to the question: ", "solution", "PIQA"),
    "answer3": (_answer3, "Please choose the correct answer to the question: ", "answer", "Social IQA"),
    "ending4": (_ending4, "Please choose the correct ending to complete the given sentence: ", "ending", "HellaSwag"),
    "option2": (_option2, "Please choose the correct answer to fill in the blank to complete the given sentence: ", "option", "WinoGrande"),
    "answer4": (_answer4, "Please choose the correct answer to the question: ", "answer", "ARC / OpenBookQA"),
    "answer5": (_answer5, "Please choose the correct answer to the question: ", "answer", "CommonsenseQA"),
}  # fmt: skip


def _instruction_row(family: str, question: str, choices: list[str], gold: int) -> dict:
    """One Commonsense-170K-format row (instruction, input, output, answer)."""
    _, opening, label, _ = FAMILIES[family]
    if label is None:  # true/false
        labels, body = choices, opening + question
    else:
        labels = [f"{label}{i + 1}" for i in range(len(choices))]
        body = opening + question + "".join(f"\n\n{label.capitalize()}{i + 1}: {c}" for i, c in enumerate(choices))
    instruction = f"{body}\n\nAnswer format: {'/'.join(labels)}"
    return {"instruction": instruction, "input": "", "output": f"{ANSWER_PREFIX} {labels[gold]}", "answer": labels[gold],
            "labels": labels}  # fmt: skip


def make_mc_docs(family: str, split: str = "test", n: int = 200, seed: int = SUITE_SEED) -> Dataset:
    """`n` unique multiple-choice documents of `family` from `split`: question, choices, gold (index), and the
    same item in Commonsense-170K format (instruction, output, answer, labels)."""
    if family not in FAMILIES:
        raise ValueError(f"unknown commonsense suite family {family!r}: choose one of {sorted(FAMILIES)}")
    if split not in SPLITS:
        raise ValueError(f"commonsense suite split {split!r}: choose one of {SPLITS}")
    generate = FAMILIES[family][0]
    rng = random.Random(f"commonsense-{family}-{seed}")
    rows, seen = [], set()
    for _ in range(200 * n):
        key, question, choices, gold = generate(rng)
        if _split_of((family, *key), 0.3, 0.1) != split or (question, tuple(choices)) in seen:
            continue
        seen.add((question, tuple(choices)))
        rows.append({"family": family, "question": question, "choices": choices, "gold": gold,
                     **_instruction_row(family, question, choices, gold)})  # fmt: skip
        if len(rows) == n:
            return Dataset.from_list(rows)
    raise ValueError(f"commonsense suite family {family!r} split {split!r} has fewer than {n} unique items; ask for fewer")


def make_commonsense(split: str = "train", n: int = 700, seed: int = SUITE_SEED) -> Dataset:
    """The offline Commonsense-170K stand-in: `n` rows (instruction, input, output, answer) spread evenly over the
    families and interleaved, from `split`."""
    per_family = -(-n // len(FAMILIES))
    parts = [make_mc_docs(family, split, per_family, seed) for family in FAMILIES]
    rows = [part[i] for i in range(per_family) for part in parts][:n]
    return Dataset.from_list([{k: row[k] for k in ("instruction", "input", "output", "answer")} for row in rows])


# --- loading -------------------------------------------------------------------------------------------------


def validate_instructions(dataset: Dataset, name: str) -> None:
    """Raise ValueError naming the dataset, row and field of the first malformed instruction row."""
    missing = [f for f in INSTRUCTION_FIELDS if f not in dataset.column_names]
    if missing:
        raise ValueError(f"instruction dataset {name!r} lacks column(s) {missing}; it has {dataset.column_names}. "
                         "Commonsense-170K-style rows need instruction, input (may be empty) and output.")  # fmt: skip
    for i, row in enumerate(dataset.select_columns(list(INSTRUCTION_FIELDS))):
        for field in ("instruction", "output"):
            if not isinstance(row[field], str) or not row[field].strip():
                raise ValueError(f"instruction dataset {name!r} row {i}: field {field!r} is empty or not text")
        if row["input"] is not None and not isinstance(row["input"], str):
            raise ValueError(f"instruction dataset {name!r} row {i}: field 'input' must be text (or empty)")


def to_prompt_completion(row: dict) -> dict:
    """An instruction row as a TRL prompt/completion pair (Alpaca prompt; the output as completion)."""
    return {"prompt": alpaca_prompt(row["instruction"], row["input"] or ""), "completion": row["output"]}


def load_sft_dataset(spec: str, n: int | None = None, seed: int = SUITE_SEED) -> Dataset:
    """Instruction rows named by `spec` as prompt/completion pairs, first `n` rows, every row validated.

    spec: `suite:commonsense:<split>` (offline stand-in), `commonsense_170k` (the hub copy), a local
    .json/.jsonl/.parquet/.csv file (e.g. LLM-Adapters' commonsense_170k.json), or `<hub id>[:config[:split]]`.
    """
    if spec.startswith("suite:"):
        _, name, split = (spec.split(":") + ["train"])[:3]
        if name != "commonsense":
            raise ValueError(f"instruction dataset {spec!r}: the offline suite for trainer sft is suite:commonsense:<split>")
        dataset = make_commonsense(split, n=n or 700, seed=seed)
    else:
        hub_spec = COMMONSENSE_170K + spec.removeprefix("commonsense_170k") if spec.split(":")[0] == "commonsense_170k" else spec
        dataset = load_file_or_hub(hub_spec, INSTRUCTION_FIELDS)
    if n is not None:
        dataset = dataset.select(range(min(n, len(dataset))))
    validate_instructions(dataset, spec)
    return dataset.map(to_prompt_completion, remove_columns=dataset.column_names, desc=f"Alpaca prompts for {spec}")
