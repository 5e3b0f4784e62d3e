"""Verify a served suspect: the card's checks through an OpenAI-compatible HTTP endpoint (vLLM, TGI, llama.cpp's
server, `transformers serve`, a hosted API), with the `openai` client library.

What a check needs decides whether it can run, so each access level is probed and reported:
- text (chat or completions): the paper's FSR and the false-positive rate, and the strict checks on text
  (paraphrased, partial match, and sampled where the server samples at a requested temperature: probed, since
  `transformers serve` decodes greedily whatever it is asked). A chat endpoint renders the prompt with the server's own template and
  continues no assistant text, so a card's prefill (IF-SFT's lead-in) is not sent there; a completions endpoint
  gets the prompt rendered here with the owner's tokenizer (the card's base model, or `tokenizer`), prefill
  included, which is exactly what `meraser verify --model` feeds the model.
- assistant prefill (the completions API): the forced-prefix check.
- prompt log-probabilities (completions `echo` with `logprobs`, as vLLM returns them): the likelihood ownership test
  and the strict log-likelihood, each key, decoy and target sent as the token ids the local checks score.
- generated-token top-k log-probabilities (chat `logprobs`/`top_logprobs`): a bound on each target's first-token
  log-probability (exact where it is in the top k); nothing past the first token can be bounded without feeding
  the target in.

The API key comes from an environment variable (`api_key_env`) and is never printed or written. The client retries
connection errors, 429s and 5xx with exponential backoff (`retries`), each request under `timeout` seconds, and
answers go out `concurrency` requests at a time.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass
from urllib.parse import urlparse

from meraser.config import Config, field
from meraser.fingerprints.card import Card
from meraser.utils import MeraserError

APIS = ("chat", "completions")


@dataclass
class EndpointConfig(Config):
    url: str = field("", help="the server's OpenAI-compatible base URL (http://host:port gets /v1 appended)")
    model: str | None = field(None, help="the served model's name (None: the only model the server lists)")
    api: str = field("chat", help="chat (the server's chat template) or completions (the prompt rendered here, "
                                  "prefill included: what `meraser verify --model` feeds the model)")
    api_key_env: str = field("OPENAI_API_KEY", help="environment variable holding the API key (never printed)")
    tokenizer: str | None = field(None, help="the owner's tokenizer, for rendering and probes (None: the card's "
                                             "base model)")
    concurrency: int = field(4, help="requests in flight at once")
    timeout: float = field(120.0, help="seconds per request")
    retries: int = field(3, help="retries of a failed request (connection errors, 429, 5xx), with backoff")

    def validate(self, where: str) -> None:
        if not urlparse(self.url).scheme.startswith("http"):
            raise MeraserError(f"{where}: the endpoint must be an http(s) URL, got {self.url!r}")
        if self.api not in APIS:
            from meraser.utils import unknown_name

            raise unknown_name("api", self.api, APIS, "--api")
        if self.concurrency < 1 or self.timeout <= 0 or self.retries < 0:
            raise MeraserError(f"{where}: concurrency >= 1, timeout > 0 and retries >= 0 are needed")


def base_url(url: str) -> str:
    """The client's base URL: a bare host gets the usual /v1."""
    url = url.rstrip("/")
    return url + "/v1" if urlparse(url).path in ("", "/") else url


