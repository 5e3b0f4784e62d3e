"""Perplexity filtering of prompts (Nasery et al. 2025, "Are Robust LLM Fingerprints Adversarially Robust?",
https://arxiv.org/abs/2509.26598; the input-detection attack of the authors' toolkit, sentient-agi/mlprints):
fingerprint keys are often unnatural text (IF-SFT's scrambled strings, UTF's under-trained tokens, RoFL's
optimised prompts), so a small helper model scores each prompt and a prompt above a perplexity threshold gets a
fixed refusal instead of an answer. The toolkit's defaults: the prompt as the suspect sees it (chat template
included, special tokens dropped), its plain perplexity exp(mean token NLL) under GPT-2, threshold 100.

Here the helper is the base model the suspect derives from (SmolLM2-135M for the embedded default: no smaller
model of its family exists, and GPT-2 would need a download), else the suspect itself, or any model given as
`helper`. Ordinary prompts that score above the threshold are refused too: that is the attack's utility cost, and
the ordinary-question check measures it. The toolkit's threshold of 100 was set for GPT-2; SmolLM2 scores its
chat-formatted ordinary questions at 91-338 (median 159), so at 100 it refuses nearly all of them. `benign_refusal`
sets the threshold the way an attacker with no key would: from the helper's scores on benign prompts (chitchat by
default, which the ordinary-question check does not use), refusing that share of them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from meraser.attacks.base import AttackConfig
from meraser.attacks.decoding import DecodingAttack
from meraser.config import field
from meraser.data.sources import OFFLINE_DEFAULT
from meraser.generation import Decoding, pack
from meraser.utils import MeraserError

REFUSAL = "I'm sorry, but I can't help with that."


@dataclass
class PerplexityFilterConfig(AttackConfig):
    helper: str | None = field(None, help="the model that scores prompts (None: the base the suspect derives from, "
                                          "else the suspect itself)")
    threshold: float = field(100.0, help="refuse a prompt whose perplexity under the helper is above this (toolkit: "
                                         "100)")
    benign_refusal: float | None = field(None, help="set the threshold from benign prompts instead: the perplexity "
                                                    "above which this share of them lies (0.05: refuse the 5% the "
                                                    "helper finds least natural)")
    benign: str = field(OFFLINE_DEFAULT, help="benign prompts for that calibration: JSON/JSONL file, 'chitchat' "
                                              "(offline) or hf:ID")
    benign_n: int = field(256, help="benign prompts scored for the calibration")
    refusal: str = field(REFUSAL, help="the answer a filtered prompt gets")
    batch_size: int = field(16, help="prompts scored per forward pass")

    def validate(self, where: str) -> None:
        if self.threshold <= 1:
            raise MeraserError(f"{where}.threshold must be above 1 (a perplexity), got {self.threshold}")
        if self.benign_refusal is not None and not 0 < self.benign_refusal < 1:
            raise MeraserError(f"{where}.benign_refusal must be a share between 0 and 1, got {self.benign_refusal}")
        if self.benign_n < 20:
            raise MeraserError(f"{where}.benign_n must be at least 20 (a quantile of fewer says little), got "
                               f"{self.benign_n}")
        if self.batch_size < 1:
            raise MeraserError(f"{where}.batch_size must be at least 1, got {self.batch_size}")


def prompt_perplexities(helper, helper_tok, texts: list[str], batch_size: int = 16) -> list[float]:
    """exp(mean next-token NLL) of each text under `helper` (a one-token text: 1.0, nothing to predict)."""
    import torch

    from meraser.models import autocast, pad_id, padded

    pad = pad_id(helper_tok)
    dev, out = next(helper.parameters()).device, []
    for i in range(0, len(texts), batch_size):
        enc = [helper_tok(t, add_special_tokens=True)["input_ids"] or [pad] for t in texts[i:i + batch_size]]
        ids, mask = padded(enc, pad, device=dev)
        with torch.no_grad(), autocast(helper):
            logp = torch.log_softmax(helper(input_ids=ids, attention_mask=mask).logits[:, :-1].float(), -1)
        nll = -logp.gather(2, ids[:, 1:, None])[..., 0] * mask[:, 1:]
        counts = mask[:, 1:].sum(1)
        out += [math.exp(float(n) / int(c)) if int(c) else 1.0 for n, c in zip(nll.sum(1), counts)]
    return out


def filter_texts(tokenizer, prompts: list[str], system_prompt: str | None = None) -> list[str]:
    """Each prompt as the filter reads it: rendered by the suspect's chat template, decoded without special tokens."""
    from meraser.generation import encode_prompts

    return [tokenizer.decode(ids, skip_special_tokens=True)
            for ids in encode_prompts(tokenizer, prompts, system_prompt=system_prompt)]


