"""Rendering of one mining prompt as the student sees it (step 1 of :mod:`axolotl_focus.mine.run`):
the prompt text and its token ids for ``MiningConfig.mode``; also used by the evaluation's tasks,
so that they prompt exactly as mining does.

* ``open_ended``: the first ``prefix_tokens`` tokens of the text (no special tokens), decoded and
  re-encoded with the tokenizer's special tokens (BOS), so that prompt text and ids agree.
* ``instruction``: the whole text, rendered with the tokenizer's chat template when it has one and
  ``chat_template`` is on (the rendered markup is the prompt text; no second BOS is added), else
  the raw text encoded with BOS.
"""

from __future__ import annotations

from ..generation import decode_text
from .config import MiningConfig

__all__ = ["encode_prompt"]


def encode_prompt(tokenizer, text: str, cfg: MiningConfig) -> tuple[str, list[int]]:
    """``(prompt_text, input_ids)`` of one prompt for ``cfg.mode`` (see the module docstring)."""
    if cfg.mode == "open_ended":
        head = tokenizer(text, add_special_tokens=False)["input_ids"][: cfg.prefix_tokens]
        ids = tokenizer(decode_text(tokenizer, head))["input_ids"]
        return decode_text(tokenizer, ids), list(ids)
    if cfg.chat_template and getattr(tokenizer, "chat_template", None):
        rendered = tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
        )
        return rendered, list(tokenizer(rendered, add_special_tokens=False)["input_ids"])
    return text, list(tokenizer(text)["input_ids"])
