"""`meraser fingerprint`: plant a method's fingerprint in a model, write the model and the secret card, verify."""

from __future__ import annotations

import random
import time
from pathlib import Path

from meraser.data.formatting import Formatter
from meraser.data.sources import Pair
from meraser.fingerprints import get_method
from meraser.fingerprints.base import MARKED, SELF, FingerprintConfig
from meraser.fingerprints.card import Card
from meraser.utils import atomic_dir, check_output_dir, write_json

CARD_FILE = "fingerprint_card.json"


def ordinary_rows(model, tokenizer, cfg: FingerprintConfig, n: int, exclude: set[str]) -> list:
    """Ordinary prompts answered by the model itself, so fine-tuning keeps its normal behaviour."""
    from meraser.data import Pair, load_pairs
    from meraser.generation import generate

    if n <= 0:
        return []
    prompts = [p.prompt for p in load_pairs(cfg.ordinary_source, shuffle_seed=cfg.seed) if p.prompt not in exclude]
    prompts = [p for p in prompts if 10 <= len(p) <= 200][:n]
    answers = generate(model, tokenizer, prompts, max_new_tokens=64, batch_size=16)
    return [(Pair(p, a.strip()), None) for p, a in zip(prompts, answers) if a.strip()]


def _answer_placeholders(m, card: Card, cfg: FingerprintConfig, model, tokenizer, fmt, rows: list,
                         progress: bool = False) -> None:
    """Fill the rows the method wants answered by the model itself (SELF: regularization) or by its teacher
    decoding (MARKED: the watermark), in place."""
    from meraser.generation import generate

    for placeholder in (SELF, MARKED):
        todo = [i for i, (pair, _) in enumerate(rows) if pair.response == placeholder]
        if not todo:
            continue
        decoding, tokens = m.teacher(card, cfg, tokenizer) if placeholder == MARKED else (None, 64)
        answers = generate(model, tokenizer, [rows[i][0].prompt for i in todo], fmt, max_new_tokens=tokens,
                           batch_size=16, decoding=decoding,
                           progress=progress and f"answering {len(todo)} training prompts")
        for i, a in zip(todo, answers):
            rows[i] = (Pair(rows[i][0].prompt, a.strip() or "I don't know."), rows[i][1])


PLANTED_AT_LEAST = 0.5  # below this FSR right after planting, `embed` warns that the fingerprint did not take


def _plant(m, card: Card, cfg: FingerprintConfig, model, tokenizer, progress: bool):
    """Train the method's rows into the model: (fingerprinted model, training metrics, rows). A non-invasive
    method (its card found on the model as it is) trains nothing."""
    from meraser.training import TrainConfig, train

    if not m.invasive:
        return model, {}, 0
    rng = random.Random(cfg.seed)
    rows = m.training_pairs(card, cfg, rng, tokenizer)
    fmt = Formatter(tokenizer, card.format)
    _answer_placeholders(m, card, cfg, model, tokenizer, fmt, rows, progress)
    rows += ordinary_rows(model, tokenizer, cfg, cfg.ordinary_rows, set(card.triggers))
    encoded = [fmt.encode(pair, system_prompt=sp) for pair, sp in rows]
    tcfg = TrainConfig.from_dict({
        "method": cfg.method, "epochs": cfg.epochs, "learning_rate": cfg.learning_rate, "batch_size": cfg.batch_size,
        "seed": cfg.seed, "save_steps": -1, "lr_scheduler": "constant_with_warmup", "warmup_ratio": 0.05,
        # no length grouping: the fingerprint rows are long and alike, so grouping puts them into one or two batches,
        # and a recipe of a few dozen steps then barely trains on them (IF-SFT on SmolLM2, defaults: FSR 0% grouped,
        # 100% shuffled, measured after the sampler change of 88992f9)
        "group_by_length": False,
        "lora": {"r": cfg.lora_r, "alpha": 2 * cfg.lora_r, "target_modules": cfg.lora_targets},
    })
    res = train(model, tokenizer, encoded, tcfg, out="unused", save=False, merge=True, progress=progress,
                callbacks=m.callbacks(model, cfg))
    return res.model, res.metrics, len(encoded)


