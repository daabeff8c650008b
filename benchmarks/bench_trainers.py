"""Step time, tokens/s and peak memory of reprpo_trl trainers as ratios to TRL's own DPOTrainer (make bench).

Every configuration trains the same model on the same data with the same batch, each in a fresh process
(so peak memory is its own): median step time over the steps after warm-up, tokens per second, and peak memory
(benchmarks/timing.py: CUDA max_memory_allocated on GPU; on CPU the torch allocator's peak during one step).
Short mode (default): `add_word` pairs of ~60 tokens at max_length 128. Long mode (--max_length N): synthetic
pairs of random single-token words, a prompt of N/4 tokens and two completions filling the rest (976: 244 + 728).

    python benchmarks/bench_trainers.py [--model embedded/SmolLM2-135M-Instruct] [--shape LAYERS,HIDDEN[,VOCAB]]
        [--steps 12] [--batch 8] [--max_length 976] [--gradient_checkpointing] [--repeats 2] [--configs ...]
"""

import random

from timing import load_model, run_benchmark, train_and_measure

CONFIGS = {  # name -> (trainer, extra config)
    "dpo": ("dpo", {}),
    "dpo_precompute": ("dpo", {"precompute_ref_log_probs": True}),
    "reprpo_prefvec": ("reprpo", {"hidden_loss": "prefvec"}),
    "reprpo_mse": ("reprpo", {"hidden_loss": "mse"}),
    "reprpo_prefvec_precompute": ("reprpo", {"hidden_loss": "prefvec", "precompute_ref_log_probs": True}),
    "reprpo_side_prefvec": ("reprpo", {"hidden_loss": "prefvec", "collection": "side"}),
    "reprpo_suppressed_innerdpo": ("reprpo", {"hidden_loss": "innerdpo", "collection": "suppressed", "layers": "0.25,0.5"}),
    "reprpo_rank_ether": ("reprpo", {"hidden_loss": "rank", "transform": "ether"}),
    "reprpo_rank_etherplus": ("reprpo", {"hidden_loss": "rank", "transform": "etherplus"}),
    "reprpo_rank_hra": ("reprpo", {"hidden_loss": "rank", "transform": "hra"}),
    "reprpo_rank_ortho": ("reprpo", {"hidden_loss": "rank", "transform": "ortho", "ortho_map": "cayley"}),
    "reprpo_rank_svd": ("reprpo", {"hidden_loss": "rank", "transform": "svd"}),
    "reprpo_dpo0_half_depth": ("reprpo", {"hidden_loss": "prefvec", "dpo_weight": 0.0, "layers": "0.25,0.5"}),
    "projgrad": ("projgrad", {"proj_beta": 0.0}),
    "projgrad_update": ("projgrad", {"proj_beta": 0.0, "project_update": True}),
    "projbp": ("projbp", {"proj_beta": 0.0}),
}


def long_pairs(tokenizer, n: int, max_length: int, vocab_size: int, seed: int = 0):
    """`n` synthetic pairs of single-token words (token ids below `vocab_size`): a prompt of max_length // 4
    words, completions of the rest."""
    from datasets import Dataset

    vocab = tokenizer.get_vocab()
    words = sorted(t[1:] for t, i in vocab.items() if t.startswith("Ġ") and t[1:].isalpha() and t[1:].islower() and i < vocab_size)
    rng = random.Random(seed)
    text = lambda k: "".join(" " + rng.choice(words) for _ in range(k))  # noqa: E731
    prompt, completion = max_length // 4, max_length - max_length // 4 - 4
    return Dataset.from_list([{"prompt": text(prompt), "chosen": text(completion), "rejected": text(completion)} for _ in range(n)])


def build_trainer(name, args, device):
    """The trainer of configuration `name` on the benchmark's model, data and batch."""
    from peft import LoraConfig

    from reprpo_trl.data import make_family
    from reprpo_trl.train import TRAINERS

    trainer_kind, extra = CONFIGS[name]
    model, tokenizer = load_model(args.model, device, args.shape)
    n = args.steps * args.batch
    data = long_pairs(tokenizer, n, args.max_length, model.config.vocab_size) if args.max_length else make_family("add_word", "train", n=n)
    common = dict(
        output_dir=f"/tmp/bench_{name}", max_steps=args.steps, per_device_train_batch_size=args.batch, learning_rate=1e-4,
        report_to="none", save_strategy="no", logging_steps=args.steps, use_cpu=device == "cpu", bf16=device == "cuda",
        max_length=args.max_length or 128, seed=0, disable_tqdm=True, gradient_checkpointing=args.gradient_checkpointing,
    )  # fmt: skip
    config_class, trainer_class = TRAINERS[trainer_kind]
    lora = LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    return trainer_class(
        model, args=config_class(**common, **extra), train_dataset=data, processing_class=tokenizer, peft_config=lora
    )


def run_one(name, args, device):
    return train_and_measure(build_trainer(name, args, device), device)


def main():
    options = {"max_length": (int, 0), "gradient_checkpointing": (bool, False)}
    args, device, results = run_benchmark(__file__, __doc__, CONFIGS, run_one, options)
    base = results["dpo"]
    print(f"\nratios vs TRL DPOTrainer (live reference), {device}, model {args.model} shape {args.shape}, batch "
          f"{args.batch}, max_length {args.max_length or 128}, gradient checkpointing {args.gradient_checkpointing}:")  # fmt: skip
    print(f"{'config':28s} {'time':>6s} {'cpu':>6s} {'memory':>7s} {'ms/step':>9s} {'tokens/s':>9s} {'peak MiB':>9s}")
    for name, r in results.items():
        print(f"{name:28s} {r['step_s'] / base['step_s']:6.2f} {r['cpu_s'] / base['cpu_s']:6.2f} "
              f"{r['peak_mib'] / base['peak_mib']:7.2f} {1000 * r['step_s']:9.0f} {r['tokens_per_s']:9.0f} {r['peak_mib']:9.0f}")  # fmt: skip


if __name__ == "__main__":
    main()
