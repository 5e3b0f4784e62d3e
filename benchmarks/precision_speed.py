"""bf16 autocast against plain fp32 on this CPU, measured in one run, with what meraser picks here.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/precision_speed.py [--batch-size 8] [--length 128] [--repeats 3]

Times one full fine-tuning step (forward, backward, AdamW) and one forward pass of SmolLM2-135M on random tokens,
alternating fp32 and bf16 autocast (weights fp32 in both) so that drift on a shared machine hits both alike, and
prints each one's median and the ratio. It also prints the CPU's bf16 instructions as torch sees them and the
precision `meraser.models.autocast_dtype` chooses: bf16 only where the CPU has native bf16 (avx512_bf16 or AMX on
x86), because oneDNN emulates it elsewhere and the emulation is slower than fp32.
"""

from __future__ import annotations

import argparse
import statistics
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--length", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    import torch
    from rich.table import Table

    from meraser.models import autocast_dtype, load_model
    from meraser.utils import console, track

    model, _ = load_model(args.model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (args.batch_size, args.length), generator=g)

    def train_step():
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def forward():
        with torch.no_grad():
            model(input_ids=ids)

    def timed(fn, bf16: bool) -> float:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            t = time.perf_counter()
            fn()
            return time.perf_counter() - t

    steps = {"training step": train_step, "forward pass": forward}
    for fn in track(list(steps.values()), "warm-up"):  # first calls pay for allocation and kernel selection
        timed(fn, False), timed(fn, True)
    plan = [(name, bf16) for name in steps for _ in range(args.repeats) for bf16 in (False, True)]
    runs = {key: [] for key in set(plan)}
    for name, bf16 in track(plan, "timing fp32 and bf16 steps"):
        runs[name, bf16].append(timed(steps[name], bf16))
    rows = []
    for name in steps:
        fp32, bf16 = statistics.median(runs[name, False]), statistics.median(runs[name, True])
        rows.append([name, f"{fp32:.2f} s", f"{bf16:.2f} s", f"{bf16 / fp32:.2f}x"])
    caps = {n: getattr(torch.cpu, f"_is_{n}_supported")() for n in ("avx512_bf16", "amx_tile")}
    t = Table(title=f"{args.model}, batch {args.batch_size} x {args.length} tokens, {torch.get_num_threads()} threads, "
                    f"median of {args.repeats}")
    for col in ("step", "fp32", "bf16 autocast", "bf16 / fp32"):
        t.add_column(col, justify="left" if col == "step" else "right")
    for row in rows:
        t.add_row(*row)
    out = console(120)
    out.print(t)
    out.print(f"CPU: {', '.join(f'{k}={v}' for k, v in caps.items())}, torch capability "
              f"{torch.backends.cpu.get_cpu_capability()}; oneDNN says bf16 "
              f"{torch.ops.mkldnn._is_mkldnn_bf16_supported()}; meraser picks {autocast_dtype('cpu') or 'fp32'}")


if __name__ == "__main__":
    main()
