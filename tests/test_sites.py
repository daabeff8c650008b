"""Layer specs, masked pooling and the hook collector."""

import pytest
import torch

from reprpo_trl.sites import Collection, StateCollector, decoder_layers, layer_sites, parse_layer_spec, pool


@pytest.mark.parametrize(
    "spec,expected",
    [
        ("3", [3]),
        ("-1", [9]),
        ("0.5", [5]),
        ("0.25, 0.5, -2", [2, 5, 8]),
        ("range(2, 8, 3)", [2, 5]),
        ("range(0.3, -2)", [3, 4, 5, 6, 7]),
        ("range(0, 4, 2), 9, 0.5", [0, 2, 5, 9]),
        ([1, -1], [1, 9]),
        ("1,1,1", [1]),
    ],
)
def test_parse_layer_spec(spec, expected):
    assert parse_layer_spec(spec, n_layers=10) == expected


@pytest.mark.parametrize(
    "spec,message",
    [
        ("10", r"selects layers \[10\].*has 10"),
        ("-11", r"selects layers \[-1\]"),
        ("1.5", "fraction 1.5 must lie in"),
        ("abc", "'abc' is not an int"),
        ("range(1)", "needs 2 or 3 arguments"),
        ("range(1, 5, 0)", "step must be a positive int"),
        ("range(5, 2)", "selects no layer"),
    ],
)
def test_parse_layer_spec_errors(spec, message):
    with pytest.raises(ValueError, match=message):
        parse_layer_spec(spec, n_layers=10)


def test_decoder_layers_found_through_peft(tiny_model):
    from peft import LoraConfig, get_peft_model

    layers = decoder_layers(tiny_model)
    peft_model = get_peft_model(tiny_model, LoraConfig(r=2, target_modules=["q_proj"]))
    assert decoder_layers(peft_model) is layers
    assert len(layers) == tiny_model.config.num_hidden_layers


def _masks():
    completion = torch.tensor([[0, 0, 1, 1, 0], [0, 1, 1, 1, 1]])
    attention = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]])
    return completion, attention


def test_pooling_by_hand():
    completion, attention = _masks()
    h = torch.arange(2 * 5 * 1, dtype=torch.float32).reshape(2, 5, 1)
    assert pool(h, completion, attention, "completion_mean")[:, 0].tolist() == [2.5, 7.5]
    assert pool(h, completion, attention, "all_mean")[:, 0].tolist() == [1.5, 7.0]
    assert pool(h, completion, attention, "last")[:, 0].tolist() == [3.0, 9.0]


@pytest.mark.parametrize("pooling", ["completion_mean", "all_mean", "last"])
def test_padding_never_enters_pooling(pooling):
    completion, attention = _masks()
    h = torch.randn(2, 5, 3)
    changed = h.clone()
    changed[0, 4] = 1e6  # the padding position of row 0
    assert torch.equal(pool(h, completion, attention, pooling), pool(changed, completion, attention, pooling))


def test_pooling_skips_virtual_tokens():
    """Prompt-learning adapters prepend positions; the last T are the real tokens."""
    completion, attention = _masks()
    h = torch.randn(2, 5, 3)
    with_virtual = torch.cat([torch.full((2, 4, 3), 1e6), h], dim=1)
    assert torch.equal(pool(with_virtual, completion, attention, "completion_mean"), pool(h, completion, attention, "completion_mean"))


def test_collector_records_each_call_in_order_and_unhooks(tiny_model):
    layers = [1, 3]
    collector = StateCollector(layer_sites([tiny_model], layers), "completion_mean")
    ids = torch.randint(3, 50, (2, 6))
    mask = torch.ones_like(ids)
    with collector.capture(mask, mask) as states:
        out1 = tiny_model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        tiny_model(input_ids=ids + 1, attention_mask=mask)
    assert sorted(states) == ["layer_1", "layer_3"]
    assert all(len(v) == 2 for v in states.values())
    # hidden_states[i + 1] is the output of decoder layer i
    torch.testing.assert_close(states["layer_1"][0], out1.hidden_states[2].mean(1))
    assert not torch.equal(states["layer_1"][0], states["layer_1"][1])
    tiny_model(input_ids=ids, attention_mask=mask)
    assert all(len(v) == 2 for v in states.values())  # hooks were removed


def test_unknown_pooling():
    with pytest.raises(ValueError, match="pooling='max'"):
        StateCollector({}, "max")


