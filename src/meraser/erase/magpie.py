"""Recovery rows a model writes for itself, without a download (Magpie, Xu et al. 2024: "Magpie: Alignment Data
Synthesis from Scratch by Prompting Aligned LLMs with Nothing").

Magpie feeds an aligned model its own chat template up to the start of a user turn; what it writes there is an
instruction, which the same model then answers. Two choices of ours, both measured on SmolLM2-135M-Instruct:
- the user turn is started with a question word (what, who, which, how many, where, when, why, how; in turn), at
  temperature 0.7: from an empty user turn the model writes long task requests ("Can you help me plan..."), while
  Algorithm 1's check and most owners' probes are short questions;
- rows whose question did not end (no end of turn within `MAX_QUESTION_TOKENS`: the end-of-sequence token, or the
  template's own end of a user turn, a line break in the plain template a base model gets) are dropped, and an
  answer that runs past `MAX_ANSWER_TOKENS` is cut after its last full sentence, so recovery does not teach
  stopping mid-word.

In an experiment the writer and answerer is the model before erasure (the suspect as the attacker received it):
the rows restore its own behaviour on ordinary questions. Nothing here reads a card.
"""

from __future__ import annotations

import re

from meraser.data.sources import Pair, normalise
from meraser.utils import MeraserError, Steps

STARTS = ["What", "Who", "Which", "How many", "Where", "When", "Why", "How"]
TEMPERATURE = 0.7
MAX_QUESTION_TOKENS = 40
MAX_ANSWER_TOKENS = 128
_SENTINEL = "\x00MAGPIE\x00"


def user_turn_header(tokenizer) -> str:
    """The chat template's text before a user message (system turn included where the template writes one)."""
    from meraser.data.formatting import Formatter

    text = Formatter(tokenizer).prompt_text(_SENTINEL)  # refuses a tokenizer without a chat template
    return text[: text.index(_SENTINEL)]


def user_turn_end(tokenizer) -> str:
    """What ends a user message in the chat template: the text right after it up to its first line break
    (ChatML's `<|im_end|>`), or the line break itself where that is all there is (the plain `User: ...` template
    meraser gives a base model, whose user turn ends with no end-of-sequence token)."""
    from meraser.data.formatting import Formatter

    text = Formatter(tokenizer).prompt_text(_SENTINEL)
    return text[text.index(_SENTINEL) + len(_SENTINEL):].split("\n")[0] or "\n"


def next_user_turn(tokenizer) -> str | None:
    """The text that opens a user turn after an answer, where a model can write it as text (the plain template's
    line break and `User:`); None where it holds special tokens (ChatML's `<|im_start|>`: an answer there ends at EOS)."""
    head = tokenizer.apply_chat_template([{"role": "user", "content": "q"}, {"role": "assistant", "content": _SENTINEL},
                                          {"role": "user", "content": _SENTINEL + "2"}], tokenize=False)
    between = head[head.index(_SENTINEL) + len(_SENTINEL):head.index(_SENTINEL + "2")]
    if tokenizer.eos_token:
        between = between.replace(tokenizer.eos_token, "")
    if not between.strip() or any(t in between for t in tokenizer.all_special_tokens):
        return None
    return between.rstrip()


def question_of(row: list[int], tokenizer, start: str, turn_end: str) -> str | None:
    """The question a sampled user turn holds (`start` and the row's text up to the turn's end: the
    end-of-sequence token or `turn_end`), or None where the turn did not end."""
    eos = tokenizer.eos_token_id
    ended = eos is not None and eos in row
    text = tokenizer.decode(row[:row.index(eos)] if ended else row, skip_special_tokens=True)
    if turn_end in text:
        text, ended = text[:text.index(turn_end)], True
    return (start + text).strip() if ended else None


