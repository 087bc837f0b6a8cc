"""Helpers for comparing xplan's models with the transformers reference (tests only)."""

from __future__ import annotations

import torch


def max_rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|: the relative error the parity acceptance uses."""
    a, b = a.detach().double(), b.detach().double()
    denom = b.abs().max().item()
    return (a - b).abs().max().item() / (denom if denom > 0 else 1.0)


def ce_loss(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Next-token cross entropy, identical for both models."""
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).float(), input_ids[:, 1:].reshape(-1)
    )


def hf_grads_in_local_names(hf_model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Gradients of a transformers model keyed like xplan's parameters.

    transformers 5.x stores routed experts fused: `experts.gate_up_proj` [E, 2I, H] (gate, then
    up); xplan keeps `experts.gate_proj` and `experts.up_proj` [E, I, H].
    """
    grads = {}
    for name, param in hf_model.named_parameters():
        if param.grad is None:
            continue
        if name.endswith("experts.gate_up_proj") and param.dim() == 3:
            gate, up = param.grad.chunk(2, dim=1)
            base = name[: -len("gate_up_proj")]
            grads[base + "gate_proj"], grads[base + "up_proj"] = gate, up
        else:
            grads[name] = param.grad
    return grads


def local_grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.grad for name, p in model.named_parameters() if p.grad is not None}


def assert_grads_match(ours: dict[str, torch.Tensor], ref: dict[str, torch.Tensor], tol: float = 1e-5) -> None:
    missing = sorted(set(ref) - set(ours))
    extra = sorted(set(ours) - set(ref))
    assert not missing and not extra, f"gradient names differ: missing {missing[:5]}, extra {extra[:5]}"
    worst = max(((max_rel_err(ours[k], ref[k]), k) for k in ref), default=(0.0, ""))
    assert worst[0] <= tol, f"gradient of {worst[1]} differs: relative error {worst[0]:.2e}"
