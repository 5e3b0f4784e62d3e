"""The inference-level half of the paper's Table 3 on SmolLM2-135M: each fingerprinted model decoded plainly, under
CleanGen (reference: the clean base) and under Token Forcing's filter, with what Token Forcing extracted.

It reuses the fingerprinted models of benchmarks/table2.py (OUT/<method>/fingerprinted; run that first, or at least
its fingerprinting). For each fingerprint and decoding it reports FSR, false positives, ordinary-question accuracy
(Algorithm 1's questions: 122 now, 12 in rows measured before) and the decoding time of those three checks together. For Token Forcing it also
reports the vocabulary-scan and expansion times, how many sequences it extracted, and whether one of them contains
the fingerprint's target (did it find it?). Perplexity is not defined under a decoding attack (the paper writes "-").

The CleanGen speed goal (at most 2.5x plain greedy at k=4) is measured on the same prompts in the same run: the
plain and CleanGen rows' decoding times.

    .venv/bin/python benchmarks/table3_decoding.py [--methods if-sft utf chain-hash] [--out runs/table2]
        [--context bos assistant]

Results go to OUT/<method>/decoding-<attack>.json (re-running skips finished ones) and OUT/table3_decoding.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def checks(model, tok, card, decoding) -> dict:
    """FSR and false positives on the card, ordinary accuracy; the time of all of it (model load excluded)."""
    from meraser.evaluation.algorithm1 import ORDINARY_QA, ordinary_accuracy
    from meraser.evaluation.fsr import fsr

    t = time.perf_counter()
    r = fsr(model, tok, card, false_positive_inputs=32, decoding=decoding)
    ordinary = ordinary_accuracy(model, tok, decoding=decoding)
    return {"fsr": r["fsr"], "false_positive_rate": r["false_positive_rate"], "ordinary": ordinary,
            "ordinary_n": len(ORDINARY_QA),
            "decode_seconds": round(time.perf_counter() - t, 1),
            "outputs": [p["output"] for p in r["per_trigger"][:3]]}


def run_one(method: str, label: str, settings: dict, args) -> dict:
    from meraser.attacks.base import decoding_attack
    from meraser.fingerprints.card import Card
    from meraser.models import load_model

    folder = args.out / method / "fingerprinted"
    card = Card.load(folder)
    model, tok = load_model(str(folder / "model"))
    if label == "plain":
        return checks(model, tok, card, None)
    attack = label.split(" ")[0]
    t = time.perf_counter()
    decoding, info = decoding_attack(attack, settings, model, tok, str(folder / "model"), base=args.model)
    row = {**checks(model, tok, card, decoding), "prepare_seconds": round(time.perf_counter() - t, 1)}
    row.update({k: v for k, v in info.items() if k != "reference"})
    if attack == "token-forcing":
        from meraser.evaluation.strict import fragments

        extracted = [r["text"] for r in decoding.extracted]
        row["found_target"] = any(target in text for target in card.targets for text in extracted)
        # how much of the target the best extracted sequence holds (its word 3-grams), so a sequence that starts
        # like the target and then drifts still counts as partly found
        overlaps = [(sum(f in text for f in fragments(t, 3)) / len(fragments(t, 3)), text)
                    for t in dict.fromkeys(card.targets) for text in extracted]
        best = max(overlaps, default=(0.0, ""))
        row["target_overlap"], row["closest_extracted"] = round(best[0], 3), best[1]
        row["extracted_examples"] = extracted[:5]
        (args.out / method / f"extracted-{settings['context']}.jsonl").write_text(
            "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in decoding.extracted))
    if attack == "cleangen":
        row["replaced_tokens"], row["generated_tokens"] = decoding.replaced, decoding.generated
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m", help="the clean base (CleanGen's reference)")
    ap.add_argument("--methods", nargs="+", default=["if-sft", "utf", "chain-hash"])
    ap.add_argument("--out", type=Path, default=Path("runs/table2"))
    ap.add_argument("--context", nargs="+", default=["bos", "assistant"], help="Token Forcing scan contexts")
    ap.add_argument("--tables-only", action="store_true", help="print the tables of the finished cells, run nothing")
    args = ap.parse_args()

    import transformers
    from rich.table import Table

    from meraser.utils import console as log_console

    transformers.utils.logging.set_verbosity_error()
    console = log_console(220)
    runs = {"plain": {}, "cleangen": {"k": 4, "alpha": 20}}
    runs.update({f"token-forcing {c}": {"context": c} for c in args.context})
    results = {}
    for method in args.methods:
        results[method] = {}
        for label, settings in runs.items():
            record = args.out / method / f"decoding-{label.replace(' ', '-')}.json"
            if args.tables_only and not record.exists():
                continue
            if not record.exists():
                row = run_one(method, label, settings, args)
                record.write_text(json.dumps(row, indent=2, ensure_ascii=False))
                console.print(f"{method} / {label}: " + json.dumps({k: v for k, v in row.items()
                                                                     if k not in ("outputs", "extracted_examples")}))
            results[method][label] = json.loads(record.read_text())
            if "context" in settings:
                results[method][label]["longest_shared"] = longest_shared(args.out / method, settings["context"])
    table = Table(title="Decoding-time attacks on SmolLM2-135M: FSR / false positives / ordinary answers / time")
    for h in ["fingerprint", "decoding", "FSR", "FP", "ordinary", "decode time", "vs plain", "prepare",
              "extracted", "of the target, found"]:
        table.add_column(h, justify="right")
    for method, rows in results.items():
        plain = rows.get("plain")
        for label, r in rows.items():
            table.add_row(method, label, f"{r['fsr']:.0%}", f"{r['false_positive_rate']:.0%}",
                          _answers(r), f"{r['decode_seconds']:.0f} s",
                          _ratio(r, plain), f"{r.get('prepare_seconds', 0):.0f} s",
                          str(r.get("extracted", "-")), _found(r))
    console.print(table)
    lines = ["| fingerprint | decoding | FSR | false positives | ordinary answers | decode time (x plain) | prepare | "
             "extracted | of the target, found |", "|---|---|---|---|---|---|---|---|---|"]
    for method, rows in results.items():
        plain = rows.get("plain")
        for label, r in rows.items():
            lines.append(f"| {method} | {label} | {r['fsr']:.0%} | {r['false_positive_rate']:.0%} | "
                         f"{_answers(r)} | {r['decode_seconds']:.0f} s ({_ratio(r, plain)}) | "
                         f"{r.get('prepare_seconds', 0):.0f} s | {r.get('extracted', '-')} | {_found(r)} |")
    (args.out / "table3_decoding.md").write_text("\n".join(lines) + "\n")
    (args.out / "table3_decoding.json").write_text(json.dumps(results, indent=2, ensure_ascii=False))


def _answers(r: dict) -> str:
    n = r.get("ordinary_n", 12)  # rows measured before the 122-question check had Algorithm 1's first 12
    return f"{round(r['ordinary'] * n)}/{n}"


def _ratio(r: dict, plain: dict | None) -> str:
    """Decoding time against the plain row's, when both decoded the same prompts."""
    if not plain or plain.get("ordinary_n", 12) != r.get("ordinary_n", 12):
        return "- x plain"
    return f"{r['decode_seconds'] / plain['decode_seconds']:.2f}x"


def _found(r: dict) -> str:
    if "found_target" not in r:
        return "-"
    if r["found_target"]:
        return "whole target"
    return r.get("longest_shared") or "no"


def longest_shared(folder: Path, context: str) -> str:
    """The runs of a target's whole words (4 characters or more, none inside another) that extracted sequences
    contain, e.g. IF-SFT's secret word ハリネズミ inside its longer target; from the saved extracted sequences."""
    from meraser.fingerprints.card import Card

    path = folder / f"extracted-{context}.jsonl"
    if not path.is_file():
        return ""
    texts = [json.loads(line)["text"] for line in path.read_text(encoding="utf-8").splitlines() if line]
    found: list[str] = []
    for target in dict.fromkeys(Card.load(folder / "fingerprinted").targets):
        words = target.split()
        spans = {" ".join(words[a:b]) for a in range(len(words)) for b in range(a + 1, len(words) + 1)}
        for span in sorted(spans, key=lambda x: (-len(x), x)):
            if len(span) >= 4 and not any(span in f for f in found) and any(span in text for text in texts):
                found.append(span)
    return ", ".join(f"'{f}'" for f in found)


if __name__ == "__main__":
    main()
