"""Perplexity over a text corpus or over the responses of an instruction set.

Corpus perplexity uses **non-overlapping windows** by default: documents are tokenized, joined with the EOS token
into one stream, and cut into windows of `window` tokens; every token after the first of a window is scored once.
This matches how the paper's reference code scores fixed-length chunks and is the cheapest honest choice. With
`stride < window` the windows overlap (sliding-window perplexity, as in the transformers docs): each window scores
only its last `stride` tokens, with the rest as context, which lowers perplexity at higher cost.
Models that expect BOS on every sequence (Llama-2, Gemma: tokenizers whose encoding starts with BOS) get BOS as the
first token of every window.
Perplexity = exp(sum of token NLLs / number of scored tokens).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from meraser.utils import MeraserError, read_json, read_jsonl, read_text

DEFAULT_TEXT_FIELD = "data.paragraphs.context"  # SQuAD layout; any dotted path through objects and lists works


@dataclass
class Window:
    ids: list[int]
    labels: list[int]  # -100 where not scored


def _walk(node, parts: list[str]):
    if not parts:
        yield node
        return
    if isinstance(node, list):
        for item in node:
            yield from _walk(item, parts)
    elif isinstance(node, dict) and parts[0] in node:
        yield from _walk(node[parts[0]], parts[1:])


def load_texts(source: str, text_field: str | None = None, limit: int | None = None) -> list[str]:
    """Documents from a .txt file (blank-line separated), a JSON/JSONL file (`text_field` is a dotted path, e.g.
    `text` or `data.paragraphs.context`), or `hf:NAME[:CONFIG]` (field `text`; needs network or a cache)."""
    path = Path(source)
    if source.startswith("hf:"):
        name, _, conf = source[3:].partition(":")
        try:
            import datasets

            ds = datasets.load_dataset(name, conf or None, split="test")
        except Exception as e:
            raise MeraserError(f"cannot load Hugging Face dataset '{name}' ({type(e).__name__}); it needs network "
                               f"access or a local cache; offline, give a local text/JSON file") from None
        texts = [t for t in ds[text_field or "text"] if t.strip()]
    elif not path.exists():
        raise MeraserError(f"text source {source} does not exist (a .txt/.json/.jsonl file or hf:NAME)")
    elif path.suffix in (".json", ".jsonl"):
        parts = (text_field or ("text" if path.suffix == ".jsonl" else DEFAULT_TEXT_FIELD)).split(".")
        records = read_jsonl(path, "text source") if path.suffix == ".jsonl" else read_json(path, "text source")
        texts = [t for t in _walk(records, parts) if isinstance(t, str) and t.strip()]
        if not texts:
            raise MeraserError(f"{path}: no text found at field path '{'.'.join(parts)}'; pass --text-field")
    else:
        texts = [t.strip() for t in read_text(path, "text source").split("\n\n") if t.strip()]
    return texts[:limit] if limit else texts


def needs_bos(tokenizer) -> bool:
    ids = tokenizer("a")["input_ids"]
    return tokenizer.bos_token_id is not None and bool(ids) and ids[0] == tokenizer.bos_token_id


def text_windows(texts: list[str], tokenizer, window: int = 512, stride: int | None = None,
                 max_windows: int | None = None) -> list[Window]:
    stride = stride or window
    if not 0 < stride <= window:
        raise MeraserError("stride must be in (0, window]")
    bos = [tokenizer.bos_token_id] if needs_bos(tokenizer) else []
    sep = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    stream: list[int] = []
    for t in texts:
        stream += tokenizer(t, add_special_tokens=False)["input_ids"] + sep
    width = window - len(bos)
    step = min(stride, width)  # tokens newly scored per window; the rest of a window is context
    windows = []
    for start in range(0, len(stream), step):
        end = min(start + step, len(stream))
        begin = max(0, end - width)
        chunk = stream[begin:end]
        # a token is scored once, in the window where it is new; without BOS a window's first token has no context
        first = max(start - begin, 0 if bos else 1)
        if len(chunk) <= first:
            continue
        labels = [-100] * len(bos) + [t if i >= first else -100 for i, t in enumerate(chunk)]
        windows.append(Window(bos + chunk, labels))
        if max_windows and len(windows) >= max_windows:
            break
    return windows


def response_windows(pairs, formatter) -> list[Window]:
    """Instruction responses with the prompt masked (how the paper measures perplexity on Guanaco)."""
    rows = formatter.encode_all(pairs)
    return [Window(r["input_ids"], r["labels"]) for r in rows]


def perplexity(model, tokenizer, windows: list[Window], batch_size: int = 8, progress: bool = False) -> dict:
    """exp(total NLL / scored tokens) over `windows`, batched (length-sorted), under bf16 autocast if supported."""
    import torch

    from meraser.data.formatting import collate
    from meraser.models import autocast, pad_id

    if not windows:
        raise MeraserError("no text to score")
    pad = pad_id(tokenizer)
    order = sorted(range(len(windows)), key=lambda i: len(windows[i].ids))
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    if progress:
        from meraser.utils import track

        batches = track(batches, "perplexity")
    dev = next(model.parameters()).device
    total, count = 0.0, 0
    was_training = model.training
    model.eval()
    for idx in batches:
        b = collate([{"input_ids": windows[i].ids, "labels": windows[i].labels} for i in idx], pad, pad_to_multiple_of=1)
        with torch.no_grad(), autocast(model):
            nll, n = _nll_sum(model, b["input_ids"].to(dev), b["attention_mask"].to(dev), b["labels"].to(dev))
        total += nll
        count += n
    model.train(was_training)
    return {"ppl": math.exp(total / count), "nll": total / count, "tokens": count, "windows": len(windows)}


def _nll_sum(model, ids, mask, labels) -> tuple[float, int]:
    """(summed next-token NLL over labelled positions, their number). A plain causal LM takes the chunked head of
    lm_loss.py: the same sum without a batch x length x vocabulary logits tensor, which for Gemma 3's 262k
    vocabulary is 2 GB in bf16 per batch of 8 windows of 512 tokens, and three times that upcast and soft-maxed."""
    from meraser.lm_loss import causal_lm_loss_sum, is_plain_causal_lm, logits_loss_sum

    if is_plain_causal_lm(model):
        total, count = causal_lm_loss_sum(model, ids, mask, labels)
    else:
        total, count = logits_loss_sum(model(input_ids=ids, attention_mask=mask).logits, labels)
    return total.item(), int(count)


def instruction_perplexity(model, tokenizer, source: str, *, n: int = 200, seed: int = 12345, batch_size: int = 8,
                           progress: bool = False) -> dict:
    """Perplexity of the responses (prompt masked, chat template) of `n` pairs drawn from an instruction source."""
    from meraser.data import Formatter, load_pairs

    pairs = load_pairs(source, shuffle_seed=seed, limit=n)
    res = perplexity(model, tokenizer, response_windows(pairs, Formatter(tokenizer)), batch_size, progress)
    return {**res, "source": f"responses:{source}"}


def corpus_perplexity(model, tokenizer, source: str, *, text_field: str | None = None, window: int = 512,
                      stride: int | None = None, max_windows: int | None = 200, batch_size: int = 8,
                      progress: bool = False) -> dict:
    """Perplexity of a model on a text source (see `load_texts`); `responses:SOURCE` scores the responses of an
    instruction source instead (e.g. `responses:chitchat` offline)."""
    if source.startswith("responses:"):
        return instruction_perplexity(model, tokenizer, source.split(":", 1)[1], n=max_windows or 200,
                                      batch_size=batch_size, progress=progress)
    texts = load_texts(source, text_field)
    res = perplexity(model, tokenizer, text_windows(texts, tokenizer, window, stride, max_windows), batch_size, progress)
    return {**res, "source": source, "window": window, "stride": stride or window}
