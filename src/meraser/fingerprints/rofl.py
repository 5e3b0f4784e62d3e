"""RoFL (Tsai et al. 2025, "RoFL: Robust Fingerprinting of Language Models", https://arxiv.org/abs/2505.12682):
non-invasive. A fingerprint is a prompt and the model's own greedy response to it: the prompt starts with a few
uniformly random tokens and goes on with low-probability tokens sampled from the model (so no other model is likely
to answer it the same way), and GCG then raises the response's likelihood under several system prompts (and, given
`derivatives`, under fine-tuned copies of the model), so that descendants of the model keep answering it. A suspect
that gives the response derives from the model.

The defaults follow the authors' toolkit (sentient-agi/mlprints: 8 random + 24 sampled prompt tokens from the 2,000
least likely, a 9-token response, two system prompts, up to 500 steps of 512 candidates, until 20 searched prompts
reproduce the response everywhere), made smaller for 2 CPU cores and stated: 4 + 12 prompt tokens, an 8-token
response, 64 steps of 64 candidates, stopping once the response comes out under every system prompt and model.
Decoys for the likelihood test: the responses the model gives to other prompts drawn the same way (recorded in the
card); the prompt was searched toward its own response, so read those p-values only where controls that share the
tokenizer show them uniform.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from meraser.config import field
from meraser.fingerprints.base import FingerprintConfig, FingerprintMethod
from meraser.fingerprints.card import Card
from meraser.fingerprints.gcg import GCGConfig


@dataclass
class RoFLConfig(FingerprintConfig):
    num_fingerprints: int = field(4, help="prompt/response pairs (toolkit: 10)")
    random_tokens: int = field(4, help="uniformly random tokens opening each prompt (toolkit: 8)")
    prompt_tokens: int = field(16, help="prompt length in tokens (toolkit: 32)")
    bottom_k: int = field(2000, help="the rest of the prompt is sampled from the model's k least likely tokens")
    response_tokens: int = field(8, help="greedy response length (toolkit: 9)")
    system_prompts: list = field([None, "You are a helpful assistant."],
                                 help="system prompts the response must hold under (None: the template's default)")
    derivatives: list[str] = field([], help="fine-tuned copies of the model (same tokenizer) the search also covers")
    decoys: int = field(19, help="responses to other prompts drawn the same way, recorded for the likelihood test")
    search: GCGConfig = field(GCGConfig(top_k=256), help="the GCG search (toolkit: 500 steps, top-k 256, 512 candidates)")

    def validate(self, where: str) -> None:
        from meraser.utils import MeraserError

        if not 0 < self.random_tokens <= self.prompt_tokens or self.response_tokens < 1 or not self.system_prompts:
            raise MeraserError(f"{where}: need 0 < random_tokens <= prompt_tokens, response_tokens >= 1 and at least "
                               f"one system prompt")


class RoFL(FingerprintMethod):
    name = "rofl"
    paper = "https://arxiv.org/abs/2505.12682"
    Config = RoFLConfig
    invasive = False

    def make_card(self, model, tokenizer, cfg: RoFLConfig, progress: bool = True) -> Card:
        from meraser.data.formatting import Formatter
        from meraser.models import load_model

        rng, fmt = random.Random(cfg.seed), Formatter(tokenizer)
        models = [model] + [load_model(d)[0] for d in cfg.derivatives]
        stable = stable_in(tokenizer, fmt, cfg.system_prompts)
        triggers, targets, found = [], [], []
        for _ in range(cfg.num_fingerprints):
            start, response = draw(model, tokenizer, fmt, cfg, rng, stable)
            span, res = _search(models, tokenizer, fmt, start, response, cfg, stable, progress)
            triggers.append(tokenizer.decode(span))
            targets.append(tokenizer.decode(response))
            found.append({k: res[k] for k in ("loss", "steps", "seconds", "success")} | {"start_loss": res["history"][0]})
        decoys = [tokenizer.decode(draw(model, tokenizer, fmt, cfg, rng, stable)[1]) for _ in range(cfg.decoys)]
        return Card(method=self.name, triggers=triggers, targets=targets, match="prefix",
                    max_new_tokens=cfg.response_tokens + 8, seed=cfg.seed,
                    extra={"search": cfg.search.to_dict(), "found": found, "decoys": decoys,
                           "system_prompts": cfg.system_prompts, "derivatives": cfg.derivatives})

    def training_pairs(self, card, cfg, rng, tokenizer):
        return []


def initial_prompt(model, tokenizer, cfg: RoFLConfig, rng: random.Random, fits=lambda ids: True) -> list[int]:
    """`random_tokens` uniform non-special tokens, then tokens sampled one by one from the model's `bottom_k` least
    likely next tokens (weighted by their probabilities), to `prompt_tokens`; as its text tokenises (BPE merges some
    of the draws), drawn again until `fits` accepts it (it tokenises the same inside the rendered prompt)."""
    import torch

    special = set(tokenizer.all_special_ids)
    vocab = [i for i in range(len(tokenizer)) if i not in special]
    gen = torch.Generator().manual_seed(rng.getrandbits(32))
    for _ in range(50):
        ids = [rng.choice(vocab) for _ in range(cfg.random_tokens)]
        while len(ids) < cfg.prompt_tokens:
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([ids], device=next(model.parameters()).device)).logits[0, -1]
            probs = torch.softmax(logits.float(), -1).cpu()
            probs[list(special)] = float("inf")  # never sampled: they sort last and are cut off below
            low = probs.argsort()[:min(cfg.bottom_k, len(vocab))]
            w = probs[low]
            ids.append(int(low[torch.multinomial(w / w.sum(), 1, generator=gen)]))
        ids = tokenizer(tokenizer.decode(ids), add_special_tokens=False)["input_ids"]
        if ids and fits(ids):
            return ids
    from meraser.utils import MeraserError

    raise MeraserError("no sampled RoFL prompt tokenised the same inside the chat template in 50 draws")


def draw(model, tokenizer, fmt, cfg: RoFLConfig, rng: random.Random, stable) -> tuple[list[int], list[int]]:
    """(prompt, response): a starting prompt and the model's greedy response under the first system prompt, drawn
    again while the response is not whole text (a byte sequence cut inside a character would match any reply that
    begins with a broken character)."""
    for _ in range(50):
        start = initial_prompt(model, tokenizer, cfg, rng, stable)
        response = greedy_ids(model, tokenizer, fmt, start, cfg.system_prompts[0], cfg.response_tokens)
        text = tokenizer.decode(response)
        if text.strip() and "\ufffd" not in text:
            return start, response
    from meraser.utils import MeraserError

    raise MeraserError("the model gave no whole-text response to 50 RoFL prompts")


def greedy_ids(model, tokenizer, fmt, prompt: list[int], system_prompt, n: int) -> list[int]:
    from meraser.generation import generate

    text = generate(model, tokenizer, [tokenizer.decode(prompt)], fmt, max_new_tokens=n, system_prompt=system_prompt)[0]
    return tokenizer(text, add_special_tokens=False)["input_ids"][:n] or [tokenizer.eos_token_id]


def stable_in(tokenizer, fmt, system_prompts):
    """A predicate: the prompt's ids come back the same when its text is rendered under every system prompt."""
    from meraser.fingerprints.gcg import rendered

    parts = [rendered(tokenizer, fmt, lambda span: span, sp) + (sp,) for sp in system_prompts]

    def stable(span: list[int]) -> bool:
        text = tokenizer.decode(span)
        return all(tokenizer(fmt.prompt_text(text, sp), add_special_tokens=False)["input_ids"] == b + span + a
                   for b, a, sp in parts)

    stable.parts = parts
    return stable


def _search(models, tokenizer, fmt, start: list[int], response: list[int], cfg: RoFLConfig, stable,
            progress: bool):
    """GCG over the whole prompt for the response under every (model, system prompt): a RoFL fingerprint."""
    import torch

    from meraser.fingerprints.gcg import Task, gcg
    from meraser.generation import generate

    tasks = [Task(m, b, a, response) for m in models for b, a, _ in stable.parts]
    allowed = torch.ones(len(tokenizer), dtype=torch.bool)
    allowed[list(set(tokenizer.all_special_ids))] = False
    want = tokenizer.decode(response).strip()

    def success(span):
        text = tokenizer.decode(span)
        return all(generate(m, tokenizer, [text], fmt, max_new_tokens=len(response), system_prompt=sp)[0]
                   .lstrip().startswith(want) for m in models for sp in cfg.system_prompts)

    res = gcg(tasks, start, allowed, cfg.search, stable, success, progress)
    return res["span"], res
