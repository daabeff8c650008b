"""What tests/fsdp2_harness.py computes, shared with its one-process reference in tests/test_distributed.py."""

import torch
from peft import LoraConfig, get_peft_model

BETA = 0.3


def lora_model(model):
    torch.manual_seed(1)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    return get_peft_model(model, config)


def batch(rank: int) -> torch.Tensor:
    return torch.randint(3, 90, (2, 12), generator=torch.Generator().manual_seed(rank))


def directions(params: dict) -> dict:
    generator = torch.Generator().manual_seed(7)
    out = {}
    for name, p in params.items():
        u = torch.randn(p.shape[0], generator=generator)
        out[name] = u / u.norm()
    return out
