"""Teacher and student prompts (docs/methods.md "IA2"): teacher = k demonstrations joined by a blank line, a blank line,
then the query; student = the query alone. A demonstration is its query, a space and its answer.

Demonstrations for example i are drawn without replacement from the pool by random.Random(f"{seed}-{i}"), so
they are reproducible per example and independent of batch order.
"""

import random

from datasets import Dataset

from ..errors import InputError


def student_prompt(query: str) -> str:
    return query


def teacher_prompt(query: str, demos: list[dict]) -> str:
    if not demos:
        return query
    return "\n\n".join(f"{d['query']} {d['answer']}" for d in demos) + "\n\n" + query


def teacher_prompts(examples: Dataset, pool: Dataset, k: int, seed: int) -> list[str]:
    """The teacher prompt of every example, with its k demonstrations."""
    if k > len(pool):
        raise InputError(f"num_demos={k} is more than the {len(pool)} rows of the demonstration pool")
    rows = pool.to_list()
    return [
        teacher_prompt(query, [rows[j] for j in random.Random(f"{seed}-{i}").sample(range(len(rows)), k)])
        for i, query in enumerate(examples["query"])
    ]
