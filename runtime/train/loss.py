"""Cross-entropy over the vocabulary: full logits, or chunked so full logits never exist.

Contract (shared with the distributed runtime): every rank returns
``sum of its token losses / total label tokens of the global step`` and gradient reductions SUM,
so the gradient is that of the global mean loss whatever the world size, micro-batching or
sequence split.

``chunked_linear_cross_entropy`` projects and scores ``chunk_tokens`` tokens at a time. Its forward
also computes the gradients with respect to the hidden states and the lm_head weight (the softmax
of each chunk is the only thing backward needs), so backward only scales them: peak extra memory
is one chunk of logits plus a hidden-sized and a weight-sized gradient buffer, and no logits are
recomputed. The value and gradients equal the full loss (same math, different summation order).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
import torch.nn.functional as F

from ..observing import ThreadObserver

IGNORE_INDEX = -100
DEFAULT_CHUNK_TOKENS = 1024


_observer = ThreadObserver()


@contextlib.contextmanager
def representative_chunks(observer: Callable[[int], None]):
    """Tracing aid (fake tensors only): while active, the chunked loss runs one chunk of each
    distinct size instead of every chunk, calling `observer(repeats)` before that chunk's ops
    (`repeats`: how many chunks of that size the loop stands for) and `observer(0)` after them.
    Every full chunk runs the same ops on the same shapes, so the tracer scales the ops of the one
    it sees; the value computed is not the loss."""
    with _observer.installed(observer):
        yield


def _chunks(tokens: int, chunk_tokens: int):
    """(start, repeats) of the chunks the loop runs: every chunk, or one per distinct size."""
    observer = _observer.current()
    if observer is None:
        for start in range(0, tokens, chunk_tokens):
            yield start, 1
        return
    full, rest = divmod(tokens, chunk_tokens)
    for start, repeats in ((0, full), (full * chunk_tokens, 1 if rest else 0)):
        if repeats:
            observer(repeats)
            yield start, repeats
            observer(0)


def _upcast(x: torch.Tensor) -> torch.Tensor:
    """Scores are taken in at least fp32 (bf16 logits are upcast; fp64 stays fp64)."""
    return x.float() if x.element_size() < 4 else x


def full_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of token losses (ignoring IGNORE_INDEX) from full [..., vocab] logits (scored in fp32)."""
    return F.cross_entropy(_upcast(logits.reshape(-1, logits.shape[-1])), labels.reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction="sum")


class _ChunkedLinearCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk_tokens: int):
        need_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        total = torch.zeros((), dtype=_upcast(hidden[:0]).dtype, device=hidden.device)
        grad_hidden = torch.zeros_like(hidden) if ctx.needs_input_grad[0] else None
        # Accumulated in the weight's dtype (fp32 in parity runs); each chunk's product is exact fp32.
        grad_weight = torch.zeros_like(weight) if ctx.needs_input_grad[1] else None
        for start, _ in _chunks(hidden.shape[0], chunk_tokens):
            h = hidden[start: start + chunk_tokens]
            y = labels[start: start + chunk_tokens]
            logits = _upcast(h @ weight.t())
            valid = y != IGNORE_INDEX
            target = torch.where(valid, y, torch.zeros_like(y))
            lse = torch.logsumexp(logits, dim=-1)
            picked = logits.gather(1, target[:, None]).squeeze(1)
            total += torch.where(valid, lse - picked, torch.zeros_like(lse)).sum()
            if not need_grad:
                continue
            # d(loss_sum)/d(logits) = softmax - onehot, zero on ignored rows; reuse `logits` in place.
            grad_logits = logits.sub_(lse[:, None]).exp_()
            grad_logits.scatter_add_(1, target[:, None], torch.full_like(lse[:, None], -1.0))
            grad_logits.mul_(valid[:, None])
            g = grad_logits.to(hidden.dtype)
            if grad_hidden is not None:
                grad_hidden[start: start + chunk_tokens] = g @ weight
            if grad_weight is not None:
                grad_weight.addmm_(g.t(), h)
            del logits, grad_logits, g  # free this chunk before the next one is computed
        ctx.save_for_backward(grad_hidden, grad_weight)
        return total

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        grad_hidden, grad_weight = ctx.saved_tensors
        gh = grad_hidden * grad_out.to(grad_hidden.dtype) if grad_hidden is not None else None
        gw = grad_weight * grad_out.to(grad_weight.dtype) if grad_weight is not None else None
        return gh, gw, None, None


def chunked_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                                 chunk_tokens: int = DEFAULT_CHUNK_TOKENS) -> torch.Tensor:
    """Sum of token losses of `hidden @ weight.T` against `labels`, `chunk_tokens` tokens at a time."""
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be positive, got {chunk_tokens}")
    return _ChunkedLinearCE.apply(hidden.reshape(-1, hidden.shape[-1]), weight, labels.reshape(-1), chunk_tokens)


def token_loss_sum(model: torch.nn.Module, input_ids: torch.Tensor, labels: torch.Tensor,
                   positions: torch.Tensor | None = None, kind: str = "chunked",
                   chunk_tokens: int = DEFAULT_CHUNK_TOKENS, pixel_values: torch.Tensor | None = None) -> torch.Tensor:
    """Forward the model and return the sum of its token losses (an fp32 scalar). `pixel_values`:
    the images of a vision-language model's batch (their tokens are in `input_ids`).

    The loss runs *inside* the lm_head's module call (its forward is swapped for the loss for the
    duration of the call, through the model's own `forward`): FSDP2's hooks on the head and the
    root fire as for a logits forward, so the head's weight is the gathered one, its gradient is
    complete before the head's reduce-scatter, and the full logits never exist with 'chunked'."""
    if kind not in ("full", "chunked"):
        raise ValueError(f"loss kernel must be 'full' or 'chunked', got {kind!r}")
    head = model.lm_head

    def loss_head(hidden: torch.Tensor) -> torch.Tensor:
        weight = head.weight
        if kind == "full":
            return full_cross_entropy(F.linear(hidden, weight, head.bias), labels)
        if head.bias is not None:  # pragma: no cover - no supported architecture has an lm_head bias
            raise ValueError("the chunked loss does not support an lm_head bias; use kernels.loss: full")
        return chunked_linear_cross_entropy(hidden, weight, labels, chunk_tokens)

    if "forward" in head.__dict__:
        raise RuntimeError("lm_head already has an instance-level forward; token_loss_sum cannot wrap it")
    head.__dict__["forward"] = loss_head
    try:
        if pixel_values is not None:
            return model(input_ids, positions, pixel_values)
        return model(input_ids, positions)
    finally:
        head.__dict__.pop("forward", None)
