"""Every attention implementation against the eager reference (runtime/kernels/attention.py), fp32,
forward and gradients, on the three shapes of attention the models have: GQA (Qwen3), sinks with a
sliding window (GPT-OSS) and unequal query/value widths (DeepSeek MLA).

On CPU: `sdpa` (default dispatch), `blockwise`, `eager` and the explicit-backend SDPA path (with
CPU's flash backend) with gradients; flex_attention forward only (torch 2.13 has no flex backward
on CPU; benchmarks/kernels_gpu.py checks it on CUDA). The cuDNN and memory-efficient backends and
npu_fusion_attention need their devices (benchmarks/kernels_gpu.py; no NPU check exists).
"""

from __future__ import annotations

import pytest
import torch

from tests.parity_utils import max_rel_err
from tests.test_distributed import make_config, make_model
from xplan.layout import Layout
from xplan.runtime.kernels import apply_kernels
from xplan.runtime.kernels.attention import attention_function, eager_attention, sdpa_with_backend
from xplan.runtime.kernels.flex import flex_attention_core

TOL = 1e-5
# name -> (q heads, kv heads, qk width, v width, window, sinks)
SHAPES = {
    "gqa": (4, 2, 16, 16, None, False),
    "gpt_oss_sliding": (4, 1, 8, 8, 6, True),
    "gpt_oss_full": (4, 1, 8, 8, None, True),
    "mla": (4, 4, 24, 16, None, False),
}


def inputs(shape: str, seq: int = 21, dtype=torch.float32, grad: bool = True):
    hq, hkv, d, dv, window, with_sinks = SHAPES[shape]
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, hq, seq, d, generator=gen, dtype=dtype)
    k = torch.randn(2, hkv, seq, d, generator=gen, dtype=dtype)
    v = torch.randn(2, hkv, seq, dv, generator=gen, dtype=dtype)
    sinks = torch.randn(hq, generator=gen, dtype=dtype) if with_sinks else None
    tensors = [t.requires_grad_(grad) for t in (q, k, v, sinks) if t is not None]
    return (q, k, v, sinks), tensors, d**-0.5, window


