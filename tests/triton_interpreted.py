"""The Triton kernels (runtime/kernels/triton_*.py) on CPU under TRITON_INTERPRET=1, against float64
torch references, gradients included: fused RMSNorm, and MoE token permutation / unpermutation
with ragged and empty experts and no tokens at all. Sizes are tiny: the interpreter runs each
program in Python.

Run by tests/test_triton_kernels.py in a fresh process with TRITON_INTERPRET=1: the variable is
read when Triton and each kernel are first imported, and in a shared pytest process torch may
import Triton earlier (torch._dynamo does).
"""

from __future__ import annotations

import os

import pytest
import torch

from tests.parity_utils import max_rel_err
from tests.test_distributed import make_config, make_model
from xplan.layout import Layout
from xplan.runtime.kernels import apply_kernels
from xplan.runtime.kernels import triton_permute as permute_module
from xplan.runtime.kernels import triton_rmsnorm as rmsnorm_module
from xplan.runtime.models.layers import RMSNorm

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("run through tests/test_triton_kernels.py (needs TRITON_INTERPRET=1 from the start)",
                allow_module_level=True)
F64 = torch.float64


def rms_norm_reference(x, weight, eps):
    return weight * x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps)


@pytest.mark.parametrize("shape", [(3, 5, 12), (4, 1), (9, 33), (0, 7)])
def test_rms_norm_matches_float64_reference_with_gradients(shape):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(shape, dtype=F64, generator=gen, requires_grad=True)
    weight = torch.randn(shape[-1], dtype=F64, generator=gen, requires_grad=True)
    out = rmsnorm_module.triton_rms_norm(x, weight, 1e-6)
    ref = rms_norm_reference(x, weight, 1e-6)
    assert out.shape == ref.shape and out._base is None
    grad = torch.randn(shape, dtype=F64, generator=gen)
    got, want = torch.autograd.grad(out, (x, weight), grad), torch.autograd.grad(ref, (x, weight), grad)
    if x.numel():
        torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(got[0], want[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got[1], want[1], rtol=1e-12, atol=1e-12)


def test_rms_norm_rounds_like_the_module_in_bf16():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(6, 5, 48, generator=gen).bfloat16()
    module = RMSNorm(48, 1e-6).bfloat16()
    with torch.no_grad():
        module.weight.copy_(torch.rand(48, generator=gen) + 0.5)
    got = rmsnorm_module.triton_rms_norm(x, module.weight, 1e-6).float()
    want = module(x).float()
    # Same formula and the same two roundings to bf16, but the interpreter truncates where a GPU
    # rounds to nearest: up to one bf16 ulp per rounding (benchmarks/kernels_gpu.py checks on GPU).
    assert ((got - want).abs() <= want.abs() * 2**-6).all()


def routed(tokens: int, experts: int, top_k: int, empty: tuple[int, ...], seed: int):
    """Expert ids [tokens, top_k] (distinct per token, never in `empty`) and weights."""
    gen = torch.Generator().manual_seed(seed)
    allowed = torch.tensor([e for e in range(experts) if e not in empty])
    ids = torch.stack([allowed[torch.randperm(len(allowed), generator=gen)[:top_k]] for _ in range(tokens)]) \
        if tokens else torch.zeros(0, top_k, dtype=torch.long)
    return ids, torch.rand(tokens, top_k, dtype=F64, generator=gen)


def torch_dispatch(x, ids, experts, top_k):
    """The model's own dispatch (runtime/models/moe.py): a stable argsort by expert."""
    order = torch.argsort(ids.reshape(-1), stable=True)
    return x[order // top_k], torch.bincount(ids.reshape(-1), minlength=experts), order


def torch_combine(y_sorted, weights, order):
    y = torch.empty_like(y_sorted)
    y[order] = y_sorted
    return (y.view(*weights.shape, y_sorted.shape[1]) * weights.unsqueeze(-1)).sum(dim=1)


@pytest.mark.parametrize("tokens, width, experts, top_k, empty", [
    (7, 5, 6, 2, (1, 4)),  # ragged, two experts get no token
    (33, 70, 9, 3, ()),  # several entry blocks, columns over one copy step
    (5, 3, 130, 4, ()),  # more experts than a power of two below, most of them empty
    (0, 4, 3, 2, ()),  # no tokens
])
def test_permute_and_unpermute_match_the_torch_path(tokens, width, experts, top_k, empty):
    ids, weights = routed(tokens, experts, top_k, empty, seed=tokens)
    x = torch.randn(tokens, width, dtype=F64, generator=torch.Generator().manual_seed(2), requires_grad=True)
    weights.requires_grad_(True)
    permuter = permute_module.TritonTokenPermuter()

    x_sorted, counts, position = permuter.permute(x, ids, experts, top_k)
    ref_sorted, ref_counts, order = torch_dispatch(x, ids, experts, top_k)
    assert torch.equal(counts, ref_counts) and counts.dtype == torch.int64
    assert all(counts[e] == 0 for e in empty)
    assert torch.equal(x_sorted, ref_sorted)  # a copy: bit-exact, same (stable) order
    assert torch.equal(position[order], torch.arange(tokens * top_k))  # position inverts the sort

    def experts_fn(rows):  # something row-wise and nonlinear between the two
        return torch.tanh(rows) * 1.5

    out = permuter.unpermute(experts_fn(x_sorted), weights, position)
    ref = torch_combine(experts_fn(ref_sorted), weights, order)
    assert out.shape == (tokens, width)
    grad = torch.randn(tokens, width, dtype=F64, generator=torch.Generator().manual_seed(3))
    got = torch.autograd.grad(out, (x, weights), grad)
    want = torch.autograd.grad(ref, (x, weights), grad)
    if tokens:
        torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_cuda_kernel_selection_runs_the_model_like_the_torch_path():
    """The modules `apply_kernels` equips for CUDA (Triton permutation and RMSNorm), run here on
    CPU tensors under the interpreter: a tiny MoE model's loss and gradients equal the CPU path's."""
    config = make_config("qwen3_moe")
    ids = torch.randint(0, config.vocab_size, (1, 6), generator=torch.Generator().manual_seed(4))
    results = {}
    for device_type in ("cpu", "cuda"):
        model = make_model(config)
        layout = Layout(devices=1, fsdp=1, precision="fp32", kernels={"elementwise": "fused"})
        executed = apply_kernels(model, layout, device_type, triton_ok=lambda: True)
        assert executed["permute"] == ("triton" if device_type == "cuda" else "torch")
        loss = model(ids).logsumexp(-1).mean()
        loss.backward()
        results[device_type] = (loss.detach(), {n: p.grad for n, p in model.named_parameters()})
    (loss, grads), (ref_loss, ref_grads) = results["cuda"], results["cpu"]
    assert max_rel_err(loss, ref_loss) <= 1e-5
    for name, grad in ref_grads.items():
        assert max_rel_err(grads[name], grad) <= 1e-5, name
