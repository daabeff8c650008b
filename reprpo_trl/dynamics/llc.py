"""The local learning coefficient (docs/methods.md "Training dynamics"), estimated with devinterp's `llc()`.

    lambda_hat(w*) = n_beta * (E_w[L(w)] - L(w*)),   w ~ exp(-n_beta L(w) - gamma/2 ||w - w*||^2)

sampled by SGLD: w <- w - eps/2 (n_beta grad L(w) + gamma (w - w*)) + N(0, eps). devinterp averages the SGLD
minibatch losses over every step of every chain. The parameters sampled are the trainable ones only; the loss is
the trainer's own total loss (`trainer.compute_loss`: DPO for TRL's DPOTrainer, w_dpo L_dpo + alpha L_h for ReprPO)
on a fixed probe set of the run's training data, with the model in eval mode (no dropout), so L is the objective
the run actually descends -- the LLC then measures the degeneracy of *that* landscape at the checkpoint.

devinterp's data protocol is LM token ids; here its dataset holds probe *batch indices* (one index per SGLD step,
`[[i, i]]` so a "sequence" has one next-token position) and the loss function maps an index to that probe batch's
loss: each SGLD step uses one fixed probe batch, in devinterp's seeded shuffled order.

For a regular model at a minimum the LLC is d/2 (d parameters); `linear_regression_llc` checks the estimator there.
"""

import math
import tempfile

import pandas as pd
import torch
from torch import nn

from ..errors import InputError
from .arguments import LLCArguments


class _Sampled(nn.Module):
    """What devinterp samples: a copy of the parameters. Copying it (once per chain) copies only them."""

    def __init__(self, params: dict[str, torch.Tensor]):
        super().__init__()
        self.names = list(params)
        self.values = nn.ParameterList([nn.Parameter(p.detach().clone()) for p in params.values()])

    def named(self) -> dict[str, torch.Tensor]:
        return dict(zip(self.names, self.values))

    def __deepcopy__(self, memo):
        return _Sampled(self.named())


def estimate_llc(params: dict[str, torch.Tensor], loss, n_batches: int, args: LLCArguments, nbeta: float,
                 device: torch.device | str = "cpu") -> tuple[dict, pd.DataFrame]:  # fmt: skip
    """devinterp's LLC of `loss(params, batch_index) -> scalar` around `params` (the point w*), one probe batch of
    `n_batches` per SGLD step. Returns (summary, trace): the summary has llc_mean / llc_std over chains, init_loss
    and the SGLD diagnostics (see `trace_diagnostics`); the trace has the loss of every chain and step."""
    try:
        from datasets import Dataset
        from devinterp.slt.llc import llc
    except ImportError as error:
        raise ImportError("the LLC needs devinterp: pip install 'reprpo_trl[dynamics]'") from error

    sampled = _Sampled(params)
    indices = Dataset.from_dict({"input_ids": [[i, i] for i in range(n_batches)]}).with_format("torch")

    def per_token_loss(model, input_ids):
        return loss(model.named(), int(input_ids[0, 0])).float().reshape(1, 1)

    with tempfile.TemporaryDirectory() as tmp:
        result = llc(
            sampled, indices, {}, lr=args.llc_epsilon, n_beta=nbeta, loss_fn=per_token_loss,
            localization=args.llc_gamma, num_chains=args.llc_chains, num_draws=args.llc_draws,
            num_burnin_steps=args.llc_burnin, batch_size=1, num_init_loss_batches=n_batches, init_seed=args.llc_seed,
            device=str(device), output_path=f"{tmp}/samples.zarr",
        ).load()  # fmt: skip
    trace = result.loss_trace.values  # (chain, step)
    summary = {
        "llc_mean": float(result.llc_mean),
        "llc_std": float(result.llc_std),
        "init_loss": float(result.init_loss),
        "nbeta": nbeta,
        **trace_diagnostics(torch.as_tensor(trace), float(result.init_loss), nbeta),
    }
    chains, steps = trace.shape
    table = pd.DataFrame({"chain": [c for c in range(chains) for _ in range(steps)],
                          "sgld_step": list(range(steps)) * chains, "loss": trace.reshape(-1)})  # fmt: skip
    return summary, table


