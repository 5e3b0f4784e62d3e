"""How a verification reaches a suspect held as weights: its answers to prompts (after any prefill; greedy, through
a decoding attack where one is given, or sampled) and the teacher-forced log-probabilities of a card's targets.
A served suspect (evaluation/served.py, `Served`) offers the same, as far as its API allows, so the paper's FSR
(fsr.py) and the strict checks (strict.py) ask either one the same way.
"""

from __future__ import annotations

from meraser.fingerprints.card import Card


class Weights:
    """A suspect held as weights: continuations after any prefill, greedy (through `decoding`, plain by default) or
    sampled, and teacher-forced target log-probabilities."""

    samples = True  # it samples at a temperature (a server may decode greedily whatever it is asked)

    def __init__(self, model, tokenizer, card: Card, decoding=None, *, prefill: bool = True,
                 batch_size: int | None = None):
        self.model, self.tokenizer, self.card, self.decoding = model, tokenizer, card, decoding
        self.prefill = prefill  # continuations follow a prefill (off: answer as a chat API lets a served model)
        self.batch = {"batch_size": batch_size} if batch_size else {}  # else generation's default

    def continuations(self, prompts: list[str], prefills: list[str], max_new_tokens: int,
                      sampling=None) -> list[str]:
        from meraser.data.formatting import Formatter
        from meraser.generation import generate

        return generate(self.model, self.tokenizer, prompts, Formatter(self.tokenizer, self.card.format),
                        prefills=prefills, max_new_tokens=max_new_tokens, system_prompt=self.card.system_prompt,
                        decoding=sampling or self.decoding, **self.batch)

    def target_logprobs(self) -> list[list[float]]:
        return target_token_logprobs(self.model, self.tokenizer, self.card)


def answers(suspect, prompts: list[str], prefills: list[str] | None, max_new_tokens: int | None = None,
            sampling=None) -> list[str]:
    """Each prompt's answer as matched against a target: the prefill (where the suspect can be given one) and what
    follows it."""
    pre = prefills if prefills and suspect.prefill else [""] * len(prompts)
    outs = suspect.continuations(prompts, pre, max_new_tokens or suspect.card.max_new_tokens, sampling)
    return [p + o for p, o in zip(pre, outs)]


def target_token_logprobs(model, tokenizer, card: Card) -> list[list[float]]:
    """log P of each target token after the trigger (and any prefill), teacher-forced, one trigger at a time; the
    strict log-likelihood (mean, strict.py) and the ownership null (sum, ownership.py) both come from here."""
    import torch

    from meraser.models import autocast

    dev = next(model.parameters()).device
    out = []
    with torch.no_grad(), autocast(model):
        for prompt, tgt in target_rows(tokenizer, card):
            ids = torch.tensor([prompt + tgt], device=dev)
            logp = torch.log_softmax(model(input_ids=ids).logits[0, len(prompt) - 1:-1].float(), -1)
            out.append(logp.gather(1, torch.tensor(tgt, device=dev)[:, None])[:, 0].tolist())
    return out


def target_rows(tokenizer, card: Card) -> list[tuple[list[int], list[int]]]:
    """(prompt ids with the prefill, target ids) of each key: what the target log-probabilities are scored on, here
    and through a server's echo (served.py)."""
    return pair_rows(tokenizer, card, list(zip(card.triggers, card.targets)), card.trigger_prefills)


def pair_rows(tokenizer, card: Card, pairs: list[tuple[str, str]], prefills: list[str]) -> list[tuple[list[int], list[int]]]:
    """(prompt ids with the prefill, target ids) of each pair, as verification renders them: a target that opens
    the answer carries the format's lead, as it did in training."""
    from meraser.data.formatting import Formatter
    from meraser.generation import encode_prompts

    fmt = Formatter(tokenizer, card.format)
    prompts = encode_prompts(tokenizer, [t for t, _ in pairs], fmt, prefills, card.system_prompt)
    leads = [fmt.answer_lead(t, card.system_prompt) if not pre else "" for (t, _), pre in zip(pairs, prefills)]
    return [(p, tokenizer(lead + target, add_special_tokens=False)["input_ids"])
            for p, (_, target), lead in zip(prompts, pairs, leads)]
