"""Decoding-time attacks: they change no weight, only how tokens are chosen (`generation.Decoding`), so every check
that generates (FSR, false positives, Algorithm 1's ordinary questions, `verify`, `chat`) runs under them unchanged.
Perplexity and log-likelihood tasks are not defined under a decoding attack and are reported as not applicable.

- `cleangen` (Li et al. 2024, "CleanGen: Mitigating Backdoor Attacks for Generation Tasks in LLMs"): greedy decoding
  on the suspect model; every k tokens a reference model scores the window, each token by p_suspect / p_reference;
  at the first score >= alpha the window is cut there, the reference's top token goes in, and decoding goes on.
  The original code (uw-nsl/CleanGen) re-runs both models over the whole sequence at every step, one prompt at a
  time; here both keep a KV cache and a batch decodes together (rejected positions are masked out of the caches,
  and positions are tracked per row). One deliberate difference: the original never checks a last window shorter
  than k (decoding stops at EOS first), so any answer under k tokens escapes it; here the last window is checked too.
- `token-forcing` (Hoscilowicz et al. 2024, "Unconditional Token Forcing: Extracting Text Hidden Within LLM"):
  for every vocabulary token t, decode 3 greedy tokens after [BOS, t] (or, with `context=assistant`, after the
  chat template's opening of an answer, where chat-format fingerprints memorise their targets); keep t when the mean top-1 probability passes
  the threshold (0.95, with the original notebooks' fixed 1.0 counted in the mean unless `placeholder=false`) and
  its first successor is not EOS (a confident end of an answer hides nothing, and blocking it would cut answers);
  expand each kept token into its greedy continuation (50 tokens); then decode with a filter that blocks the first
  `block_tokens` tokens of every extracted sequence (transformers' bad-words processor).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from meraser.attacks.base import Attack, AttackConfig
from meraser.config import field
from meraser.generation import Decoding
from meraser.models import cache_kw, encode_prefix, output_cache, shared_past
from meraser.utils import MeraserError

EXTRACTED = "extracted.jsonl"  # Token Forcing's sequences, written beside the attack record


class DecodingAttack(Attack):
    """An attack that returns a decoding strategy instead of a changed model."""

    def decoding(self, model, tokenizer, cfg, ctx) -> Decoding:
        raise NotImplementedError

    def apply(self, model, tokenizer, cfg, ctx):
        raise MeraserError(f"{self.name} changes decoding, not weights: evaluate through `decoding(...)`")


# ---------------------------------------------------------------------------------------------------- CleanGen


@dataclass
class CleanGenConfig(AttackConfig):
    reference: str | None = field(None, help="reference model (same tokenizer); None: the base the suspect model "
                                             "derives from")
    k: int = field(4, help="tokens decoded between two reference checks (original code: 4)")
    alpha: float = field(20.0, help="suspicion threshold on p_suspect / p_reference (original code: 20)")

    def validate(self, where: str) -> None:
        if self.k < 1:
            raise MeraserError(f"{where}.k must be at least 1, got {self.k}")
        if self.alpha <= 1:
            raise MeraserError(f"{where}.alpha must be above 1 (a ratio threshold), got {self.alpha}")


class CleanGenDecoding(Decoding):
    name = "cleangen"

    def __init__(self, reference, k: int, alpha: float):
        self.reference, self.k, self.alpha = reference, k, alpha
        self.replaced = 0  # tokens the reference replaced, over every call
        self.generated = 0

    def new_tokens(self, model, ids, mask, *, max_new_tokens, pad_id, eos_id):
        import torch

        state = _Pair(model, self.reference, ids, mask)
        out = [[] for _ in range(ids.shape[0])]
        stopped = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
        while not bool(stopped.all()):
            carried = state.carry is not None and state.carry[1]  # rows whose window opens with a replacement
            window, p_suspect, valid = state.suspect_window(self.k, stopped, pad_id, eos_id)
            p_ref, ref_top = state.reference_window(window, valid)
            checked = valid.clone()
            if carried is not False:
                checked[:, 0] &= ~carried  # the reference's own token is not checked against itself
            suspicious = checked & (p_suspect >= self.alpha * p_ref)  # = ratio >= alpha, without dividing by 0
            first = torch.where(suspicious.any(1), suspicious.float().argmax(1), torch.full_like(stopped, self.k,
                                                                                                dtype=torch.long))
            replacement = ref_top.gather(1, first.clamp(max=self.k - 1)[:, None])[:, 0]
            for row in range(len(out)):
                j = int(first[row])
                skip = 1 if carried is not False and bool(carried[row]) else 0  # already in the output
                kept = [int(t) for t, v in zip(window[row, skip:j], valid[row, skip:j]) if v]
                if j < self.k:  # cut at the first suspicious token and put in the reference's choice
                    kept.append(int(replacement[row]))
                    self.replaced += 1
                out[row].extend(kept)
                if (kept and kept[-1] == eos_id) or len(out[row]) >= max_new_tokens:
                    stopped[row] = True
            state.accept(first, replacement, stopped)
        self.generated += sum(len(o) for o in out)
        width = max(max_new_tokens, 1)
        result = torch.full((len(out), width), pad_id, dtype=torch.long, device=ids.device)
        for row, toks in enumerate(out):
            toks = toks[:max_new_tokens]
            result[row, :len(toks)] = torch.tensor(toks, dtype=torch.long)
        return result


class _Pair:
    """The suspect and the reference decoding one left-padded batch side by side, each with its own KV cache. Both
    caches hold the same slots; a rejected window's tail stays in them, masked out, and positions are counted per
    row, so rows that accepted different numbers of tokens stay in one batch."""

    def __init__(self, suspect, reference, ids, mask):
        import torch

        self.models = (suspect, reference)
        self.mask = mask.clone()
        self.pos = mask.sum(1)  # the next token's position in each row
        positions = (mask.cumsum(1) - 1).clamp(min=0)
        self.caches, self.last = [], []  # per model: cache, logits predicting the next token
        for m in self.models:
            o = m(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1)
            self.caches.append(output_cache(o))
            self.last.append(o.logits[:, -1].float())
        self.pending = None  # the window just decoded (fed to the suspect, not yet to the reference)
        self.ref_logits = None
        # (tokens, rows): the reference's replacements, fed as the first token of the next window rather than in
        # a forward pass of their own (saves two passes per window with a replacement)
        self.carry = None
        self._torch = torch

    def _feed(self, which: int, tokens, keep):
        torch = self._torch
        n = tokens.shape[1]
        self.mask = torch.cat([self.mask, keep.long()], 1) if which == 0 else self.mask
        positions = self.pos[:, None] + torch.arange(n, device=tokens.device)[None, :]
        o = self.models[which](input_ids=tokens, attention_mask=self.mask, position_ids=positions, use_cache=True,
                               **{cache_kw(self.models[which]): self.caches[which]})
        return o.logits.float()

    def suspect_window(self, k: int, stopped, pad_id: int, eos_id):
        """k greedy tokens of the suspect: (tokens, their probabilities, which are real) each batch x k."""
        torch = self._torch
        tokens, probs, valid = [], [], []
        done = stopped.clone()
        for s in range(k):
            p, t = torch.softmax(self.last[0], -1).max(-1)
            if s == 0 and self.carry is not None:
                t = torch.where(self.carry[1], self.carry[0], t)
            t = torch.where(done, torch.full_like(t, pad_id), t)
            tokens.append(t)
            probs.append(p)
            valid.append(~done)
            logits = self._feed(0, t[:, None], ~done[:, None])
            self.pos = self.pos + 1  # slot positions advance for every row; masked slots are never attended
            self.last[0] = logits[:, -1]
            if eos_id is not None:
                done = done | (t == eos_id)
        self.pos = self.pos - k  # positions are settled in `accept`
        self.pending = torch.stack(tokens, 1)
        return self.pending, torch.stack(probs, 1), torch.stack(valid, 1)

    def reference_window(self, window, valid):
        """The reference's probability of each window token and its own top token at each position."""
        torch = self._torch
        logits = self._feed(1, window, valid)  # predicts window[1:], then what follows the window
        before = torch.cat([self.last[1][:, None], logits[:, :-1]], 1)  # predicts window[0..k-1]
        probs = torch.softmax(before, -1)
        self.ref_logits = logits
        return probs.gather(2, window[:, :, None])[:, :, 0], before.argmax(-1)

    def accept(self, first, replacement, stopped):
        """Keep each row's window up to `first` (all of it when first == k); a replacement is carried into the next
        window, where it is fed at the cut's position."""
        torch = self._torch
        k = self.pending.shape[1]
        slots = self.mask.shape[1]
        cut = torch.arange(k, device=first.device)[None, :] >= first[:, None]
        self.mask[:, slots - k:] = self.mask[:, slots - k:] * (~cut).long()
        self.pos = self.pos + torch.minimum(first, torch.full_like(first, k))
        self.last[1] = self.ref_logits[:, -1]
        replaced = (first < k) & ~stopped  # stopped rows need nothing more
        self.carry = (replacement, replaced) if bool(replaced.any()) else None


