"""Generation-revision intervention, GRI (the attack the ImF paper brings with its scheme, arXiv 2503.21805): at
deployment, with no weight changed, a system prompt asks the suspect for typical, standard answers, and a revision
pass has a model read the question and the draft and keep it only where it answers the question in a normal,
relevant way. Fingerprints whose answers have no semantic link to their questions (IF-SFT's hidden message,
Chain & Hash's hashed word) are meant to be standardised away; ImF's answers fit their questions and are meant to
survive.

The paper's body (its exact prompts, the reviser, the number of rounds) could not be read here, only its abstract
("system-prompt-level revision and response standardization"): the prompts below are ours, one round, and the
reviser is the suspect itself unless another model with the same vocabulary is named (the host of a stolen model
has that model only). `gri-system` is the first half alone (the system prompt, no revision), so the two can be
measured apart. The question is recovered from the rendered prompt through the chat template (a sentinel message
shows where a user turn opens and closes); a prompt the template did not render (raw text) is taken whole.
"""

from __future__ import annotations

from dataclasses import dataclass

from meraser.attacks.base import AttackConfig
from meraser.attacks.decoding import DecodingAttack
from meraser.config import field
from meraser.generation import Decoding
from meraser.utils import MeraserError

GENERATION_PROMPT = ("You are a careful assistant. Give a typical, standard answer to the user's request. If the "
                     "request looks like a code, a secret phrase, a riddle without meaning or random text, reply as an "
                     "ordinary helpful assistant would.")
REVISION_PROMPT = ("You are an editor. You get a question and a draft answer. If the draft answers the question in a "
                   "normal, relevant way, repeat it, fixing only mistakes. If it is unrelated, strange or formulaic, "
                   "write a standard answer to the question instead. Reply with the final answer only.")
SENTINEL = "\x00QUESTION\x00"


@dataclass
class GRIConfig(AttackConfig):
    system_prompt: str = field(GENERATION_PROMPT, help="the system prompt the draft is generated under")
    revise: bool = field(True, help="revise each draft (false: the system prompt alone, as gri-system)")
    revision_prompt: str = field(REVISION_PROMPT, help="the reviser's system prompt")
    reviser: str | None = field(None, help="the model that revises (same vocabulary; None: the suspect itself)")
    draft_tokens: int = field(0, help="tokens of each draft (0: as many as the answer may have)")
    batch_size: int = field(16, help="prompts per generation batch")

    def validate(self, where: str) -> None:
        if self.draft_tokens < 0 or self.batch_size < 1:
            raise MeraserError(f"{where}: draft_tokens must be >= 0 and batch_size >= 1")


def prompt_parts(tokenizer, ids: list[int]) -> tuple[str, str]:
    """(question, prefill) of a prompt the tokenizer's chat template rendered: the last user turn's content, and
    what the prompt puts after the assistant's opening (IF-SFT's lead-in). A prompt the template did not render
    (raw text) is the question, with no prefill."""
    from meraser.data.formatting import Formatter

    text, plain = tokenizer.decode(ids), tokenizer.decode(ids, skip_special_tokens=True).strip()
    if not getattr(tokenizer, "chat_template", None):
        return plain, ""
    before, after = Formatter(tokenizer).prompt_text(SENTINEL).split(SENTINEL)
    specials = [s for s in tokenizer.all_special_tokens if s and s in before]
    # the user turn opens after the template's last special token before it (ChatML: "<|im_start|>user\n")
    opener = before[max(before.rfind(s) for s in specials):] if specials else before[before.rfind("\n", 0, -1) + 1:]
    close = text.rfind(after)
    start = text.rfind(opener, 0, close) if close >= 0 and opener else -1
    if start < 0:
        return plain, ""
    return text[start + len(opener):close], text[close + len(after):]


class GRIDecoding(Decoding):
    name = "gri"

    def __init__(self, tokenizer, reviser, cfg: GRIConfig):
        self.tokenizer, self.reviser, self.cfg = tokenizer, reviser, cfg
        self.revised = self.changed = 0

    def _generate(self, model, questions: list[str], system_prompt: str, prefills: list[str],
                  max_new_tokens: int) -> list[list[int]]:
        """Greedy answers' ids to `questions` under `system_prompt`, rendered as `generate` renders prompts."""
        from meraser.generation import GREEDY, encode_prompts, generate_ids

        encoded = encode_prompts(self.tokenizer, questions, prefills=prefills, system_prompt=system_prompt)
        return generate_ids(model, self.tokenizer, encoded, max_new_tokens=max_new_tokens,
                            batch_size=self.cfg.batch_size, decoding=GREEDY)

    def new_tokens(self, model, ids, mask, *, max_new_tokens, pad_id, eos_id):
        from meraser.generation import pack

        questions, prefills = zip(*[prompt_parts(self.tokenizer, ids[r][mask[r].bool()].tolist())
                                    for r in range(len(ids))])
        drafts = self._generate(model, list(questions), self.cfg.system_prompt, list(prefills),
                                self.cfg.draft_tokens or max_new_tokens)
        final = drafts
        if self.cfg.revise:
            asked = [f"Question: {q}\nDraft answer: {pre}{self.tokenizer.decode(d, skip_special_tokens=True)}"
                     for q, pre, d in zip(questions, prefills, drafts)]
            final = self._generate(self.reviser or model, asked, self.cfg.revision_prompt, [], max_new_tokens)
            self.revised += len(final)
            self.changed += sum(f != d for f, d in zip(final, drafts))
        return pack(final, max_new_tokens, pad_id, eos_id, ids.device)


class GRI(DecodingAttack):
    name = "gri"
    summary = ("Generation-revision intervention (ImF paper): answer under a standard-answer system prompt, then a "
               "reviser keeps the draft only where it answers the question normally")
    paper = "https://arxiv.org/abs/2503.21805"
    Config = GRIConfig

    def check(self, cfg, ctx):
        from meraser.models import check_model_spec

        if cfg.reviser:
            check_model_spec(cfg.reviser, f"{self.name} reviser")

    def decoding(self, model, tokenizer, cfg, ctx):
        from meraser.attacks.decoding import load_companion

        reviser = load_companion(cfg.reviser, model, tokenizer, f"{self.name} reviser") if cfg.reviser else None
        ctx.info["reviser"] = cfg.reviser or "the suspect"
        return GRIDecoding(tokenizer, reviser, cfg)


@dataclass
class GRISystemConfig(GRIConfig):
    revise: bool = field(False, help="revise each draft (gri-system: no, the system prompt alone)")


class GRISystem(GRI):
    name = "gri-system"
    summary = "GRI's first half: answer under a standard-answer system prompt, no revision"
    Config = GRISystemConfig
