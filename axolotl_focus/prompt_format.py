"""How a text becomes a prompt: mining renders its prompts this way and the evaluation renders its
tasks' prompts the same way, so that the student is prompted alike in both.

A :class:`PromptFormat` is three settings (any object with these attributes will do, e.g.
:class:`axolotl_focus.mine.config.MiningConfig`):

* ``mode="open_ended"``: the first ``prefix_tokens`` tokens of the text (no special tokens),
  decoded and re-encoded with the tokenizer's special tokens (BOS), so that prompt text and ids
  agree.
* ``mode="instruction"``: the whole text, rendered with the tokenizer's chat template when it has
  one and ``chat_template`` is on (the rendered markup is the prompt text; no second BOS is added),
  else the raw text encoded with BOS.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["MODES", "PromptFormat", "decode_text", "encode_prompt"]

MODES = ("open_ended", "instruction")


@dataclass(frozen=True)
class PromptFormat:
    """The prompt template (chat template or none), the open-ended prefix and, through them, BOS."""

    mode: str = "open_ended"
    prefix_tokens: int = 50
    chat_template: bool = True


def decode_text(tokenizer, ids: Sequence[int]) -> str:
    """The text of ``ids`` (special tokens skipped, no clean-up of tokenization spaces)."""
    return tokenizer.decode(list(ids), skip_special_tokens=True, clean_up_tokenization_spaces=False)


def encode_prompt(tokenizer, text: str, fmt: PromptFormat) -> tuple[str, list[int]]:
    """``(prompt_text, input_ids)`` of one prompt in the format ``fmt`` (see the module docstring)."""
    if fmt.mode == "open_ended":
        head = tokenizer(text, add_special_tokens=False)["input_ids"][: fmt.prefix_tokens]
        ids = tokenizer(decode_text(tokenizer, head))["input_ids"]
        return decode_text(tokenizer, ids), list(ids)
    if fmt.chat_template and getattr(tokenizer, "chat_template", None):
        rendered = tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
        )
        return rendered, list(tokenizer(rendered, add_special_tokens=False)["input_ids"])
    return text, list(tokenizer(text)["input_ids"])