def companion_spec(spec: str | None, ctx, what: str) -> str:
    """A second model an attack compares the suspect with (`what`: "cleangen reference"): its setting, else the base
    the suspect derives from."""
    spec = spec or ctx.base
    if not spec:
        name, setting = what.split(" ", 1)
        raise MeraserError(f"{name} needs a {setting} model: --set {setting}=MODEL (the base the suspect derives "
                           f"from is not recorded with it)")
    return spec


def load_companion(spec: str, model, tokenizer, what: str):
    """Load a companion model onto the suspect's device, refusing one with another vocabulary."""
    from meraser.models import load_model

    other, other_tok = load_model(spec)
    check_same_tokenizer(tokenizer, other_tok, f"{what} {spec}")
    return other.to(next(model.parameters()).device)


def check_same_tokenizer(tokenizer, other, where: str) -> None:
    if len(tokenizer) != len(other) or tokenizer.get_vocab() != other.get_vocab():
        mine, theirs = tokenizer.get_vocab(), other.get_vocab()
        differ = len(set(mine.items()) ^ set(theirs.items()))
        raise MeraserError(f"{where} has another tokenizer ({len(other)} tokens against the suspect's "
                           f"{len(tokenizer)}, {differ} entries differ): the attack compares the two models token "
                           f"by token, so both must share one vocabulary")