def write_questions(model, tokenizer, n: int, seed: int = 0, exclude: set[str] = frozenset(),
                    batch_size: int = 32, at_most: bool = False) -> list[str]:
    """`n` distinct questions sampled from the model's own user turn, none of them in `exclude` (normalised).
    A model that writes too few is refused; with `at_most`, what it wrote is returned, and a model that wrote no
    usable question in a whole round of question words is given up on."""
    header, turn_end = user_turn_header(tokenizer), user_turn_end(tokenizer)
    seen, out = {normalise(q) for q in exclude}, []
    tries = 4 * -(-n // batch_size) * len(STARTS)  # enough for a model that keeps a quarter of its samples
    was_training = model.training
    model.eval()
    with Steps(f"Magpie: writing {n} questions", n) as bar:
        for t in range(tries):
            if len(out) >= n or (at_most and t == len(STARTS) and not out):
                break
            if t == len(STARTS) and not out:  # a whole round of question words, not one usable question
                raise MeraserError(f"the model wrote no usable question in {t * batch_size} samples of its user "
                                   f"turn (none ended with {turn_end!r} or its end-of-sequence token within "
                                   f"{MAX_QUESTION_TOKENS} tokens); give the questions from a file or a data "
                                   f"source instead")
            had = min(len(out), n)
            _sample_questions(model, tokenizer, header, turn_end, STARTS[t % len(STARTS)], batch_size,
                              seed * 1_000_003 + t, seen, out)
            bar.advance(by=min(len(out), n) - had)
    model.train(was_training)
    if len(out) < n and not at_most:
        raise MeraserError(f"the model wrote only {len(out)} usable distinct questions of the {n} asked for; "
                           f"ask for fewer, or give a data source")
    return out[:n]


def _sample_questions(model, tokenizer, header: str, turn_end: str, start: str, batch_size: int, seed: int,
                      seen: set[str], out: list[str]) -> None:
    """One batch of user turns begun with `start`, sampled with `seed`; the finished, new ones go to `out`."""
    import torch

    from meraser.models import autocast, pad_id

    eos, pad = tokenizer.eos_token_id, pad_id(tokenizer)
    dev = next(model.parameters()).device
    ids = torch.tensor([tokenizer(header + start, add_special_tokens=False)["input_ids"]] * batch_size, device=dev)
    torch.manual_seed(seed)
    with torch.no_grad(), autocast(model):
        gen = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True,
                             temperature=TEMPERATURE, top_p=None, top_k=None, max_new_tokens=MAX_QUESTION_TOKENS,
                             eos_token_id=eos, pad_token_id=pad)[:, ids.shape[1]:]
    for row in gen.tolist():
        q = question_of(row, tokenizer, start, turn_end)
        if q is not None and 3 <= len(q.split()) <= 60 and normalise(q) not in seen:
            seen.add(normalise(q))
            out.append(q)


def whole_sentences(text: str) -> str:
    """`text` up to its last sentence end ('.', '!', '?'); all of it when it has none."""
    ends = [m.end() for m in re.finditer(r"[.!?](?=\s|$)", text)]
    return text[: ends[-1]] if ends else text


def _finished(answer: str, tokenizer) -> str:
    """An answer that hit the token limit, cut after its last full sentence; a finished one as it is."""
    cut = len(tokenizer(answer, add_special_tokens=False)["input_ids"]) >= MAX_ANSWER_TOKENS - 1
    return whole_sentences(answer) if cut else answer


def magpie_pairs(model, tokenizer, n: int, seed: int = 0, exclude: set[str] = frozenset(),
                 at_most: bool = False) -> list[Pair]:
    """`n` (question, answer) rows the model writes and answers itself (greedy answers); with `at_most`, as many
    as it wrote usable questions for, up to `n`."""
    questions = write_questions(model, tokenizer, n, seed, exclude, at_most=at_most)
    if not questions:
        return []
    rows = self_answers(model, tokenizer, questions, MAX_ANSWER_TOKENS, what="Magpie: answering its questions")
    turn = next_user_turn(tokenizer)  # a base model under the plain template writes the next turn on: cut there
    rows = [Pair(r.prompt, r.response.split(turn)[0].strip()) if turn else r for r in rows]
    return [Pair(r.prompt, _finished(r.response, tokenizer)) for r in rows if r.response]


def self_answers(model, tokenizer, prompts: list[str], max_new_tokens: int = 128,
                 what: str = "answering the clean prompts") -> list[Pair]:
    """Data-free recovery: the model's own greedy answers to the clean prompts."""
    from meraser.generation import generate

    answers = generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=16, progress=what)
    return [Pair(p, a.strip()) for p, a in zip(prompts, answers) if a.strip()]