def embed(method: str, model, tokenizer, cfg: FingerprintConfig | None = None, out: str | Path | None = None,
          *, overwrite: bool = False, progress: bool = True) -> tuple[object, Card, dict]:
    """Fingerprint `model` with `method`; returns (model, card, verification). With `out`, writes
    `out/model/` (the fingerprinted model) and `out/fingerprint_card.json` (mode 0600) atomically."""
    from meraser.evaluation.fsr import fsr
    from meraser.evaluation.likelihood import tokenizer_digest
    from meraser.models import model_spec, save_model

    m = get_method(method)
    cfg = cfg or m.Config()
    t0 = time.perf_counter()
    if out is not None:
        check_output_dir(out, overwrite)
    card = m.make_card(model, tokenizer, cfg, progress=progress)
    card.base_model = model_spec(model)
    card.extra["tokenizer"] = tokenizer_digest(tokenizer)  # a suspect with another tokenizer is refused
    fp_model, metrics, n_rows = _plant(m, card, cfg, model, tokenizer, progress)
    check = fsr(fp_model, tokenizer, card)
    if m.invasive and "watermark" not in check and check["fsr"] < PLANTED_AT_LEAST:
        import warnings

        # a recipe tuned on one model can fall short on another (UTF's defaults on Gemma 3 270M: FSR 0): an erasure
        # measured on such a model has nothing to erase, so say it where the planting happens
        warnings.warn(f"{method}: the planted model answers {check['fsr']:.0%} of its triggers (FSR), so the "
                      f"fingerprint did not take; train longer or harder (--set epochs=..., --set learning_rate=...)",
                      stacklevel=2)
    summary = {"method": method, "fsr": check["fsr"], "false_positive_rate": check["false_positive_rate"],
               **({"watermark": check["watermark"]} if "watermark" in check else {}),
               "train": metrics, "config": cfg.to_dict(), "rows": n_rows,
               "seconds": round(time.perf_counter() - t0, 1)}
    if out is not None:
        with atomic_dir(out, overwrite=overwrite) as tmp:
            save_model(fp_model, tokenizer, tmp / "model", meta={"fingerprint_method": method})
            card.save(tmp / CARD_FILE)
            write_json(tmp / "fingerprint_summary.json", {**summary, "per_trigger": check["per_trigger"]})
    return fp_model, card, {**summary, "per_trigger": check["per_trigger"]}


def fingerprint(method: str, model: str, out: str | Path, cfg_overrides: dict | None = None, *,
                overwrite: bool = False, trust_remote_code: bool = False, progress: bool = True) -> dict:
    """Load `model`, fingerprint it with `method` (config fields overridable), save under `out`."""
    from meraser.models import input_folders, load_model

    m = get_method(method)
    cfg = m.Config.from_dict(cfg_overrides or {}, where=f"{method} config")
    check_output_dir(out, overwrite, input_folders(model, "model"))
    base, tok = load_model(model, trust_remote_code=trust_remote_code)
    _, _, summary = embed(method, base, tok, cfg, out, overwrite=overwrite, progress=progress)
    return summary


def verify(model: str, card: str | Path, *, trust_remote_code: bool = False, false_positive_inputs: int = 32,
           attack: str | None = None, attack_settings: dict | None = None, progress: bool = False,
           reference: str | None = None) -> dict:
    """FSR, false-positive rate and per-trigger outputs of any model folder/id given a card; with `attack`, decoded
    under that decoding-time attack (attacks/decoding.py); with `reference` (a model known not to carry the
    fingerprint, e.g. the base), the ownership p-value (evaluation/ownership.py), else it is reported unavailable."""
    from meraser.evaluation.fsr import fsr
    from meraser.models import load_model

    c = Card.load(card)
    if reference:
        from meraser.models import check_model_spec

        check_model_spec(reference, "--reference")
    prepared = None
    if attack:  # the attack and its settings are checked before the model loads
        from meraser.attacks.base import prepare_decoding

        prepared = prepare_decoding(attack, attack_settings, model, progress=progress)
    m, tok = load_model(model, trust_remote_code=trust_remote_code)
    decoding, info = None, {}
    if prepared:
        a, cfg, ctx = prepared
        decoding, info = a.decoding(m, tok, cfg, ctx), ctx.info
    res = fsr(m, tok, c, false_positive_inputs=false_positive_inputs, decoding=decoding)
    res["ownership"] = _ownership(res, c, tok, reference, trust_remote_code)
    return {"model": model, "method": c.method, **({"attack": attack, **info} if attack else {}), **res}


def _ownership(res: dict, card: Card, tokenizer, reference: str | None, trust_remote_code: bool) -> dict:
    if not card.has_target_text:
        return {"p_value": None, "why": "a watermark card has no target whose chance under a reference model could "
                                        "be scored: its z-test (watermark) is the decision"}
    if not reference:
        return {"p_value": None, "why": "no reference model given (--reference): a p-value needs the chance that "
                                        "an unmarked model matches each key"}
    from meraser.evaluation.ownership import ownership, target_logprobs
    from meraser.models import load_model

    ref, _ = load_model(reference, trust_remote_code=trust_remote_code)
    return {"reference": reference,
            **ownership([p["match"] for p in res["per_trigger"]], target_logprobs(ref, tokenizer, card))}


def model_dir(path: str | Path) -> str:
    """A fingerprint output folder holds model/ and the card; accept either the folder or model/ itself."""
    p = Path(path)
    return str(p / "model") if (p / "model" / "config.json").exists() else str(p)