class Endpoint:
    """One served model behind an OpenAI-compatible API; every request counted, every failure a MeraserError."""

    def __init__(self, cfg: EndpointConfig):
        import openai

        self.cfg, self.url, self.requests = cfg, base_url(cfg.url), 0
        key = os.environ.get(cfg.api_key_env) or "none"  # servers without auth want some key in the header
        self.client = openai.OpenAI(base_url=self.url, api_key=key, timeout=cfg.timeout, max_retries=cfg.retries)
        self.model = self._served_model()

    def _call(self, what: str, fn):
        import openai

        self.requests += 1
        try:
            return fn()
        except openai.APIConnectionError as e:  # timeouts included
            raise MeraserError(f"cannot reach {self.url} ({type(e).__name__}) after {self.cfg.retries} retries: is the "
                               f"server running, and is this its OpenAI-compatible base URL?") from None
        except openai.AuthenticationError:
            raise MeraserError(f"{self.url} refused the request (401 unauthorized): put the API key in the "
                               f"environment variable {self.cfg.api_key_env}") from None
        except openai.PermissionDeniedError:
            raise MeraserError(f"{self.url} refused the request (403 forbidden): the key in "
                               f"{self.cfg.api_key_env} may not use {what}") from None
        except openai.RateLimitError:
            raise MeraserError(f"{self.url} kept rate-limiting (429) after {self.cfg.retries} retries: lower "
                               f"--concurrency or try later") from None
        except openai.NotFoundError:
            raise MeraserError(f"{self.url}: {what} not found (404): is this the server's /v1 base URL, and the "
                               f"model name one it serves?") from None
        except openai.APIStatusError as e:
            raise MeraserError(f"{self.url} refused {what} ({e.status_code}): {_detail(e)}") from None

    def _served_model(self) -> str:
        listed = [m.id for m in self._call("the model list", lambda: self.client.models.list()).data]
        if self.cfg.model is None:
            if len(listed) != 1:
                raise MeraserError(f"{self.url} serves {len(listed)} models ({', '.join(listed) or 'none'}): name one "
                                   f"with --served-model")
            return listed[0]
        if listed and self.cfg.model not in listed:
            from meraser.utils import did_you_mean

            raise MeraserError(f"{self.url} does not serve '{self.cfg.model}'{did_you_mean(self.cfg.model, listed)} "
                               f"(it lists: {', '.join(listed)})")
        return self.cfg.model

    def chat(self, prompt: str, system_prompt: str | None, max_tokens: int, temperature: float = 0.0, **extra):
        msgs = ([{"role": "system", "content": system_prompt}] if system_prompt is not None else []) + \
               [{"role": "user", "content": prompt}]
        return self._call("a chat completion", lambda: self.client.chat.completions.create(
            model=self.model, messages=msgs, max_tokens=max_tokens, temperature=temperature, **extra))

    def complete(self, prompt: str | list[int], max_tokens: int, temperature: float = 0.0, **extra):
        return self._call("a completion", lambda: self.client.completions.create(
            model=self.model, prompt=prompt, max_tokens=max_tokens, temperature=temperature, **extra))

    def map(self, fn, items: list, what: str, progress: bool) -> list:
        """fn over items, `concurrency` at a time, in order, with a progress bar."""
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(self.cfg.concurrency) as pool:
            results = pool.map(fn, items)
            if progress:
                from meraser.utils import track

                results = track(results, f"{what} ({len(items)} requests)", total=len(items))
            return list(results)


def _detail(e) -> str:
    body = getattr(e, "body", None)
    if isinstance(body, dict):
        return str(body.get("detail") or body.get("message") or body)
    return str(getattr(e, "message", e))


def completion_prompt(fmt, prompt: str, system_prompt: str | None) -> str:
    """The prompt text for a completions request: as `verify --model` renders it, less a leading BOS where the
    tokenizer adds one itself (servers tokenise the text with special tokens: Gemma would get two)."""
    text, tok = fmt.prompt_text(prompt, system_prompt), fmt.tok
    bos = tok.bos_token
    if bos and text.startswith(bos) and tok("x")["input_ids"][:1] == [tok.bos_token_id]:
        return text[len(bos):]
    return text


class Served:
    """The strict checks' access to a served suspect (suspect.Weights' counterpart): continuations over the chat API
    (the server's template; no prefill can be continued) or the completions API (the prompt rendered here, prefill
    appended), greedy or sampled (a seed per request, where the server honours one), and target log-probabilities
    from echoed prompts where the server returns them (else None: the log-likelihood check does not run)."""

    def __init__(self, ep: Endpoint, card: Card, tokenizer, prompt_logprobs: bool, progress: bool = False):
        from meraser.data.formatting import Formatter

        self.ep, self.card, self.tokenizer, self.progress = ep, card, tokenizer, progress
        self.prefill, self.prompt_logprobs = ep.cfg.api == "completions", prompt_logprobs
        self.samples = True  # whether it samples at a temperature (`honours_sampling`)
        self.fmt = Formatter(tokenizer, card.format)
        self.system = card.system_prompt if card.system_prompt is not None else card.format.system_prompt

    def continuations(self, prompts: list[str], prefills: list[str], max_new_tokens: int,
                      sampling=None) -> list[str]:
        temperature = sampling.temperature if sampling else 0.0

        def one(item):
            i, (p, f) = item
            extra = {"seed": sampling.seed + i} if sampling else {}  # each sample its own seed: they differ
            if not self.prefill:
                return self.ep.chat(p, self.system, max_new_tokens, temperature,
                                    **extra).choices[0].message.content or ""
            lead = self.fmt.answer_lead(p, self.card.system_prompt) if f else ""  # as `encode_prompts` appends it
            return self.ep.complete(completion_prompt(self.fmt, p, self.card.system_prompt) + lead + f,
                                    max_new_tokens, temperature, **extra).choices[0].text or ""
        return self.ep.map(one, list(enumerate(zip(prompts, prefills))), "asking the served model", self.progress)

    def target_logprobs(self) -> list[list[float]] | None:
        from meraser.evaluation.suspect import target_rows

        if not self.prompt_logprobs:
            return None
        return self.ep.map(lambda row: echoed_target(self.ep, *row), target_rows(self.tokenizer, self.card),
                           "scoring the targets", self.progress)