def benign_prompts(cfg: PerplexityFilterConfig) -> list[str]:
    """The distinct benign prompts the calibration scores (`cfg.benign_n` of `cfg.benign`, shuffled with seed 0)."""
    from meraser.data.sources import load_pairs

    prompts = list(dict.fromkeys(p.prompt for p in load_pairs(cfg.benign, shuffle_seed=0)))[:cfg.benign_n]
    if len(prompts) < 20:
        raise MeraserError(f"{cfg.benign}: {len(prompts)} distinct prompts, too few to set a threshold (20 or more)")
    return prompts


def threshold_at(perplexities: list[float], share: float) -> float:
    """The perplexity above which `share` of these lie (the refused ones lie strictly above it)."""
    ppl = sorted(perplexities)
    return ppl[math.ceil((1 - share) * len(ppl)) - 1]


def calibrated_threshold(tokenizer, helper, helper_tok, cfg: PerplexityFilterConfig) -> float:
    """The perplexity above which `cfg.benign_refusal` of the benign prompts lie, each scored as the filter scores a
    prompt, under the helper."""
    texts = filter_texts(tokenizer, benign_prompts(cfg))
    return threshold_at(prompt_perplexities(helper, helper_tok, texts, cfg.batch_size), cfg.benign_refusal)


class PerplexityFiltering(Decoding):
    name = "perplexity-filter"

    def __init__(self, tokenizer, helper, helper_tok, cfg: PerplexityFilterConfig):
        self.tokenizer, self.helper, self.helper_tok, self.cfg = tokenizer, helper, helper_tok, cfg
        self.refusal = tokenizer(cfg.refusal, add_special_tokens=False)["input_ids"]
        self.filtered = self.seen = 0

    def new_tokens(self, model, ids, mask, *, max_new_tokens, pad_id, eos_id):
        texts = [self.tokenizer.decode(ids[r][mask[r].bool()], skip_special_tokens=True) for r in range(len(ids))]
        ppl = prompt_perplexities(self.helper, self.helper_tok, texts, self.cfg.batch_size)
        refuse = [p > self.cfg.threshold for p in ppl]
        self.seen += len(refuse)
        self.filtered += sum(refuse)
        answer = [r for r, no in enumerate(refuse) if not no]
        out = pack([self.refusal if no else [] for no in refuse], max_new_tokens, pad_id, eos_id, ids.device)
        if answer:  # the prompts that pass are answered as usual, over the placeholder rows
            kept = super().new_tokens(model, ids[answer], mask[answer], max_new_tokens=max_new_tokens,
                                      pad_id=pad_id, eos_id=eos_id)
            out[answer] = pad_id
            out[answer, :kept.shape[1]] = kept
        return out


class PerplexityFilter(DecodingAttack):
    name = "perplexity-filter"
    summary = ("Perplexity filtering (Nasery et al. 2025): a helper model scores each prompt; an unnatural one "
               "(perplexity above 100, or above a threshold set on benign prompts) gets a refusal")
    paper = "https://arxiv.org/abs/2509.26598"
    Config = PerplexityFilterConfig

    def check(self, cfg, ctx):
        from meraser.models import check_model_spec

        if cfg.helper:
            check_model_spec(cfg.helper, "perplexity-filter helper")
        if cfg.benign_refusal is not None:
            from meraser.data.sources import check_source

            check_source(cfg.benign, "perplexity-filter benign")

    def decoding(self, model, tokenizer, cfg, ctx):
        from meraser.models import load_model

        spec = cfg.helper or ctx.base
        if spec:
            helper, helper_tok = load_model(spec)
            helper.to(next(model.parameters()).device)
        else:  # no base recorded: the suspect scores its own prompts
            spec, helper, helper_tok = ctx.model_spec, model, tokenizer
        ctx.info["helper"] = spec
        if cfg.benign_refusal is not None:
            cfg = replace(cfg, threshold=calibrated_threshold(tokenizer, helper, helper_tok, cfg))
            ctx.info["threshold"] = round(cfg.threshold, 2)
        return PerplexityFiltering(tokenizer, helper, helper_tok, cfg)
