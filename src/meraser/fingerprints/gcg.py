"""Greedy Coordinate Gradient search (Zou et al. 2023, "Universal and Transferable Adversarial Attacks on Aligned
Language Models", https://arxiv.org/abs/2307.15043), the search the non-invasive fingerprints use to find their
queries (ProFLingo, RoFL): tokens of a prompt span are swapped, one position at a time, for tokens the gradient of
the target's loss with respect to the one-hot input ranks best, keeping the candidate that lowers the loss most.

One routine serves every scheme: a `Task` is one rendering of the prompt (a model, a chat template, a system
prompt) as `before + span + after`, with the target after it; a step sums the L2-normalised gradients and the losses
of all tasks (RoFL's multi-task objective, over system prompts and models). As in the toolkit's version
(sentient-agi/mlprints): one swap per candidate, position and rank drawn at random, a swap kept only if it lowers
the loss, and a candidate kept only if its text tokenises back to the same ids inside the rendered prompt (so the
query a card stores is the query that was optimised). The target's log-probabilities come from an fp32 head over
the target positions only (bf16 log-probabilities move in steps of 1/8 on SmolLM2, which would tie candidates).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable

from meraser.config import Config, field
from meraser.utils import MeraserError, Steps


@dataclass
class GCGConfig(Config):
    steps: int = field(64, help="search steps at most")
    top_k: int = field(128, help="tokens per position the gradient proposes")
    candidates: int = field(64, help="single-swap candidates scored per step")
    batch_size: int = field(32, help="candidates per forward pass")
    check_every: int = field(4, help="test the greedy answers every this many steps (and stop on success)")
    max_seconds: float = field(0.0, help="stop after this long (0: no limit)")
    seed: int = field(0, help="seed of the candidate draws")

    def validate(self, where: str) -> None:
        if min(self.steps, self.top_k, self.candidates, self.batch_size, self.check_every) < 1:
            raise MeraserError(f"{where}: steps, top_k, candidates, batch_size and check_every must be at least 1")


@dataclass
class Task:
    """One rendering of the prompt: the model reads before + span + after, and should continue with target."""
    model: object
    before: list[int]
    after: list[int]
    target: list[int]


def _target_loss(task: Task, spans, grad: bool = False):
    """Mean NLL of the target per row of `spans` (a [B, n] id tensor, or [1, n, V] one-hot when `grad`)."""
    import torch

    from meraser.models import autocast

    model = task.model
    emb = model.get_input_embeddings()
    dev = emb.weight.device
    rows = spans.shape[0]
    before = emb(torch.tensor([task.before], device=dev)).expand(rows, -1, -1)
    tail = emb(torch.tensor([task.after + task.target], device=dev)).expand(rows, -1, -1)
    middle = spans @ emb.weight if grad else emb(spans)
    x = torch.cat([before, middle, tail], 1)
    n = len(task.target)
    with autocast(model):
        hidden = model.get_decoder()(inputs_embeds=x).last_hidden_state[:, -n - 1:-1]
    logits = hidden.float() @ model.get_output_embeddings().weight.float().T
    target = torch.tensor(task.target, device=dev).expand(rows, -1)
    return torch.nn.functional.cross_entropy(logits.transpose(1, 2), target, reduction="none").mean(1)


def _gradient(tasks: list[Task], span: list[int]):
    """The summed, per-task L2-normalised gradient of the loss with respect to the span's one-hot tokens [n, V]."""
    import torch

    total = None
    for task in tasks:
        weight = task.model.get_input_embeddings().weight
        onehot = torch.zeros(1, len(span), weight.shape[0], device=weight.device, dtype=weight.dtype)
        onehot[0, torch.arange(len(span)), torch.tensor(span)] = 1.0
        onehot.requires_grad_(True)
        _target_loss(task, onehot, grad=True).sum().backward()
        g = onehot.grad[0].float()
        g = g / g.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        total = g if total is None else total + g
    return total


def losses(tasks: list[Task], spans: list[list[int]], batch_size: int) -> list[float]:
    import torch

    out = [0.0] * len(spans)
    with torch.no_grad():
        for task in tasks:
            dev = task.model.get_input_embeddings().weight.device
            for i in range(0, len(spans), batch_size):
                chunk = torch.tensor(spans[i:i + batch_size], device=dev)
                for j, v in enumerate(_target_loss(task, chunk).tolist()):
                    out[i + j] += v
    return out


def gcg(tasks: list[Task], span: list[int], allowed, cfg: GCGConfig, stable: Callable[[list[int]], bool],
        success: Callable[[list[int]], bool], progress: bool = False) -> dict:
    """Search `span` (ids) over the `allowed` tokens (a boolean tensor over the vocabulary) to lower the summed
    target loss of `tasks`; `stable(span)` filters candidates (the text tokenises back to them), `success(span)` is
    tested every `check_every` steps and ends the search. Returns {span, loss, steps, seconds, success, history}."""
    import torch

    t0, gen = time.perf_counter(), torch.Generator().manual_seed(cfg.seed)
    best, loss = list(span), losses(tasks, [span], cfg.batch_size)[0]
    history, done, step = [round(loss, 4)], success(best), 0
    bar = Steps("GCG", cfg.steps, progress)
    while not done and step < cfg.steps and not (cfg.max_seconds and time.perf_counter() - t0 > cfg.max_seconds):
        step += 1
        grad = _gradient(tasks, best)
        grad[:, ~allowed.to(grad.device)] = math.inf
        grad[torch.arange(len(best)), torch.tensor(best)] = math.inf
        # the current token is excluded too, so a row has one allowed token fewer than `allowed` holds: asking
        # topk for more would hand out excluded (infinite) entries, i.e. tokens outside `allowed`
        top = (-grad).topk(max(1, min(cfg.top_k, int(allowed.sum()) - 1)), dim=1).indices.cpu()
        ok = allowed.cpu()
        pos = torch.randint(len(best), (cfg.candidates,), generator=gen)
        rank = torch.randint(top.shape[1], (cfg.candidates,), generator=gen)
        swaps = [(p, int(top[p, r])) for p, r in zip(pos.tolist(), rank.tolist()) if ok[top[p, r]]]
        cands = [c for c in dict.fromkeys(tuple(best[:p] + [t] + best[p + 1:]) for p, t in swaps) if stable(list(c))]
        if cands:
            scores = losses(tasks, [list(c) for c in cands], cfg.batch_size)
            i = min(range(len(cands)), key=scores.__getitem__)
            if scores[i] < loss:
                best, loss = list(cands[i]), scores[i]
        history.append(round(loss, 4))
        if step % cfg.check_every == 0 or step == cfg.steps:
            done = success(best)
        bar.advance(f"loss {loss:.3f}")
    res = {"span": best, "loss": round(loss, 4), "steps": step, "seconds": round(time.perf_counter() - t0, 1),
           "success": bool(done), "history": history}
    bar.close(f"{'reached' if done else 'not reached'} after {step} steps, loss {loss:.3f}")
    return res


def rendered(tokenizer, fmt, user_text: Callable[[str], str], system_prompt: str | None = None):
    """(before, after) ids around the span in the prompt the formatter renders, the span standing where
    `user_text(SPAN)` puts it in the user's message."""
    mark = "\x00SPAN\x00"
    text = fmt.prompt_text(user_text(mark), system_prompt)
    head, tail = text.split(mark)
    add = fmt.cfg.template != "chat"
    return tokenizer(head, add_special_tokens=add)["input_ids"], tokenizer(tail, add_special_tokens=False)["input_ids"]