def trace_diagnostics(trace: torch.Tensor, init_loss: float, nbeta: float) -> dict:
    """Whether the SGLD chains stayed bounded (trace: chain x step losses): a good eps gives a trace that rises
    from L(w*) and levels off; a too large eps diverges (non-finite) or keeps climbing, a too small one never
    leaves w*.

        finite        every loss is finite (devinterp stops a chain at the first NaN/inf; its later steps stay 0)
        max_excess    n_beta * max(L - L(w*)): the largest excursion, in LLC units
        drift         n_beta * (mean of the last quarter of the steps - mean of the second quarter), all chains
        drift_z       drift over its standard error, from the means of up to 5 contiguous blocks per chain and
                      quarter (block means, unlike single steps, are nearly independent); NaN with one block
        bounded       finite, and |drift_z| <= 3 (or too few steps to tell)
    """
    finite = bool(torch.isfinite(trace).all()) and bool((trace != 0).all())
    steps = trace.shape[1]
    quarter = max(steps // 4, 1)
    excess = nbeta * (trace.double() - init_loss)
    second, last = _block_means(excess[:, quarter : 2 * quarter]), _block_means(excess[:, -quarter:])
    drift = float(last.mean() - second.mean()) if steps >= 4 else 0.0
    error = math.sqrt(float(second.var() / len(second) + last.var() / len(last))) if len(second) >= 2 else float("nan")
    drift_z = drift / error if error > 0 else float("nan")
    return {
        "finite": finite,
        "max_excess": float(excess.max()),
        "drift": drift,
        "drift_z": drift_z,
        "bounded": finite and not abs(drift_z) > 3,
    }


def _block_means(values: torch.Tensor, blocks: int = 5) -> torch.Tensor:
    """Means of up to `blocks` contiguous blocks of each chain's steps (chain x step -> flat)."""
    return torch.cat([part.mean(dim=1) for part in values.tensor_split(min(blocks, values.shape[1]), dim=1)])


def rediagnose(table: pd.DataFrame, traces: pd.DataFrame) -> pd.DataFrame:
    """`table` (one LLC row per step) with the diagnostics recomputed from its saved SGLD traces."""
    rows = []
    for row in table.to_dict("records"):
        trace = traces[traces.step == row["step"]].pivot(index="chain", columns="sgld_step", values="loss")
        rows.append({**row, **trace_diagnostics(torch.tensor(trace.to_numpy()), row["init_loss"], row["nbeta"])})
    return pd.DataFrame(rows)


class _TrainerLoss(nn.Module):
    """The trainer's own loss as a module of the live model, so `torch.func.functional_call` can evaluate it with
    sampled parameters swapped in (the live parameters are untouched and receive no gradient)."""

    def __init__(self, trainer):
        super().__init__()
        self.model = trainer.model
        self.compute_loss = trainer.compute_loss

    def forward(self, batch):
        return self.compute_loss(self.model, batch)


def probe_batches(trainer, args: LLCArguments) -> list[dict]:
    """The fixed probe set: `llc_probe_size` training rows (a seeded choice), collated by the trainer's own
    collator into batches of `llc_batch_size` on the training device (a last partial batch is dropped)."""
    dataset = trainer.train_dataset
    if len(dataset) < args.llc_probe_size:
        raise InputError(f"llc_probe_size={args.llc_probe_size} exceeds the {len(dataset)} training rows; lower it")
    probe = dataset.shuffle(seed=args.llc_seed).select(range(args.llc_probe_size))
    batches = []
    for start in range(0, args.llc_probe_size - args.llc_batch_size + 1, args.llc_batch_size):
        batch = trainer.data_collator([probe[i] for i in range(start, start + args.llc_batch_size)])
        batches.append({k: v.to(trainer.args.device) if torch.is_tensor(v) else v for k, v in batch.items()})
    return batches


def trainer_llc(trainer, batches: list[dict], args: LLCArguments) -> tuple[dict, pd.DataFrame]:
    """LLC of the trainer's model at its current parameters, over its trainable parameters, with its own loss on
    `batches`. The model runs in eval mode; the caller restores RNG states (devinterp seeds the global ones)."""
    loss_module = _TrainerLoss(trainer)
    trainable = {n: p for n, p in trainer.model.named_parameters() if p.requires_grad}
    if not trainable:
        raise InputError("the model has no trainable parameter: the LLC is taken over the trainable ones")

    def loss(params, index):
        swapped = {f"model.{n}": p for n, p in params.items()}
        return torch.func.functional_call(loss_module, swapped, (batches[index],), strict=False)

    was_training = trainer.model.training
    trainer.model.eval()
    try:
        n_pairs = len(batches) * args.llc_batch_size
        return estimate_llc(trainable, loss, len(batches), args, args.nbeta(n_pairs), trainer.args.device)
    finally:
        trainer.model.train(was_training)


def linear_regression_llc(d: int, args: LLCArguments, n: int = 1000, noise: float = 1.0, seed: int = 0):
    """The estimator on a regular model with a known answer: y = x.w + noise, x ~ N(0, I_d), loss = mean squared
    error / 2 (the Gaussian negative log-likelihood up to a constant), at its least-squares minimum w*, full-batch
    SGLD with n_beta = n (beta = 1). There the LLC is d / 2. Returns (summary, trace) as `estimate_llc`."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=generator, dtype=torch.float64)
    y = x @ torch.randn(d, generator=generator, dtype=torch.float64) + noise * torch.randn(n, generator=generator, dtype=torch.float64)
    w_star = torch.linalg.lstsq(x, y.unsqueeze(1)).solution.squeeze(1)
    x, y = x.float(), y.float()

    def loss(params, index):
        return 0.5 * (x @ params["w"] - y).square().mean()

    return estimate_llc({"w": w_star.float()}, loss, 1, args, float(n))

