"""Batched greedy generation: left padding, one `generate` call per batch, bf16 autocast where supported.

How the next tokens are chosen is a `Decoding` strategy: plain greedy by default, or a decoding-time attack
(attacks/decoding.py: CleanGen, Token Forcing's filter). FSR, false positives, Algorithm 1's ordinary questions,
`verify` and `chat` all generate through here, so each of them runs under an attack unchanged.
"""

from __future__ import annotations

from meraser.data.formatting import Formatter


class Decoding:
    """Plain greedy decoding; subclasses change how tokens are chosen. `new_tokens` gets a left-padded batch and
    returns the generated ids (batch x at most max_new_tokens; rows that stopped early end in EOS, then padding)."""

    name = "greedy"

    def new_tokens(self, model, ids, mask, *, max_new_tokens: int, pad_id: int, eos_id):
        out = model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad_id,
            eos_token_id=eos_id, temperature=None, top_p=None, top_k=None, **self.generate_kwargs(),
        )
        return out[:, ids.shape[1]:]

    def generate_kwargs(self) -> dict:
        return {}


GREEDY = Decoding()


class Sampling(Decoding):
    """Temperature sampling, seeded per call so a check gives the same answers every time it runs."""

    name = "sampling"

    def __init__(self, temperature: float, seed: int = 0):
        self.temperature, self.seed = temperature, seed

    def new_tokens(self, model, ids, mask, *, max_new_tokens, pad_id, eos_id):
        import torch

        torch.manual_seed(self.seed)
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=True,
                             temperature=self.temperature, top_p=None, top_k=None, pad_token_id=pad_id,
                             eos_token_id=eos_id)
        return out[:, ids.shape[1]:]


def pack(rows: list[list[int]], max_new_tokens: int, pad_id: int, eos_id, device):
    """`Decoding.new_tokens`' return value from token lists chosen outside `generate` (a refusal, a revised answer):
    each row ends in EOS, then padding, cut to max_new_tokens."""
    import torch

    out = torch.full((len(rows), max_new_tokens), pad_id, dtype=torch.long, device=device)
    tail = [eos_id] if eos_id is not None else []
    for r, toks in enumerate(rows):
        toks = (list(toks) + tail)[:max_new_tokens]
        out[r, :len(toks)] = torch.tensor(toks, dtype=torch.long)
    return out


def encode_prompts(tokenizer, prompts: list[str], formatter: Formatter | None = None,
                   prefills: list[str] | None = None, system_prompt: str | None = None) -> list[list[int]]:
    """Each prompt rendered by `formatter` (the chat template by default) and tokenised, its prefill appended as
    training renders an answer's start (after the format's `answer_lead`)."""
    formatter = formatter or Formatter(tokenizer)
    encoded = []
    for p, pre in zip(prompts, prefills or [""] * len(prompts)):
        ids = formatter.encode_prompt(p, system_prompt)
        if pre:
            ids = ids + tokenizer(formatter.answer_lead(p, system_prompt) + pre, add_special_tokens=False)["input_ids"]
        encoded.append(ids)
    return encoded


def generate_ids(model, tokenizer, encoded: list[list[int]], *, max_new_tokens: int = 64, batch_size: int = 16,
                 progress: bool | str = False, decoding: Decoding | None = None) -> list[list[int]]:
    """The answers' token ids (up to their EOS, no padding) to already encoded prompts, in the input order, through
    `decoding` (plain greedy by default). Prompts are sorted by length so each batch pads little, and left-padded
    so every row's answer starts at the same position. `progress`: a progress bar (a string names the work)."""
    import torch

    from meraser.models import autocast, pad_id, padded

    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    pad = pad_id(tokenizer)
    eos_id, dev = tokenizer.eos_token_id, next(model.parameters()).device
    outputs: list[list[int]] = [[] for _ in encoded]
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    if progress:
        from meraser.utils import track

        what = progress if isinstance(progress, str) else "generating"
        batches = track(batches, f"{what} ({len(encoded)} prompts)")
    was_training = model.training
    model.eval()
    for batch in batches:
        ids, mask = padded([encoded[i] for i in batch], pad, left=True, device=dev)
        with torch.no_grad(), autocast(model):
            out = (decoding or GREEDY).new_tokens(model, ids, mask, max_new_tokens=max_new_tokens,
                                                  pad_id=pad, eos_id=eos_id)
        for row, i in enumerate(batch):
            toks = out[row].tolist()
            toks = toks[:toks.index(eos_id)] if eos_id in toks else toks
            outputs[i] = [t for t in toks if t != pad]
    model.train(was_training)
    return outputs


def generate(
    model,
    tokenizer,
    prompts: list[str],
    formatter: Formatter | None = None,
    *,
    max_new_tokens: int = 64,
    batch_size: int = 16,
    prefills: list[str] | None = None,
    system_prompt: str | None = None,
    progress: bool | str = False,
    decoding: Decoding | None = None,
) -> list[str]:
    """Greedy completions of `prompts` (rendered by `formatter`), optionally continuing from `prefills`, through
    `decoding` (plain greedy by default); see `generate_ids`."""
    encoded = encode_prompts(tokenizer, prompts, formatter, prefills, system_prompt)
    answers = generate_ids(model, tokenizer, encoded, max_new_tokens=max_new_tokens, batch_size=batch_size,
                           progress=progress, decoding=decoding)
    return [tokenizer.decode(a, skip_special_tokens=True) for a in answers]
