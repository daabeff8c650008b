"""Step time and peak memory of reprpo_trl trainers as ratios to TRL's own DPOTrainer (make bench).

Every configuration trains the same model on the same data with the same batch, each in a fresh process
(so peak memory is its own): median step time over the steps after warm-up, and peak memory (CUDA
max_memory_allocated on GPU, peak RSS on CPU, which includes the weights every configuration shares).

    python benchmarks/bench_trainers.py [--model embedded/SmolLM2-135M-Instruct] [--steps 12] [--batch 8]
"""


from timing import run_benchmark, train_and_measure

CONFIGS = {  # name -> (trainer, extra config)
    "dpo": ("dpo", {}),
    "dpo_precompute": ("dpo", {"precompute_ref_log_probs": True}),
    "reprpo_prefvec": ("reprpo", {"hidden_loss": "prefvec"}),
    "reprpo_mse": ("reprpo", {"hidden_loss": "mse"}),
    "reprpo_prefvec_precompute": ("reprpo", {"hidden_loss": "prefvec", "precompute_ref_log_probs": True}),
    "reprpo_side_prefvec": ("reprpo", {"hidden_loss": "prefvec", "collection": "side"}),
    "reprpo_suppressed_innerdpo": ("reprpo", {"hidden_loss": "innerdpo", "collection": "suppressed"}),
    "reprpo_rank_ether": ("reprpo", {"hidden_loss": "rank", "transform": "ether"}),
    "reprpo_rank_etherplus": ("reprpo", {"hidden_loss": "rank", "transform": "etherplus"}),
    "reprpo_rank_hra": ("reprpo", {"hidden_loss": "rank", "transform": "hra"}),
    "reprpo_rank_ortho": ("reprpo", {"hidden_loss": "rank", "transform": "ortho", "ortho_map": "cayley"}),
    "reprpo_rank_svd": ("reprpo", {"hidden_loss": "rank", "transform": "svd"}),
    "projgrad": ("projgrad", {"proj_beta": 0.0}),
    "projgrad_update": ("projgrad", {"proj_beta": 0.0, "project_update": True}),
    "projbp": ("projbp", {"proj_beta": 0.0}),
}


def run_one(name, args, device):
    model_name, steps, batch = args.model, args.steps, args.batch
    import torch
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from reprpo_trl.data import make_family
    from reprpo_trl.models import resolve_model
    from reprpo_trl.train import TRAINERS

    trainer_kind, extra = CONFIGS[name]
    path = resolve_model(model_name)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16 if device == "cuda" else torch.float32)
    data = make_family("add_word", "train", n=steps * batch)
    common = dict(
        output_dir=f"/tmp/bench_{name}", max_steps=steps, per_device_train_batch_size=batch, learning_rate=1e-4,
        report_to="none", save_strategy="no", logging_steps=steps, use_cpu=device == "cpu", bf16=device == "cuda",
        max_length=128, seed=0, disable_tqdm=True,
    )  # fmt: skip
    config_class, trainer_class = TRAINERS[trainer_kind]
    lora = LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    trainer = trainer_class(
        model, args=config_class(**common, **extra), train_dataset=data, processing_class=tokenizer, peft_config=lora
    )
    return train_and_measure(trainer, device)


def main():
    args, device, results = run_benchmark(__file__, __doc__, CONFIGS, run_one)
    base = results["dpo"]
    print(f"\nratios vs TRL DPOTrainer (live reference), {device}, model {args.model}, batch {args.batch}:")
    print(f"{'config':28s} {'time':>6s} {'memory':>7s}")
    for name, r in results.items():
        print(f"{name:28s} {r['step_s'] / base['step_s']:6.2f} {r['peak_mib'] / base['peak_mib']:7.2f}")


if __name__ == "__main__":
    main()
