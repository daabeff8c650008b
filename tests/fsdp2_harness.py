"""Under `torchrun --nproc_per_node 2` (gloo, CPU): a tiny LoRA model sharded with torch's fully_shard (FSDP2).
Each rank runs backward on its own batch, then reprpo_trl.sharding projects every LoRA B gradient (DTensor,
Shard(0)) onto a fixed direction and writes a parameter back; rank 0 saves the complete results for
tests/test_distributed.py, which recomputes them in one process."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch.distributed.fsdp import fully_shard  # noqa: E402

from conftest import make_model, make_tokenizer  # noqa: E402
from reprpo_trl import sharding  # noqa: E402
from reprpo_trl.projection import project_output_axes  # noqa: E402

from fsdp2_reference import BETA, batch, directions, lora_model  # noqa: E402


def main():
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    model = lora_model(make_model(make_tokenizer()))
    for layer in model.base_model.model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    logits = model(input_ids=batch(rank)).logits
    logits.float().pow(2).mean().backward()  # FSDP2 averages the gradients of the two ranks
    params = {n: p for n, p in model.named_parameters() if "lora_B" in n}
    assert all(type(p.grad).__name__ == "DTensor" for p in params.values())
    us = directions(params)
    directions_in_order = [us[name] for name in params]  # one batched edit over every parameter, as ProjGrad does
    sharding.edit_gradients(list(params.values()), lambda grads, _: project_output_axes(grads, directions_in_order, BETA, True)[0])
    grads = {n: sharding.full(p.grad).detach().clone() for n, p in params.items()}
    first = next(iter(params))
    sharding.set_full_parameter(params[first], torch.full(sharding.full(params[first]).shape, 0.25))
    written = sharding.full_parameter(params[first]).clone()
    if rank == 0:
        torch.save({"grads": grads, "written": written}, sys.argv[1])
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
