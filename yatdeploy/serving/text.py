"""A served decoder's text: its tokenizer (the tokenizer.json yatdeploy.genai wrote beside the export) as the server
uses it: prompts encoded, generated ids decoded as they come, the end token, and the chat template.

The file is read by yatdeploy.genai (the same checks as export's `--tokenizer`); Hugging Face's `tokenizers`
library runs it, and a chat template (tokenizer_config.json's `chat_template`, Jinja) is rendered in Jinja's
sandbox, as transformers renders it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from yatdeploy.errors import YatDeployError
from yatdeploy.genai import TOKENIZER_JSON, Tokenizer, read_tokenizer

REPLACEMENT = "\ufffd"  # what a decoder gives for an incomplete UTF-8 sequence: held back until it completes


@dataclass(frozen=True)
class TextCodec:
    tokenizer: Tokenizer
    _runner: object  # tokenizers.Tokenizer

    @staticmethod
    def beside(onnx_path: str | Path) -> TextCodec | None:
        """The tokenizer in the export's folder, or None when it has none (then prompts are token ids only)."""
        path = Path(onnx_path).with_name(TOKENIZER_JSON)
        if not path.is_file():
            return None
        return TextCodec.of(read_tokenizer(path))

    @staticmethod
    def of(tokenizer: Tokenizer) -> TextCodec:
        import json

        from tokenizers import Tokenizer as Runner

        try:
            runner = Runner.from_str(json.dumps(tokenizer.content))
        except Exception as exc:  # tokenizers raises its own Exception subclass
            raise YatDeployError(f"tokenizer {tokenizer.source}: the tokenizers library can't read it: {exc}") from None
        return TextCodec(tokenizer, runner)

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        return () if self.tokenizer.eos_token_id is None else (self.tokenizer.eos_token_id,)

    @property
    def chat_template(self) -> str | None:
        template = self.tokenizer.config.get("chat_template")
        return template if isinstance(template, str) and template.strip() else None

    def encode(self, text: str) -> list[int]:
        return list(self._runner.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: Sequence[int]) -> str:
        return self._runner.decode(list(ids), skip_special_tokens=True)

    def render_chat(self, messages: Sequence[Mapping[str, object]]) -> str:
        """The conversation as the prompt text its chat template makes, ending where the assistant speaks."""
        from jinja2 import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        template = self.chat_template
        if template is None:
            raise YatDeployError("the model's tokenizer has no chat template (tokenizer_config.json chat_template)")
        config = self.tokenizer.config
        try:
            return ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True).from_string(template).render(
                messages=list(messages), add_generation_prompt=True,
                bos_token=_token_text(config.get("bos_token")), eos_token=_token_text(config.get("eos_token")))
        except TemplateError as exc:
            raise YatDeployError(f"the chat template can't render these messages: {exc}") from None


def _token_text(token: object) -> str:
    if isinstance(token, dict):
        token = token.get("content")
    return token if isinstance(token, str) else ""


class IncrementalText:
    """Generated ids turned into text as they come: each `add` gives the text the new id completes (decoding the
    whole generation each time, since a token can change how the previous ones read), holding back an incomplete
    UTF-8 sequence until its last byte arrives."""

    def __init__(self, codec: TextCodec) -> None:
        self.codec = codec
        self.ids: list[int] = []
        self.text = ""  # the text given out so far

    def add(self, token_id: int) -> str:
        self.ids.append(token_id)
        full = self.codec.decode(self.ids)
        ready = full.rstrip(REPLACEMENT)
        if len(ready) <= len(self.text):
            return ""
        # Past what was given out (a decoder that reads earlier text differently once more follows, which byte-level
        # ones don't, would have that part differ: it was sent already).
        new, self.text = ready[len(self.text):], ready
        return new

    def flush(self) -> str:
        """At the end: whatever was held back."""
        full = self.codec.decode(self.ids)
        new = full[len(self.text):]
        self.text += new
        return new