def access(ep: Endpoint) -> dict:
    """Which log-probabilities the server returns: one small request for each kind (a server that ignores or
    refuses the field returns none)."""
    def returned(request) -> bool:
        try:
            return bool(getattr(request().choices[0], "logprobs", None))
        except MeraserError:
            return False

    return {"generated_logprobs": returned(lambda: ep.chat("Hi", None, 1, logprobs=True, top_logprobs=5)),
            "prompt_logprobs": returned(lambda: ep.complete("Hi", 1, echo=True, logprobs=1))}


def honours_sampling(suspect: "Served") -> bool:
    """Whether the server samples at a requested temperature: three answers to an open prompt at temperature 1.0
    with different seeds, of which at least two differ. `transformers serve` sets the temperature but leaves
    `do_sample` to the model's generation config (greedy for SmolLM2: measured), so its "samples" are the greedy
    answer and the sampled check cannot run there."""
    from meraser.generation import Sampling

    outs = suspect.continuations(["Name a random animal, a colour and a number."] * 3, [""] * 3, 12, Sampling(1.0, 1))
    return len(set(outs)) > 1


def checks(cfg: EndpointConfig, card: Card, levels: dict) -> dict:
    """What each access level allows on this server, what ran and what could not, and why."""
    chat = cfg.api == "chat"
    prefill = ("not sent: a chat endpoint continues no assistant text (use --api completions)" if chat else
               "sent (the prompt rendered here, prefill appended)") if card.prefills else "the card has none"
    return {
        "paper": f"over the {cfg.api} API",
        "prefill": prefill,
        "strict": "paraphrased, sampled and partial over text; forced prefix "
                  + ("not run: it needs a prefill (use --api completions)" if chat else "with the prefix appended")
                  + "; log-likelihood " + ("from echoed prompt log-probabilities" if levels["prompt_logprobs"] else
                                           "not run: the server returns no prompt log-probabilities"),
        "likelihood": "not run: the server returns no prompt log-probabilities" if not levels["prompt_logprobs"]
                      else "available: the server returns prompt log-probabilities (--test likelihood)",
        "generated_logprobs": ("returned: over the chat API the strict checks bound each target's first-token "
                               "log-probability from the top-k" if levels["generated_logprobs"] else "not returned"),
    }


def _chat_renders(cfg: EndpointConfig, card: Card) -> None:
    if cfg.api == "chat" and card.format.template != "chat":
        raise MeraserError(f"the card's prompts are rendered as {card.format.template!r} text, which a chat endpoint "
                           f"cannot reproduce: use --api completions")


def _card_and_tokenizer(cfg: EndpointConfig, card, trust_remote_code: bool):
    """The card, and the owner's tokenizer (the card's base model unless named), checked against the card."""
    from meraser.evaluation.likelihood import check_tokenizer
    from meraser.models import load_tokenizer

    c = Card.load(card)
    spec = cfg.tokenizer or c.base_model
    if not spec:
        raise MeraserError("the card records no base model: name the owner's tokenizer with --tokenizer")
    tok = load_tokenizer(spec, trust_remote_code=trust_remote_code)
    check_tokenizer(c, tok, spec)
    return c, tok


