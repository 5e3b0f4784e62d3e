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
    `decoding` (plain greedy by default).

    Prompts are sorted by length so each batch pads little; results come back in the input order. `progress`: a
    progress bar (a string names what is being generated).
    """
    import torch

    from meraser.models import autocast

    formatter = formatter or Formatter(tokenizer)
    prefills = prefills or [""] * len(prompts)
    encoded = []
    for p, pre in zip(prompts, prefills):
        ids = formatter.encode_prompt(p, system_prompt)
        if pre:
            ids = ids + tokenizer(pre, add_special_tokens=False)["input_ids"]
        encoded.append(ids)
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    dev = next(model.parameters()).device
    outputs: list[str] = [""] * len(prompts)
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    if progress:
        from rich.progress import track

        what = progress if isinstance(progress, str) else "generating"
        batches = track(batches, description=f"{what} ({len(prompts)} prompts)", transient=True)
    was_training = model.training
    model.eval()
    for batch in batches:
        longest = max(len(encoded[i]) for i in batch)
        ids = torch.full((len(batch), longest), pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, i in enumerate(batch):  # left padding: every row's answer starts at the same position
            ids[row, longest - len(encoded[i]) :] = torch.tensor(encoded[i])
            mask[row, longest - len(encoded[i]) :] = 1
        with torch.no_grad(), autocast(model):
            out = (decoding or GREEDY).new_tokens(model, ids.to(dev), mask.to(dev), max_new_tokens=max_new_tokens,
                                                  pad_id=pad_id, eos_id=tokenizer.eos_token_id)
        for row, i in enumerate(batch):
            outputs[i] = tokenizer.decode(out[row], skip_special_tokens=True)
    model.train(was_training)
    return outputs
