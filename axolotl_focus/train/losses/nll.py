"""The per-token NLL loops over token chunks, from hidden states and lm_head weights:

* :class:`ChunkedTokenNLL`: the per-token NLL ``lse(z) - z[target]`` ``[N]``, backward recomputing
  each chunk's logits (RePAIR, :mod:`.margin`);
* :class:`FusedTokenNLLTerm`: a sum of per-token terms of the NLL whose gradient is known as soon as
  the chunk's NLL is, gradients in forward (DITTO, :mod:`.ditto`).

Memory ``O(chunk x vocab)`` whatever the number of tokens; the in-place numerics are
:mod:`.numerics`'.
"""

from __future__ import annotations

import torch

from .numerics import add_nll_grad_, logits_into, softmax_nll_


def chunk_buffers(hidden: torch.Tensor, weight: torch.Tensor, chunk_size: int):
    """Reused per-chunk buffers: fp32 logits ``[c, V]`` and, for a non-fp32 head, its staging copy."""
    c = max(1, min(chunk_size, hidden.shape[0]))
    z = torch.empty((c, weight.shape[0]), dtype=torch.float32, device=hidden.device)
    low = torch.empty_like(z, dtype=weight.dtype) if weight.dtype != torch.float32 else None
    return z, low


class ChunkedTokenNLL(torch.autograd.Function):
    """Per-token NLL ``lse(z) - z[target]`` from hidden states and lm_head weights, in chunks.

    Forward keeps only the ``[N]`` result; backward recomputes each chunk's logits, so memory
    stays ``O(chunk x vocab)`` whatever the number of tokens.
    """

    @staticmethod
    def forward(ctx, hidden, weight, target, chunk_size):
        out = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        z_buf, low = chunk_buffers(hidden, weight, chunk_size)
        for start in range(0, hidden.shape[0], chunk_size):
            end = min(start + chunk_size, hidden.shape[0])
            z = z_buf[: end - start]
            logits_into(z, hidden[start:end], weight, low)
            out[start:end] = softmax_nll_(z, target[start:end])
        ctx.save_for_backward(hidden, weight, target)
        ctx.chunk_size = chunk_size
        return out

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weight, target = ctx.saved_tensors
        grad_h = torch.zeros_like(hidden) if ctx.needs_input_grad[0] else None
        grad_w = (torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
                  if ctx.needs_input_grad[1] else None)
        z_buf, low = chunk_buffers(hidden, weight, ctx.chunk_size)
        for start in range(0, hidden.shape[0], ctx.chunk_size):
            end = min(start + ctx.chunk_size, hidden.shape[0])
            h, z = hidden[start:end], z_buf[: end - start]
            logits_into(z, h, weight, low)
            softmax_nll_(z, target[start:end])
            add_nll_grad_(z, target[start:end], grad_out[start:end], h, weight,
                          grad_h[start:end] if grad_h is not None else None, grad_w)
        return grad_h, (grad_w.to(weight.dtype) if grad_w is not None else None), None, None


class FusedTokenNLLTerm(torch.autograd.Function):
    """``sum_t term_t`` of per-token terms of the NLL of :class:`ChunkedTokenNLL`, in one pass over
    the chunks, for terms whose gradient is known as soon as the chunk's NLL is.

    ``term(*, nll, start, end) -> (value, coef)``, called with keywords: ``nll`` ``[N]`` is filled
    up to ``end`` (earlier chunks included), ``value`` is the sum of the terms of tokens
    ``start:end`` and ``coef`` ``[end - start]`` their derivative with respect to the tokens' own
    NLL. Forward computes the loss and both gradients (one logits matmul per chunk instead of a
    forward one plus a recomputation in backward); backward only scales them.
    """

    @staticmethod
    def forward(ctx, hidden, weight, target, term, chunk_size):
        n, dev = hidden.shape[0], hidden.device
        nll = torch.empty(n, dtype=torch.float32, device=dev)
        total = torch.zeros((), dtype=torch.float32, device=dev)
        grad_h = torch.zeros_like(hidden) if hidden.requires_grad else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=dev) if weight.requires_grad else None
        z_buf, low = chunk_buffers(hidden, weight, chunk_size)  # logits, then softmax, then gradient
        for start in range(0, n, chunk_size):
            end = min(start + chunk_size, n)
            h, z = hidden[start:end], z_buf[: end - start]
            logits_into(z, h, weight, low)
            nll[start:end] = softmax_nll_(z, target[start:end])
            value, coef = term(nll=nll, start=start, end=end)
            total += value
            add_nll_grad_(z, target[start:end], coef, h, weight,
                          grad_h[start:end] if grad_h is not None else None, grad_w)
        ctx.save_for_backward(grad_h, grad_w)
        ctx.head_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_total):
        grad_h, grad_w = ctx.saved_tensors
        if grad_h is not None:
            grad_h = grad_h * grad_total.to(grad_h.dtype)
        if grad_w is not None:
            grad_w = (grad_w * grad_total).to(ctx.head_dtype)
        return grad_h, grad_w, None, None, None
