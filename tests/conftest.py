"""Tiny, offline building blocks: a character-level tokenizer and random Llama models built from a config."""

import os
import string

import pytest
import torch

os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

# REPRPO_TEST_DEVICE=cuda runs every trainer of the suite on the GPU: the tests write use_cpu=True (CI has no GPU),
# and this turns it off, in the test process and in the single-process runs it starts (tests/kill_harness.py). The
# multi-process launches of test_distributed.py and test_launch.py keep their CPU (gloo, DeepSpeed-on-CPU) configs.
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