def _run(model, collection, seed=0):
    torch.manual_seed(seed)
    ids = torch.randint(3, 50, (2, 6))
    completion = torch.tensor([[0, 0, 1, 1, 1, 0], [0, 1, 1, 1, 1, 1]])
    attention = torch.tensor([[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]])
    with collection.collector.capture(completion, attention) as states:
        out = model(input_ids=ids, attention_mask=attention, output_hidden_states=True)
    return states, out, completion, attention


def qwen2_model(tokenizer):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=48, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )
    return Qwen2ForCausalLM(config)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_side_sites_read_module_inputs(arch, tiny_model, tokenizer):
    model = tiny_model if arch == "llama" else qwen2_model(tokenizer)
    collection = Collection("side", [model], [1, 2])
    assert list(collection.dims) == [
        "layer_1.self_attn.o_proj", "layer_1.mlp.down_proj", "layer_2.self_attn.o_proj", "layer_2.mlp.down_proj"
    ]
    assert collection.dims["layer_1.mlp.down_proj"] == model.config.intermediate_size
    inputs = []
    handle = decoder_layers(model)[2].mlp.down_proj.register_forward_hook(lambda m, a, o: inputs.append(a[0]))
    states, _, completion, attention = _run(model, collection)
    handle.remove()
    torch.testing.assert_close(states["layer_2.mlp.down_proj"][0], pool(inputs[0], completion, attention, "completion_mean"))


def test_side_sites_read_outputs(tiny_model):
    collection = Collection("side", [tiny_model], [0], side_io="output")
    assert set(collection.dims) == {f"layer_0.{m}" for m in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj")}
    assert collection.dims["layer_0.self_attn.k_proj"] == 16  # 2 kv heads x head_dim 8
    outputs = []
    handle = decoder_layers(tiny_model)[0].mlp.up_proj.register_forward_hook(lambda m, a, o: outputs.append(o))
    states, _, completion, attention = _run(tiny_model, collection)
    handle.remove()
    torch.testing.assert_close(states["layer_0.mlp.up_proj"][0], pool(outputs[0], completion, attention, "completion_mean"))


def test_side_regex_that_matches_nothing_lists_the_modules(tiny_model):
    with pytest.raises(ValueError, match=r"'out_proj\$' matches no module of decoder layer 1.*self_attn\.o_proj"):
        Collection("side", [tiny_model], [1], side_modules="out_proj$")


def test_suppressed_is_relu_of_pooled_difference(tiny_model):
    collection = Collection("suppressed", [tiny_model], [0, 2])
    assert list(collection.dims) == ["suppressed_0", "suppressed_2"]
    assert sorted(collection.collector.sites) == ["layer_0", "layer_1", "layer_2", "layer_3"]
    states, out, completion, attention = _run(tiny_model, collection)
    derived = collection.derive({site: values[0] for site, values in states.items()})
    h1, h2 = (pool(out.hidden_states[i], completion, attention, "completion_mean") for i in (1, 2))
    torch.testing.assert_close(derived["suppressed_0"], torch.relu(h1 - h2))
    assert (derived["suppressed_2"] >= 0).all() and (derived["suppressed_2"] > 0).any()


def test_suppressed_needs_a_next_layer(tiny_model):
    with pytest.raises(ValueError, match="layer 3 is the last of 4"):
        Collection("suppressed", [tiny_model], [1, 3])


def test_pooling_under_gradient_checkpointing_matches(tiny_model):
    """Sites inside a checkpointed layer are pooled as their hook fires: nothing per token is kept past the
    module (the state is (N, d) before the forward has finished), and backward through the recompute agrees."""
    collection = Collection("side", [tiny_model], [1])
    grads = []
    for checkpointing in (False, True):
        tiny_model.zero_grad()
        if checkpointing:
            tiny_model.gradient_checkpointing_enable({"use_reentrant": False})
        tiny_model.train()
        shapes = []
        later_layer = decoder_layers(tiny_model)[2]  # runs after every layer-1 site
        handle = later_layer.register_forward_hook(lambda *_: shapes.extend(s[0].shape for s in states.values()))
        completion, attention = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 0]]), torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])
        with collection.collector.capture(completion, attention) as states:
            tiny_model(input_ids=torch.tensor([[5, 6, 7, 8], [9, 10, 11, 0]]), attention_mask=attention)
        handle.remove()
        assert shapes == [(2, 32), (2, 64)]  # o_proj and down_proj inputs, pooled
        sum(s[0].sum() for s in states.values()).backward()
        grads.append(decoder_layers(tiny_model)[0].mlp.down_proj.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1])
