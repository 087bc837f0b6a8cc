"""FSDP2's warning "FSDP2-wrapped module (FSDPSwiGLUExperts) returned a view tensor ... will silently
drop the pre-backward hook": the grouped expert GEMM now returns a fresh tensor, so an expert
unit wrapped the way expert parallelism wraps it (its own `fully_shard`) returns no view, FSDP2
does not warn, and gradients after the reduce-scatter equal the unwrapped module's (2 gloo ranks)."""

from __future__ import annotations

import copy
import warnings

import torch

from xplan.runtime.distributed.testing import spawn
from xplan.runtime.models.gpt_oss import ClampedSwiGLUExperts
from xplan.runtime.models.moe import SwiGLUExperts

TOKENS_PER_EXPERT = [3, 0, 5, 2]  # ragged, one empty expert


def make_experts(kind: str) -> torch.nn.Module:
    torch.manual_seed(0)
    module = SwiGLUExperts(4, 16, 8) if kind == "swiglu" else ClampedSwiGLUExperts(4, 16, 8, limit=1.5)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(0.3 * torch.randn(p.shape))
    return module


def worker(rank: int, world: int, out_path: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world,))
    results = {}
    for kind in ("swiglu", "clamped"):
        wrapped = make_experts(kind)
        reference = copy.deepcopy(wrapped)
        fully_shard(wrapped, mesh=mesh)
        x = torch.randn(sum(TOKENS_PER_EXPERT), 16, generator=torch.Generator().manual_seed(1))
        counts = torch.tensor(TOKENS_PER_EXPERT)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out = wrapped(x, counts)
        views = [str(w.message) for w in caught if "returned a view tensor" in str(w.message)]
        out.sum().backward()  # a stride-0 gradient: the grouped GEMM makes it contiguous
        reference(x, counts).sum().backward()
        # Each rank ran the same tokens: FSDP2's default average over the 2 ranks is the one-rank gradient.
        errors = {name: (p.grad.full_tensor() - dict(reference.named_parameters())[name].grad).abs().max().item()
                  for name, p in wrapped.named_parameters()}
        results[kind] = {"is_view": out._base is not None, "warnings": views, "errors": errors}
    if rank == 0:
        torch.save(results, out_path)


def test_expert_units_return_fresh_tensors_and_reduce_correctly(tmp_path):
    out = tmp_path / "results.pt"
    spawn(worker, 2, str(out))
    for kind, result in torch.load(out).items():
        assert not result["is_view"], kind
        assert result["warnings"] == [], kind
        assert max(result["errors"].values()) <= 1e-6, (kind, result["errors"])
