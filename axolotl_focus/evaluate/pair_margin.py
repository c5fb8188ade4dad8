"""The held-out pair margin: does a model prefer the teacher's continuation to the loop?

For a RePAIR pair row (:mod:`axolotl_focus.pair_rows`) and a model, ``l+`` / ``l-`` are the model's
mean token NLL of the chosen / rejected continuation after the shared prompt (the quantities of
the RePAIR loss, exactly as the trainer computes them on the recorded token ids), and the pair's
margin is ``l- - l+`` in nats per token: positive when the model finds the loop less likely than the
teacher's continuation. On pairs kept out of training it shows whether a training term moved the
model at all; it is a diagnostic, not one of the paper's metrics.
"""

from __future__ import annotations

import torch

from ..pair_rows import pair_ids

__all__ = ["pair_margins"]


@torch.inference_mode()
def pair_margins(model, tokenizer, rows: list[dict]) -> list[float]:
    """``l- - l+`` of every row (one forward per continuation, on the model's device)."""
    device = next(model.parameters()).device
    out = []
    for row in rows:
        prompt, chosen, rejected = pair_ids(tokenizer, row)
        nll = []
        for cont in (chosen, rejected):
            ids = torch.tensor([list(prompt) + list(cont)], device=device)
            logits = model(input_ids=ids).logits[0, len(prompt) - 1 : -1].float()
            nll.append(torch.nn.functional.cross_entropy(logits, torch.tensor(cont, device=device)).item())
        out.append(nll[1] - nll[0])
    return out
