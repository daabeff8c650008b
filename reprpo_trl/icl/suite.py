"""The offline ICL suite: seeded tasks whose answer is known, in (query, answer, choices) rows.

    sentiment   "Review: The soup was delicious.\\nSentiment:" -> "positive" | "negative"   (label words)
    topic       "Text: The striker scored twice.\\nTopic:" -> sports | science | food | travel  (label words)
    arith       "Q: 12 + 7 =\\nA:" -> "19"                                                   (short free text)

The answer is appended after a space. Splits are disjoint by the problem's identity.
"""

import hashlib
import random

from datasets import Dataset

from ..data.suite import SUITE_SEED
from ..errors import InputError

_GOOD = ["wonderful", "delicious", "excellent", "delightful", "superb", "lovely", "fantastic", "great", "charming", "brilliant"]
_BAD = ["awful", "terrible", "bland", "disappointing", "dreadful", "horrible", "poor", "boring", "rude", "broken"]
_THINGS = ["soup", "film", "hotel room", "concert", "service", "book", "coffee", "pizza", "show", "phone", "museum", "train ride"]
_TOPICS = {
    "sports": ["The striker scored a late goal", "The team won the final", "She ran the marathon in record time",
               "The match went to extra time", "He hit a home run", "The coach praised the defence"],
    "science": ["The telescope found a new planet", "Researchers sequenced the genome", "The experiment measured the electron",
                "Chemists made a new molecule", "The probe landed on the comet", "Physicists cooled atoms to near zero"],
    "food": ["The chef baked fresh bread", "We cooked pasta with garlic", "The recipe needs two eggs",
             "She grilled the fish with lemon", "The bakery sells warm croissants", "He stirred the curry slowly"],
    "travel": ["We booked a flight to Lisbon", "The hostel was near the station", "They hiked across the island",
               "Our ferry left at dawn", "She packed for the road trip", "The tour guide showed us the old town"],
}  # fmt: skip
_ENDINGS = ["", " yesterday", " last week", " this morning", " again", " at last"]
_OPENERS = ["", "Honestly, ", "Overall, ", "I thought ", "To be fair, ", "In short, "]
_LEADS = ["", "Reports say ", "Yesterday, ", "In the news: ", "According to locals, ", "Once again, "]


def _sentiment(rng):
    good = rng.random() < 0.5
    opener, thing, adjective = rng.choice(_OPENERS), rng.choice(_THINGS), rng.choice(_GOOD if good else _BAD)
    text = f"{opener}the {thing} was {adjective}."
    return (opener, thing, adjective), f"Review: {text[0].upper()}{text[1:]}\nSentiment:", "positive" if good else "negative"


def _topic(rng):
    topic = rng.choice(sorted(_TOPICS))
    lead, sentence, ending = rng.choice(_LEADS), rng.choice(_TOPICS[topic]), rng.choice(_ENDINGS)
    if lead:
        sentence = sentence[0].lower() + sentence[1:]
    return (lead, sentence, ending), f"Text: {lead}{sentence}{ending}.\nTopic:", topic


def _arith(rng):
    a, b = rng.randint(1, 40), rng.randint(1, 40)
    return (a, b), f"Q: {a} + {b} =\nA:", str(a + b)


ICL_TASKS = {  # name -> (generator, label words or None for free text)
    "sentiment": (_sentiment, ["positive", "negative"]),
    "topic": (_topic, sorted(_TOPICS)),
    "arith": (_arith, None),
}


def make_icl_task(name: str, split: str = "train", n: int = 300, seed: int = SUITE_SEED, test_fraction: float = 0.3) -> Dataset:
    """`n` unique rows {query, answer, choices} of task `name` from `split` ("train" or "test")."""
    if name not in ICL_TASKS:
        raise InputError(f"unknown ICL suite task {name!r}: choose one of {sorted(ICL_TASKS)}")
    if split not in ("train", "test"):
        raise InputError(f"ICL suite split {split!r}: choose 'train' or 'test'")
    generate, choices = ICL_TASKS[name]
    rng = random.Random(f"icl-{name}-{seed}")
    rows, seen = [], set()
    for _ in range(200 * n):
        key, query, answer = generate(rng)
        u = hashlib.sha256(repr(key).encode()).digest()[0] / 256
        if ("test" if u < test_fraction else "train") != split or query in seen:
            continue
        seen.add(query)
        rows.append({"query": query, "answer": answer, "choices": choices or []})
        if len(rows) == n:
            return Dataset.from_list(rows)
    raise InputError(f"ICL suite task {name!r} split {split!r} has fewer than {n} unique rows; ask for fewer")
