"""The trained matrices of a model, as docs/methods.md "Training dynamics" reads them: for a peft adapter the *effective*
update of each adapted weight, for full fine-tuning the weights themselves.

    LoRA   dW = s * B A              (s = peft's scaling, alpha / r or alpha / sqrt(r)), kept as the factors (s B, A)
    HiRA   dW = W0 * (B A)           (Hadamard product with the frozen base weight; peft's HiraLayer)
    IA3    dW = diag(l - 1)          (the scaling vector l as a diagonal map, minus the identity it starts from)
    full   W                         (every trainable 2-D parameter)

IA3: peft scales the layer's output, y = l * (W x), or for feed-forward layers its input, y = W (l * x); the update
of the full weight would be diag(l - 1) W or W diag(l - 1). The method reference reads the scaling vectors as diagonal maps, so
the statistics describe diag(l - 1) -- what the adapter learned, zero at initialisation like LoRA's and HiRA's
dW -- and not its product with W0.
Biases: the trainable 1-D parameters named `*.bias` (full fine-tuning; peft adapters here train none).
"""

from dataclasses import dataclass

import torch
from peft.tuners.hira.layer import HiraLayer
from peft.tuners.ia3.layer import IA3Layer
from peft.tuners.lora.layer import LoraLayer

from ..errors import InputError


@dataclass
class Matrix:
    """One trained matrix in the cheapest exact form: `dense`, low-rank `factors` (U, V) with M = U V, or
    `diagonal` v with M = diag(v)."""

    name: str
    dense: torch.Tensor | None = None
    factors: tuple[torch.Tensor, torch.Tensor] | None = None
    diagonal: torch.Tensor | None = None

    def to_dense(self) -> torch.Tensor:
        if self.dense is not None:
            return self.dense
        if self.factors is not None:
            return self.factors[0] @ self.factors[1]
        return torch.diag(self.diagonal)


def _active(layer, adapters) -> list[str]:
    return [name for name in layer.active_adapters if name in adapters]


@torch.no_grad()
def trained_matrices(model: torch.nn.Module) -> tuple[list[Matrix], list[torch.Tensor]]:
    """(matrices, biases) of `model`: the effective updates of its peft adapters, or, with no peft layer, its
    trainable 2-D parameters and trainable biases. Tensors are detached float32 views or products."""
    matrices = []
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            for adapter in _active(module, module.lora_A):
                if getattr(module, "use_dora", {}).get(adapter):
                    raise InputError(f"{name}: DoRA adapters have no low-rank dW = s B A; weight statistics support LoRA")
                a, b = module.lora_A[adapter].weight.float(), module.lora_B[adapter].weight.float()
                if a.dim() != 2:
                    raise InputError(f"{name}: LoRA on a {type(module.get_base_layer()).__name__} is not a matrix")
                matrices.append(Matrix(f"{name}.{adapter}", factors=(module.scaling[adapter] * b, a)))
            for adapter in _active(module, module.lora_embedding_A):
                a, b = module.lora_embedding_A[adapter].float(), module.lora_embedding_B[adapter].float()
                matrices.append(Matrix(f"{name}.{adapter}", factors=(module.scaling[adapter] * b, a)))
        elif isinstance(module, HiraLayer):
            for adapter in _active(module, module.hira_A):
                product = module.hira_B[adapter].float() @ module.hira_A[adapter].float()
                base = module.get_base_layer().weight.float()
                matrices.append(Matrix(f"{name}.{adapter}", dense=base * product.reshape(base.shape)))
        elif isinstance(module, IA3Layer):
            for adapter in _active(module, module.ia3_l):
                matrices.append(Matrix(f"{name}.{adapter}", diagonal=module.ia3_l[adapter].float().flatten() - 1))
    if matrices:
        return matrices, []
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    matrices = [Matrix(n, dense=p.detach().float()) for n, p in trainable if p.dim() == 2]
    biases = [p.detach().float() for n, p in trainable if p.dim() == 1 and n.endswith("bias")]
    if not matrices:
        raise InputError("no trained matrix found: the model has no LoRA/HiRA/IA3 layer and no trainable 2-D parameter")
    return matrices, biases