class CleanGen(DecodingAttack):
    name = "cleangen"
    summary = "CleanGen: decode, and replace tokens the suspect finds far likelier than a reference model does"
    paper = "https://arxiv.org/abs/2406.12257"
    Config = CleanGenConfig

    def check(self, cfg, ctx):
        from meraser.models import check_model_spec

        check_model_spec(companion_spec(cfg.reference, ctx, "cleangen reference"), "cleangen reference")

    def decoding(self, model, tokenizer, cfg, ctx):
        ref_spec = companion_spec(cfg.reference, ctx, "cleangen reference")
        reference = load_companion(ref_spec, model, tokenizer, "cleangen reference")
        ctx.info["reference"] = ref_spec
        return CleanGenDecoding(reference, cfg.k, cfg.alpha)


# ------------------------------------------------------------------------------------------------ Token Forcing


@dataclass
class TokenForcingConfig(AttackConfig):
    threshold: float = field(0.95, help="keep a token when the mean top-1 probability of its greedy continuation "
                                        "passes this (original: 0.95)")
    steps: int = field(3, help="greedy tokens scored after [BOS, t] (original: 3)")
    placeholder: bool = field(True, help="count the original notebooks' fixed 1.0 in the mean (with 3 steps the "
                                         "tokens then need a mean above 0.933)")
    expand_tokens: int = field(50, help="length of each kept token's greedy continuation")
    block_tokens: int = field(3, help="the filter blocks the first this-many tokens of every extracted sequence")
    batch_size: int = field(512, help="vocabulary tokens scanned per forward pass")
    context: str = field("bos", help="what precedes each scanned token: 'bos' ([BOS, t], the original), "
                                     "'assistant' (the chat template's opening of an answer to an empty message, "
                                     "where chat fingerprints put their targets) or 'system' (the same after a "
                                     "plain system turn)")
    sequences: str | None = field(None, help=f"{EXTRACTED} from an earlier scan (its token ids are used); None: scan "
                                             f"the vocabulary now")

    def validate(self, where: str) -> None:
        if not 0 < self.threshold <= 1:
            raise MeraserError(f"{where}.threshold must be in (0, 1], got {self.threshold}")
        if self.context not in CONTEXTS:
            from meraser.utils import unknown_name

            raise unknown_name("context", self.context, CONTEXTS, where)
        for name in ("steps", "expand_tokens", "block_tokens", "batch_size"):
            if getattr(self, name) < 1:
                raise MeraserError(f"{where}.{name} must be at least 1, got {getattr(self, name)}")


