"""Sliding-window perplexity.

One token stream (BOS + the test text, no other specials; default text: the
open-ended default dataset's rows joined with blank lines, see
:func:`axolotl_focus.evaluate.data.ppl_source`); windows of ``window``
tokens start every ``stride`` tokens; each window scores only the tokens not scored before
(with the window's earlier tokens as context); the first token of the stream and, when
``stride == window``, the first token of every window are not scored. ``stride == window`` is
plain chunked NLL. PPL = exp(total NLL / scored tokens).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from tqdm.auto import tqdm


def perplexity(model, tokenizer, text: str | Sequence[int], window: int = 1024, stride: int = 512,
               max_tokens: int | None = None, progress: bool = False) -> dict:
    """Sliding-window perplexity of one token stream (see the module docstring for the exact rule).

    ``text``: a string (encoded as BOS + tokens) or token ids used as they are. Returns ``ppl``,
    ``nll`` (mean), ``tokens`` (stream length), ``scored`` tokens, ``window``, ``stride``.
    """
    if stride > window:
        raise ValueError(f"stride ({stride}) must be <= window ({window})")
    if isinstance(text, str):
        ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]  # windows follow: no length warning
        ids = ([tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []) + ids
    else:
        ids = list(text)
    ids = ids[:max_tokens] if max_tokens else ids
    limit = getattr(model.config, "max_position_embeddings", None)
    window = min(window, limit) if limit else window
    stride = min(stride, window)
    device = next(model.parameters()).device
    total, scored, prev_end = 0.0, 0, 0
    starts = list(range(0, max(len(ids) - 1, 1), stride))
    with torch.inference_mode():
        for begin in tqdm(starts, desc="perplexity", unit="window", disable=not progress):
            end = min(begin + window, len(ids))
            first = max(begin + 1, prev_end)  # first scored position in this window
            if end > first:
                x = torch.tensor([ids[begin:end]], device=device)
                logits = model(input_ids=x).logits[0, first - begin - 1 : end - begin - 1].float()
                total += torch.nn.functional.cross_entropy(logits, x[0, first - begin : end - begin],
                                                           reduction="sum").item()
                scored += end - first
            prev_end = end
            if end == len(ids):
                break
    nll = total / scored if scored else float("nan")
    return {"ppl": math.exp(nll) if scored else float("nan"), "nll": nll, "tokens": len(ids), "scored": scored,
            "window": window, "stride": stride}
