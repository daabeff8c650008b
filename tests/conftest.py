"""Tiny, offline building blocks: a character-level tokenizer and random Llama models built from a config."""

import os
import string

import pytest
import torch
from accelerate.utils import send_to_device

os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

# REPRPO_TEST_DEVICE=cuda runs every trainer of the suite on the GPU: the tests write use_cpu=True (CI has no GPU),
# and this turns it off, in the test process and in the single-process runs it starts (tests/kill_harness.py, and
# `device_flags()` for the others). The multi-process launches of test_distributed.py and test_launch.py keep their
# CPU (gloo, DeepSpeed-on-CPU) configs. On a GPU machine:
#
#     REPRPO_TEST_DEVICE=cuda python -m pytest -q
#
# A Trainer moves the model it is given to the device in place (and an explicit ref_model); a model, reference or
# batch the test builds itself stays on the CPU. Tests therefore compare a trainer's tensors through `on_cpu` and
# call a placed model outside the Trainer (which moves inputs only in its training step) through `to_device`.
DEVICE = os.environ.get("REPRPO_TEST_DEVICE", "cpu")


def use_test_device() -> None:
    if DEVICE == "cpu":
        return
    from transformers import TrainingArguments

    original = TrainingArguments.__post_init__

    def on_device(self):
        self.use_cpu = False
        original(self)

    TrainingArguments.__post_init__ = on_device


@pytest.fixture(autouse=True, scope="session")
def _test_device():
    use_test_device()


def device_flags() -> list[str]:
    """reprpo-train flags that put a training subprocess (which does not load this file) on the test device."""
    return [] if DEVICE == "cpu" else ["--use_cpu", "false"]


def on_cpu(tree):
    """`tree` (a tensor, or a dict / list / tuple of them) with every tensor on the CPU: what a trainer computed on
    the test device, next to a reference computed on the CPU. On the CPU the tensors themselves come back."""
    return send_to_device(tree, "cpu")


def to_device(tree, model):
    """`tree` with every tensor on the device of `model`'s parameters, where a Trainer has placed it."""
    return send_to_device(tree, next(model.parameters()).device)


def make_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<bos>", "<eos>"]
    vocab = {tok: i for i, tok in enumerate(specials + list(string.printable))}
    core = Tokenizer(models.WordLevel(vocab, unk_token="?"))
    core.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>")


def make_model(tokenizer, seed=0, layers=4, hidden=32):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return LlamaForCausalLM(config)


@pytest.fixture(scope="session")
def tokenizer():
    return make_tokenizer()


@pytest.fixture
def tiny_model(tokenizer):
    return make_model(tokenizer)


@pytest.fixture
def pairs():
    from reprpo_trl.data import make_family

    return make_family("add_small", "train", n=16)


def save_tiny(path) -> str:
    """A tiny random model and its tokenizer saved to `path`, for code that loads by path."""
    tokenizer = make_tokenizer()
    make_model(tokenizer).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture
def saved_model(tmp_path):
    return save_tiny(tmp_path / "tiny")