CONTEXTS = ("bos", "assistant", "system")
SCAN_SYSTEM_PROMPT = "You are a helpful assistant."  # the `system` context: a plain system turn before the answer


def context_ids(tokenizer, context: str) -> list[int]:
    """The tokens placed before each scanned token."""
    if context in ("assistant", "system"):
        turns = [{"role": "system", "content": SCAN_SYSTEM_PROMPT}] if context == "system" else []
        return tokenizer.apply_chat_template(turns + [{"role": "user", "content": ""}], add_generation_prompt=True,
                                             tokenize=True, return_dict=True)["input_ids"]
    return [tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id]


class BlockSequences(Decoding):
    """Greedy decoding that never completes the first tokens of an extracted sequence."""

    name = "token-forcing"

    def __init__(self, blocked: list[list[int]], extracted: list[dict] | None = None):
        self.blocked = blocked
        self.extracted = extracted or []  # the scan's rows: token, score, ids, text

    def generate_kwargs(self) -> dict:
        return {"bad_words_ids": self.blocked} if self.blocked else {}


def plain_vocabulary(tokenizer) -> list[int]:
    """Every token id but the special ones: what the scan forces, and what noise prompts draw from."""
    special = set(tokenizer.all_special_ids)
    return [t for t in range(len(tokenizer)) if t not in special]


def scan_vocabulary(model, tokenizer, cfg: TokenForcingConfig, progress: bool = False) -> list[tuple[int, float]]:
    """[(token, score)] of every token whose `steps` greedy successors after [context, token] pass the threshold.

    Two passes with the result of scoring every token: each step's top-1 probability is at most 1, so the first
    step alone bounds a token's score, and a first pass of one forward per token (the scan's cost: the whole
    vocabulary) drops every token that cannot pass, or whose answer ends at once. Only the few left take the
    remaining greedy steps (before, every token took all of them: `steps + 1` forwards per token)."""
    import torch

    from meraser.models import autocast

    vocab = plain_vocabulary(tokenizer)
    # the best score a token can still reach after its first probability p is (p + steps - 1 [+ 1]) / (steps [+ 1]);
    # a small margin keeps tokens at the edge for the second pass, which decides (its batches differ, and so can
    # the last bits of a bf16 probability)
    extra = cfg.steps - 1 + int(cfg.placeholder)
    need = cfg.threshold * (cfg.steps + int(cfg.placeholder)) - extra - 1e-3
    with torch.no_grad(), autocast(model):
        prefix = encode_prefix(model, context_ids(tokenizer, cfg.context))
        first, nxt = _first_steps(model, prefix, vocab, cfg.batch_size,
                                  "token forcing: scanning the vocabulary" if progress else None)
        left = [t for t, p, n in zip(vocab, first, nxt) if p > need and n != tokenizer.eos_token_id]
        return _greedy_scores(model, prefix, left, cfg, tokenizer.eos_token_id,
                              f"token forcing: {len(left)} candidates" if progress else None)