def served_verify(cfg: EndpointConfig, card, *, false_positive_inputs: int = 32, progress: bool = False,
                  trust_remote_code: bool = False) -> dict:
    """`meraser verify --endpoint`: the paper's FSR and false-positive rate of a served model, what each access
    level allows, and the requests and wall time it took."""
    from meraser.evaluation.fsr import fsr_of
    from meraser.evaluation.suspect import answers

    c, tok = _card_and_tokenizer(cfg, card, trust_remote_code)
    _chat_renders(cfg, c)
    t0 = time.perf_counter()
    ep = Endpoint(cfg)
    suspect = Served(ep, c, tok, False, progress)
    res = fsr_of(lambda p, f: answers(suspect, p, f), tok, c, false_positive_inputs=false_positive_inputs)
    levels = access(ep)
    return {"endpoint": ep.url, "served_model": ep.model, "api": cfg.api, "method": c.method, **res,
            "checks": checks(cfg, c, levels), "requests": ep.requests, "seconds": round(time.perf_counter() - t0, 1)}


def target_slice(logprobs: list, prompt: int, target: int) -> list[float]:
    """The target's log-probabilities in an echoed [prompt, target, generated] sequence."""
    picked = logprobs[prompt:prompt + target]
    if len(picked) != target or any(lp is None for lp in picked):
        raise MeraserError(f"the server echoed {len(logprobs)} log-probabilities for {prompt + target} prompt tokens: "
                           f"cannot score the target")
    return picked


def echoed_target(ep: Endpoint, prompt: list[int], target: list[int]) -> list[float]:
    """log P of each target token after the prompt, from one completions request of the token ids themselves (the
    API takes a prompt of ids) echoed with its log-probabilities (vLLM: echo with logprobs; one generated token,
    not counted)."""
    lp = ep.complete(prompt + target, 1, echo=True, logprobs=0).choices[0].logprobs
    if not lp or not lp.token_logprobs:
        raise MeraserError(f"{ep.url} returned no prompt log-probabilities for an echoed prompt")
    return target_slice(lp.token_logprobs, len(prompt), len(target))


def echo_scorer(ep: Endpoint, card: Card, tokenizer, progress: bool):
    """The likelihood test's `score(pairs, prefills)` through the completions API: each pair sent as the very token
    ids `pair_scores` feeds a local model, its score the mean echoed log-probability of the target's tokens."""
    from meraser.evaluation.suspect import pair_rows

    def one(row):
        picked = echoed_target(ep, *row)
        return sum(picked) / len(picked)

    def score(pairs, prefills):
        return ep.map(one, pair_rows(tokenizer, card, pairs, prefills), "scoring keys and decoys", progress)

    return score


def served_likelihood(cfg: EndpointConfig, card, lcfg=None, *, progress: bool = False,
                      trust_remote_code: bool = False) -> dict:
    """`meraser verify --endpoint --test likelihood`: the likelihood ownership test on a server that returns prompt
    log-probabilities (the completions API is used whatever `api` says: only it echoes the prompt)."""
    from meraser.evaluation.likelihood import LikelihoodConfig, keys_and_decoys, statistics

    c, tok = _card_and_tokenizer(cfg, card, trust_remote_code)
    lcfg = lcfg or LikelihoodConfig()
    keys = keys_and_decoys(c, lcfg)
    t0 = time.perf_counter()
    ep = Endpoint(cfg)
    if not access(ep)["prompt_logprobs"]:
        raise MeraserError(f"{ep.url} returns no prompt log-probabilities, which the likelihood test needs (vLLM "
                           f"returns them): run it on the weights with --model, or use --test paper")
    result = statistics(echo_scorer(ep, c, tok, progress), c, keys, lcfg)
    return {"endpoint": ep.url, "served_model": ep.model, "method": c.method, "keys": len(keys), **result,
            "requests": ep.requests, "seconds": round(time.perf_counter() - t0, 1)}


def served_check(cfg: EndpointConfig, card, test: str, *, base: str | None = None, decoys: int | None = None,
                 progress: bool = False, trust_remote_code: bool = False) -> dict:
    """`meraser verify --endpoint`: the test (paper, strict or likelihood) as far as the server's API allows."""
    if test == "likelihood":
        from meraser.evaluation.likelihood import LikelihoodConfig

        return served_likelihood(cfg, card, LikelihoodConfig(decoys=decoys), progress=progress,
                                 trust_remote_code=trust_remote_code)
    if test == "strict":
        return served_strict(cfg, card, base, progress=progress, trust_remote_code=trust_remote_code)
    return served_verify(cfg, card, progress=progress, trust_remote_code=trust_remote_code)


TOP_LOGPROBS = 20  # the most top-k log-probabilities OpenAI's API returns per token


