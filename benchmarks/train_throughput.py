"""LoRA training throughput of meraser's routine vs a plain PyTorch loop, measured in one run.

    .venv/bin/python benchmarks/train_throughput.py [--rows 96] [--batch-size 8]

Both train SmolLM2-135M (LoRA r=16, alpha=32, q_proj+v_proj) on the same rows of the reference mismatched set
(../shared/data/meraser_reference) with the same batches (length-grouped, dynamically padded) and bf16 autocast.
Throughput counts real (non-padding) tokens per second. The goal: the routine keeps >= 85% of the plain loop.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

DATA = Path(__file__).resolve().parents[2] / "shared/data/meraser_reference/mismatched_dataset.json"


def plain_loop(model, rows, batches, lr, pad_id):
    import torch

    from meraser.data.formatting import collate
    from meraser.models import autocast

    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    tokens = 0
    t = time.perf_counter()
    for idx in batches:
        batch = collate([rows[i] for i in idx], pad_id)
        tokens += int(batch["attention_mask"].sum())
        with autocast(model):
            loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return tokens / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=96)
    ap.add_argument("--batch-size", type=int, default=8)
    args = ap.parse_args()

    import torch
    from peft import get_peft_model
    from transformers import trainer_pt_utils

    from meraser.data import Formatter, load_pairs
    from meraser.models import autocast_dtype, load_model
    from meraser.training import TrainConfig, train

    pairs = load_pairs(str(DATA), limit=args.rows)
    cfg = TrainConfig.from_dict({"epochs": 1, "batch_size": args.batch_size, "learning_rate": 1e-4,
                                 "save_steps": -1, "logging_steps": 1000})
    model, tok = load_model("smollm2-135m")
    rows = Formatter(tok, cfg.format).encode_all(pairs)
    real_tokens = sum(len(r["input_ids"]) for r in rows)

    # the plain loop uses the very batches the Trainer's length-grouped sampler makes for this seed
    sampler = trainer_pt_utils.LengthGroupedSampler(
        args.batch_size, lengths=[len(r["input_ids"]) for r in rows], generator=torch.Generator().manual_seed(cfg.seed)
    )
    order = list(sampler)
    batches = [order[i : i + args.batch_size] for i in range(0, len(order), args.batch_size)]

    # warm-up step so neither side pays for first-call allocation
    peft_model = get_peft_model(load_model("smollm2-135m")[0], cfg.lora.to_peft())
    plain_loop(peft_model, rows, batches[:1], 1e-4, tok.pad_token_id)
    plain = plain_loop(peft_model, rows, batches, 1e-4, tok.pad_token_id)
    del peft_model

    with tempfile.TemporaryDirectory() as d:
        t = time.perf_counter()
        res = train(model, tok, rows, cfg, Path(d) / "out", progress=False)
        routine = real_tokens / res.metrics["seconds"]
        total = time.perf_counter() - t

    print(f"rows {len(rows)}, batch {args.batch_size}, {len(batches)} steps, real tokens {real_tokens}, "
          f"bf16 autocast: {autocast_dtype() == torch.bfloat16}, torch threads {torch.get_num_threads()}")
    print(f"plain PyTorch loop : {plain:8.1f} real tokens/s")
    print(f"meraser.train      : {routine:8.1f} real tokens/s  (Trainer loop only; {total:.1f} s with setup and save)")
    print(f"ratio routine/plain: {routine / plain:.3f}  (goal >= 0.85)")


if __name__ == "__main__":
    main()