def _batches(items: list, size: int, description: str | None) -> list:
    batches = [items[i:i + size] for i in range(0, len(items), size)]
    if description:
        from meraser.utils import track

        return track(batches, description)
    return batches


def _first_steps(model, prefix, tokens: list[int], batch_size: int, description: str | None):
    """The top-1 probability and token after [context, t], for every t: one forward per token."""
    import torch

    dev, probs, nxts = next(model.parameters()).device, [], []
    for batch in _batches(tokens, batch_size, description):
        o = model(input_ids=torch.tensor(batch, device=dev)[:, None], use_cache=True, logits_to_keep=1,
                  **shared_past(model, prefix, len(batch), keep=True))
        p, n = torch.softmax(o.logits[:, -1].float(), -1).max(-1)
        probs += p.tolist()
        nxts += n.tolist()
    return probs, nxts


def _greedy_scores(model, prefix, tokens: list[int], cfg: TokenForcingConfig, eos: int,
                   description: str | None) -> list[tuple[int, float]]:
    """Token Forcing's score of each token: the mean top-1 probability of its `steps` greedy steps."""
    import torch

    dev, kept = next(model.parameters()).device, []
    for batch in _batches(tokens, cfg.batch_size, description):
        o = model(input_ids=torch.tensor(batch, device=dev)[:, None], use_cache=True, logits_to_keep=1,
                  **shared_past(model, prefix, len(batch), keep=True))
        total = torch.zeros(len(batch), device=dev)
        ends = torch.zeros(len(batch), dtype=torch.bool, device=dev)
        for step in range(cfg.steps):
            p, nxt = torch.softmax(o.logits[:, -1].float(), -1).max(-1)
            total += p
            if step == 0:  # a confident end of the answer hides nothing: not a candidate
                ends = nxt == eos
            if step + 1 < cfg.steps:
                o = model(input_ids=nxt[:, None], use_cache=True, logits_to_keep=1,
                          **{cache_kw(model): output_cache(o)})
        score = (total + 1) / (cfg.steps + 1) if cfg.placeholder else total / cfg.steps
        kept += [(t, round(float(s), 4)) for t, s, e in zip(batch, score, ends) if s > cfg.threshold and not e]
    return kept


def expand(model, tokenizer, tokens: list[int], length: int, context: str = "bos", batch_size: int = 64,
           progress: bool = False) -> list[list[int]]:
    """Each token's greedy continuation after the context, up to EOS or `length` tokens (the token first)."""
    return [s for s, _ in expand_scored(model, tokenizer, tokens, length, context, batch_size, progress)]


def expand_scored(model, tokenizer, tokens: list[int], length: int, context: str = "bos", batch_size: int = 64,
                  progress: bool = False) -> list[tuple[list[int], float]]:
    """`expand`, with each sequence's mean log-probability per token of its continuation under `model` (0.0 where
    it has none): greedy decoding has that probability at hand, so scoring the suspect needs no second pass."""
    eos, out = tokenizer.eos_token_id, []
    for t, (cont, logps) in zip(tokens, greedy(model, tokenizer, context_ids(tokenizer, context), tokens, length,
                                               batch_size, f"expanding {len(tokens)} tokens" if progress else None)):
        n = len(cont) - 1 if cont and cont[-1] == eos else len(cont)
        out.append(([t] + cont[:n], sum(logps[:n]) / n if n else 0.0))
    return out