def first_token_bounds(suspect: Served) -> list[dict]:
    """What a chat API's generated-token top-k log-probabilities bound: log P of each target's first token at the
    answer's first position, exact where it is among the top k, else at most the k-th log-probability. Later
    target tokens would need the target fed in, which only a prefill or an echo (the completions API) allows."""
    card, tok = suspect.card, suspect.tokenizer

    def one(item):
        trigger, target = item
        first = tok.decode(tok(target, add_special_tokens=False)["input_ids"][:1])
        r = suspect.ep.chat(trigger, suspect.system, 1, logprobs=True, top_logprobs=TOP_LOGPROBS)
        top = {t.token: t.logprob for t in r.choices[0].logprobs.content[0].top_logprobs}
        if not top:
            raise MeraserError(f"{suspect.ep.url} returned no top-k log-probabilities for a generated token")
        exact = first in top
        return {"logprob": top[first] if exact else min(top.values()), "exact": exact, "k": len(top)}

    return suspect.ep.map(one, list(zip(card.triggers, card.targets)), "top-k log-probabilities", suspect.progress)


def served_strict(cfg: EndpointConfig, card, base: str | None = None, scfg=None, *, progress: bool = False,
                  trust_remote_code: bool = False) -> dict:
    """`meraser verify --endpoint --test strict`: the strict checks the API allows (see `checks`), against the base
    model held here when given (run as the API lets the suspect run: no prefill through a chat API)."""
    from meraser.evaluation.strict import strict_check
    from meraser.evaluation.suspect import Weights
    from meraser.models import check_model_spec, load_model

    c, tok = _card_and_tokenizer(cfg, card, trust_remote_code)
    _chat_renders(cfg, c)
    if not c.has_target_text:
        raise MeraserError(f"{c.method} cards have no target text for the strict checks: their own test is the "
                           f"z-test that --test paper reports")
    if base:
        check_model_spec(base, "--base")
    t0 = time.perf_counter()
    ep = Endpoint(cfg)
    levels = access(ep)
    suspect = Served(ep, c, tok, levels["prompt_logprobs"], progress)
    suspect.samples = honours_sampling(suspect)
    base_result = None
    if base:
        b = Weights(load_model(base, trust_remote_code=trust_remote_code)[0], tok, c, prefill=suspect.prefill)
        base_result = strict_check(None, tok, c, scfg, suspect=b)
    r = strict_check(None, tok, c, scfg, base_result=base_result, suspect=suspect)
    if levels["generated_logprobs"] and cfg.api == "chat":
        r["first_token"] = first_token_bounds(suspect)
    said = {"sampling": "the server samples at the requested temperature" if suspect.samples else
            "not run: the server answered three seeds at temperature 1.0 alike (it decodes greedily)"}
    return {"endpoint": ep.url, "served_model": ep.model, "api": cfg.api, "method": c.method, **r,
            "checks": {**checks(cfg, c, levels), **said}, "requests": ep.requests,
            "seconds": round(time.perf_counter() - t0, 1)}


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def server_process(argv: list[str], port: int, threads: int = 1, wait: float = 180.0):
    """Run an OpenAI-compatible server (`argv`, listening on `port`) in its own process until its /health answers;
    yield its base URL, and stop it on exit."""
    import subprocess
    import urllib.request

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(threads)}
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < wait:
            if proc.poll() is not None:
                raise MeraserError(f"{argv[0]} exited: {proc.stderr.read()[-2000:]}")
            with contextlib.suppress(OSError):
                if urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1).status == 200:
                    break
            time.sleep(0.5)
        else:
            raise MeraserError(f"{argv[0]} did not answer /health in {wait:.0f} s")
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        proc.terminate()
        proc.wait(timeout=60)


@contextlib.contextmanager
def transformers_server(model: str, threads: int = 1, wait: float = 180.0):
    """`transformers serve MODEL` (pip install 'transformers[serving]') on a free local port, fp32 on the CPU. The
    tests and benchmarks/served_verify.py check the served path against a real server this way."""
    import shutil
    import sys
    from pathlib import Path

    exe = shutil.which("transformers", path=str(Path(sys.executable).parent)) or shutil.which("transformers")
    if not exe:
        raise MeraserError("transformers serve is not installed: pip install 'transformers[serving]'")
    port = free_port()
    with server_process([exe, "serve", model, "--device", "cpu", "--dtype", "float32", "--host", "127.0.0.1",
                         "--port", str(port)], port, threads, wait) as url:
        yield url
