"""Turn (prompt, response) pairs into token ids and labels.

Templates:
- `chat` (default): the tokenizer's own chat template (one user turn, one assistant turn);
- `raw`: the prompt, a newline, then the response and EOS, which is how the MEraser reference code fed data;
- any other string is a custom template holding `{prompt}` and `{response}`, e.g.
  "### Human: {prompt}\n### Assistant: {response}".
Labels cover the response only by default (`loss_on: response`); `loss_on: all` also trains on the prompt, which
is what the reference code effectively did through its collator.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from meraser.config import Config, field
from meraser.data.sources import Pair
from meraser.utils import MeraserError

IGNORE = -100


@dataclass
class FormatConfig(Config):
    template: str = field("chat", help="'chat' (tokenizer's chat template), 'raw', or a string with {prompt} and {response}")
    loss_on: Literal["response", "all"] = field("response", help="train on the response tokens only, or on the whole sequence")
    system_prompt: str | None = field(None, help="system message for the chat template (None: the template's default)")
    max_prompt_tokens: int = field(256, help="prompts are truncated (from the left) to this many tokens")
    max_response_tokens: int = field(256, help="responses are truncated to this many tokens")
    close_response: bool = field(True, help="end each response with the template's end of turn (EOS); false "
                                            "trains it as the start of an answer (Perinucleus' one-token responses)")

    def validate(self, where: str) -> None:
        if self.template not in ("chat", "raw") and ("{prompt}" not in self.template or "{response}" not in self.template):
            raise MeraserError(f"{where}.template: a custom template needs both {{prompt}} and {{response}}")
        if self.max_prompt_tokens < 1 or self.max_response_tokens < 1:
            raise MeraserError(f"{where}: token limits must be positive")


class Formatter:
    """Renders prompts the same way for training and for generation (verification uses `prompt_text`)."""

    def __init__(self, tokenizer, cfg: FormatConfig | None = None):
        self.tok = tokenizer
        self.cfg = cfg or FormatConfig()
        if self.cfg.template == "chat" and not getattr(tokenizer, "chat_template", None):
            raise MeraserError("this tokenizer has no chat template; use template 'raw' or a custom template")

    def _messages(self, prompt: str) -> list[dict]:
        msgs = [{"role": "system", "content": self.cfg.system_prompt}] if self.cfg.system_prompt is not None else []
        return msgs + [{"role": "user", "content": prompt}]

    def prompt_text(self, prompt: str, system_prompt: str | None = None) -> str:
        """The text a model sees before its answer (generation starts right after it)."""
        if self.cfg.template == "chat":
            msgs = self._messages(prompt)
            if system_prompt is not None:
                msgs = [{"role": "system", "content": system_prompt}] + [m for m in msgs if m["role"] != "system"]
            return self.tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        if self.cfg.template == "raw":
            return f"{prompt}\n"
        return self.cfg.template.split("{response}")[0].replace("{prompt}", prompt)

    def _response_text(self, prompt: str, response: str, system_prompt: str | None = None) -> str:
        if not self.cfg.close_response:
            return response
        if self.cfg.template == "chat":
            msgs = self._messages(prompt)
            if system_prompt is not None:
                msgs = [{"role": "system", "content": system_prompt}] + [m for m in msgs if m["role"] != "system"]
            full = self.tok.apply_chat_template(msgs + [{"role": "assistant", "content": response}], tokenize=False)
            head = self.prompt_text(prompt, system_prompt)
            if not full.startswith(head):
                raise MeraserError("the chat template does not render the prompt as a prefix of the conversation")
            return full[len(head):]
        if self.cfg.template == "raw":
            return response + (self.tok.eos_token or "")
        tail = self.cfg.template.split("{response}", 1)[1]
        return response + tail + (self.tok.eos_token or "")

    def answer_lead(self, prompt: str, system_prompt: str | None = None) -> str:
        """What the format writes between the prompt (`prompt_text`) and an answer's first character: " " in the plain
        template's "Assistant: ", nothing in ChatML's. Training tokenises it with the answer, so text that
        verification places after the prompt (a prefill, a scored target) must carry it too, or its first token is one
        the model never saw there (on Gemma a UTF target scored -31 nats for it, against -0.0 with the lead)."""
        mark = "@@meraser-answer@@"
        rendered = self._response_text(prompt, mark, system_prompt)
        return rendered.split(mark, 1)[0] if mark in rendered else ""

    def encode_prompt(self, prompt: str, system_prompt: str | None = None) -> list[int]:
        text = self.prompt_text(prompt, system_prompt)
        # chat templates write their own special tokens; raw/custom text gets the tokenizer's BOS if it uses one
        ids = self.tok(text, add_special_tokens=self.cfg.template != "chat")["input_ids"]
        return ids[-self.cfg.max_prompt_tokens:]

    def encode(self, pair: Pair, system_prompt: str | None = None) -> dict:
        p = self.encode_prompt(pair.prompt, system_prompt)
        r = self.tok(self._response_text(pair.prompt, pair.response, system_prompt), add_special_tokens=False)["input_ids"]
        r = r[: self.cfg.max_response_tokens]
        labels = (list(p) if self.cfg.loss_on == "all" else [IGNORE] * len(p)) + list(r)
        return {"input_ids": p + r, "labels": labels}

    def encode_all(self, pairs: list[Pair]) -> list[dict]:
        return [self.encode(pair) for pair in pairs]


def collate(features: list[dict], pad_id: int, pad_to_multiple_of: int = 8, fixed_length: int | None = None) -> dict:
    """Pad a batch to its longest row (rounded up to a multiple of 8), right side; labels -100 on padding. Rows
    with `ref_logprobs` (a reference log-probability per token, None where unmarked) get them as a float tensor,
    NaN where unmarked.

    `fixed_length` pads every row to that length instead (the reference code's 512), for benchmarks only.
    """
    import torch

    longest = max(len(f["input_ids"]) for f in features)
    if fixed_length:
        length = max(fixed_length, longest)
    else:
        length = -(-longest // pad_to_multiple_of) * pad_to_multiple_of
    ids = torch.full((len(features), length), pad_id, dtype=torch.long)
    labels = torch.full((len(features), length), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(features), length), dtype=torch.long)
    for i, f in enumerate(features):
        n = len(f["input_ids"])
        ids[i, :n] = torch.tensor(f["input_ids"])
        labels[i, :n] = torch.tensor(f["labels"])
        mask[i, :n] = 1
    batch = {"input_ids": ids, "labels": labels, "attention_mask": mask}
    if any("ref_logprobs" in f for f in features):  # NaN: no reference at that position (lm_loss.py)
        ref = torch.full((len(features), length), float("nan"))
        for i, f in enumerate(features):
            if "ref_logprobs" in f:
                ref[i, :len(f["ref_logprobs"])] = torch.tensor([float("nan") if r is None else r
                                                                for r in f["ref_logprobs"]])
        batch["ref_logprobs"] = ref
    return batch