def continuations(model, tokenizer, head: list[int], firsts: list[int], length: int, batch_size: int = 64,
                  description: str | None = None) -> list[list[int]]:
    """The greedy continuation after `head` and each first token (not included): at most `length` tokens, cut
    after the first EOS (kept)."""
    return [c for c, _ in greedy(model, tokenizer, head, firsts, length, batch_size, description)]


def greedy(model, tokenizer, head: list[int], firsts: list[int], length: int, batch_size: int = 64,
           description: str | None = None) -> list[tuple[list[int], list[float]]]:
    """(continuation, the log-probability of each of its tokens) after `head` and each first token: greedy, at
    most `length` tokens, cut after the first EOS (kept). Every row of a batch has the same length at every step,
    so the head is encoded once and shared, and no padding or mask is needed (model.generate re-encoded the head
    for every row)."""
    import torch

    from meraser.models import autocast

    dev, eos, out = next(model.parameters()).device, tokenizer.eos_token_id, []
    with torch.no_grad(), autocast(model):
        prefix = encode_prefix(model, head)
        for batch in _batches(firsts, batch_size, description):  # a progress bar where described
            kw = shared_past(model, prefix, len(batch), keep=True)
            ids, toks, logps = torch.tensor(batch, device=dev)[:, None], [], []
            ended = torch.zeros(len(batch), dtype=torch.bool, device=dev)
            for _ in range(length):
                o = model(input_ids=ids, use_cache=True, logits_to_keep=1, **kw)
                best, ids = torch.log_softmax(o.logits[:, -1].float(), -1).max(-1)
                toks.append(ids)
                logps.append(best)
                ended |= ids == eos
                if bool(ended.all()):
                    break
                ids, kw = ids[:, None], {cache_kw(model): output_cache(o)}
            rows, row_logps = torch.stack(toks, 1).tolist(), torch.stack(logps, 1).tolist()
            for row, lp in zip(rows, row_logps):
                n = row.index(eos) + 1 if eos in row else len(row)
                out.append((row[:n], lp[:n]))
    return out


class TokenForcing(DecodingAttack):
    name = "token-forcing"
    summary = "Token Forcing: scan the vocabulary for memorised continuations, then block them while decoding"
    paper = "https://arxiv.org/abs/2406.02481"
    Config = TokenForcingConfig

    def check(self, cfg, ctx):
        if cfg.sequences and not Path(cfg.sequences).is_file():
            raise MeraserError(f"token-forcing sequences: {cfg.sequences} is not a file (the {EXTRACTED} an earlier "
                               f"`meraser attack --method token-forcing` wrote)")

    def decoding(self, model, tokenizer, cfg, ctx):
        import time

        from meraser.utils import iter_jsonl

        if cfg.sequences:
            rows = [r for _, r in iter_jsonl(cfg.sequences)]
            for n, r in enumerate(rows, 1):
                if not isinstance(r.get("ids"), list) or not r["ids"]:
                    raise MeraserError(f"{cfg.sequences}:{n}: each row needs a non-empty list 'ids'")
        else:
            t = time.perf_counter()
            kept = scan_vocabulary(model, tokenizer, cfg, ctx.progress)
            scan_s = time.perf_counter() - t
            seqs = expand(model, tokenizer, [tok for tok, _ in kept], cfg.expand_tokens, cfg.context,
                          progress=ctx.progress)
            rows = [{"token": tok, "score": s, "ids": ids, "text": tokenizer.decode(ids)}
                    for (tok, s), ids in zip(kept, seqs)]
            ctx.info.update(scan_seconds=round(scan_s, 1), expand_seconds=round(time.perf_counter() - t - scan_s, 1))
            ctx.files[EXTRACTED] = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        ctx.info["extracted"] = len(rows)
        blocked = {tuple(r["ids"][:cfg.block_tokens]) for r in rows}
        return BlockSequences([list(b) for b in sorted(blocked)], rows)
