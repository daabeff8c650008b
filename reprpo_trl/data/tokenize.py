"""Preference pairs to token ids, split at the prompt as TRL splits them."""

from trl.data_utils import common_prefix_length


def _ids(tokenizer, prompt, completion=None):
    if isinstance(prompt, list):  # chat messages
        messages = prompt + (completion or [])
        return tokenizer.apply_chat_template(messages, add_generation_prompt=completion is None, return_dict=False)
    text = prompt + (completion + tokenizer.eos_token if completion is not None else "")
    return tokenizer(text)["input_ids"]


def tokenize_pair(row: dict, tokenizer) -> dict:
    """prompt_ids / chosen_ids / rejected_ids as TRL tokenizes them (EOS after plain completions)."""
    prompt = _ids(tokenizer, row["prompt"])
    chosen = _ids(tokenizer, row["prompt"], row["chosen"])
    rejected = _ids(tokenizer, row["prompt"], row["rejected"])
    n = min(common_prefix_length(prompt, chosen), common_prefix_length(prompt, rejected))
    return {"prompt_ids": prompt[:n], "chosen_ids": chosen[n:], "rejected_ids": rejected[n:]}