def masked_softmax_reference(q, k, v, scale, window, sinks):
    """Float64, written independently of the implementations: explicit loops over positions."""
    q, k, v = q.double(), k.double(), v.double()
    k = k.repeat_interleave(q.shape[1] // k.shape[1], 1)
    v = v.repeat_interleave(q.shape[1] // v.shape[1], 1)
    seq = q.shape[2]
    out = torch.zeros(*q.shape[:3], v.shape[-1], dtype=torch.float64)
    for i in range(seq):
        first = 0 if window is None else max(0, i - window + 1)
        logits = (q[:, :, i:i + 1] @ k[:, :, first:i + 1].transpose(-1, -2)).squeeze(2) * scale
        if sinks is not None:
            logits = torch.cat([logits, sinks.double().view(1, -1, 1).expand(q.shape[0], -1, 1)], dim=-1)
        probs = logits.softmax(-1)[..., :i + 1 - first]
        out[:, :, i] = (probs.unsqueeze(2) @ v[:, :, first:i + 1]).squeeze(2)
    return out


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_eager_is_the_masked_softmax(shape):
    (q, k, v, sinks), _, scale, window = inputs(shape, grad=False)
    ref = masked_softmax_reference(q, k, v, scale, window, sinks)
    assert max_rel_err(eager_attention(q, k, v, scale, window, sinks), ref) <= TOL


@pytest.mark.parametrize("shape", sorted(SHAPES))
@pytest.mark.parametrize("name", ["sdpa", "blockwise"])
def test_cpu_implementations_match_eager_with_gradients(shape, name):
    (q, k, v, sinks), tensors, scale, window = inputs(shape)
    out = attention_function(name)(q, k, v, scale, window, sinks, 0)
    ref = eager_attention(q, k, v, scale, window, sinks)
    assert max_rel_err(out, ref) <= TOL
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    got = torch.autograd.grad(out, tensors, grad)
    want = torch.autograd.grad(ref, tensors, grad)
    for a, b in zip(got, want, strict=True):
        assert max_rel_err(a, b) <= TOL


@pytest.mark.parametrize("native_gqa", [False, True])
@pytest.mark.parametrize("shape", ["gqa", "gpt_oss_sliding"])
def test_an_explicit_sdpa_backend_matches_eager(shape, native_gqa):
    """The explicit-backend path the `flash` choice takes on CUDA, run here with the one fused SDPA
    backend CPU has (flash); kv heads repeated or passed as they are (`enable_gqa`). Sinks and
    windows go to the blockwise path."""
    (q, k, v, sinks), tensors, scale, window = inputs(shape)
    out = sdpa_with_backend("sdpa(flash backend)", native_gqa)(q, k, v, scale, window, sinks, 0)
    ref = eager_attention(q, k, v, scale, window, sinks)
    assert max_rel_err(out, ref) <= TOL
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    for a, b in zip(torch.autograd.grad(out, tensors, grad), torch.autograd.grad(ref, tensors, grad), strict=True):
        assert max_rel_err(a, b) <= TOL


def test_an_explicit_backend_the_device_lacks_raises_instead_of_switching():
    (q, k, v, _), _, scale, _ = inputs("gqa", grad=False)
    with pytest.raises(RuntimeError, match="No viable backend"):
        sdpa_with_backend("sdpa(memory-efficient backend)")(q, k, v, scale)


UNCOMPILED_FLEX = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")


@UNCOMPILED_FLEX
@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_flex_attention_forward_matches_blockwise_on_cpu(shape):
    """flex_attention's mask_mod and the sink rescaling through its log-sum-exp, forward only
    (torch 2.13 runs flex uncompiled on CPU, with no backward)."""
    (q, k, v, sinks), _, scale, window = inputs(shape, seq=37, grad=False)
    got = flex_attention_core(q, k, v, scale, window, sinks, 0)
    want = attention_function("blockwise")(q, k, v, scale, window, sinks, 0)
    assert got.shape == want.shape
    assert max_rel_err(got, want) <= TOL


@UNCOMPILED_FLEX
def test_flex_attention_at_a_query_offset():
    (q, k, v, sinks), _, scale, window = inputs("gpt_oss_sliding", seq=24, grad=False)
    got = flex_attention_core(q[:, :, 8:], k, v, scale, window, sinks, 8)
    want = eager_attention(q, k, v, scale, window, sinks)[:, :, 8:]
    assert max_rel_err(got, want) <= TOL


@pytest.mark.parametrize("kind", ["gpt_oss", "deepseek_v3", "qwen3_moe"])
def test_eager_attention_in_the_model_matches_the_default_path(kind):
    """Same weights, `kernels.attention: eager` vs `sdpa` (SDPA / blockwise): logits and every
    parameter gradient within 1e-5."""
    torch.manual_seed(0)
    config = make_config(kind)
    ids = torch.randint(0, config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(3))
    results = {}
    for attention in ("sdpa", "eager"):
        model = make_model(config)
        layout = Layout(devices=1, fsdp=1, precision="fp32", kernels={"attention": attention, "elementwise": "eager"})
        assert apply_kernels(model, layout, "cpu")["attention"] == ("eager" if attention == "eager" else
                                                                    "sdpa" if kind == "qwen3_moe" else "blockwise")
        logits = model(ids)
        logits.float().logsumexp(-1).mean().backward()
        results[attention] = (logits.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    (logits, grads), (ref_logits, ref_grads) = results["eager"], results["sdpa"]
    assert max_rel_err(logits, ref_logits) <= TOL
    assert set(grads) == set(ref_grads)
    for name, grad in ref_grads.items():
        assert max_rel_err(grads[name], grad) <= TOL, name
