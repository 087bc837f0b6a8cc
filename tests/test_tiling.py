"""Token tiling of the feed-forward half (runtime/models/tiling.py) computes what the untiled
block computes, for dense (Qwen3, Llama), Qwen3-MoE, DeepSeek-V3 (MLA, shared expert, first-k
dense) and GPT-OSS (expert biases, sinks, sliding window) models, under each recompute policy the
runtime combines with tiling, with tiles so small that most experts receive no token in a tile.

fp32: the loss within 1e-6, and every gradient within 1e-6 of the untiled one by norm
(||tiled - untiled|| / ||untiled||) unless the untiled fp32 gradient is itself further than 5e-7
from the fp64 result; then within twice that distance (tiled is as accurate as untiled). Tiling
only reorders sums over tokens (weight gradients are summed per tile), and a few gradients that
vanish in exact arithmetic (a key bias under softmax's shift invariance, router weights) are
fp32 noise on these tiny models: the untiled fp32 gradient of GPT-OSS's k_proj.bias is 1.7e-6
off the fp64 one. fp64: tiled and untiled agree elementwise to 1e-12 (DeepSeek-V3 to 1e-6: its
router scores tokens in fp32 whatever the model dtype, and an fp32 GEMM's rows depend on its
height)."""

from __future__ import annotations

import copy

import pytest
import torch

from tests.trace_configs import TINY, tiny_config
from xplan.layout_tiles import tile_count
from xplan.runtime import build_model
from xplan.runtime.models.tiling import TokenTiling, current_tile, run_in_tiles, tile_sizes
from xplan.runtime.recompute import apply_recompute

pytestmark = pytest.mark.usefixtures("one_thread")

TOL = 1e-6  # fp32: loss, and each gradient by norm
TOL_FP64 = 1e-12  # fp64: loss and every gradient element (relative to the tensor's largest)
TOL_FP64_FP32_ROUTER = 1e-6  # DeepSeek-V3's router runs in fp32 inside an fp64 model
LLAMA = dict(model_type="llama", vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False)
FAMILIES = ["qwen3", "llama", "qwen3_moe", "deepseek_v3", "gpt_oss"]


def config_of(family: str):
    if family == "llama":
        from xplan.runtime.models.config import model_config_from_dict

        return model_config_from_dict(dict(LLAMA), name="tiny-llama")
    return tiny_config(family)


def seeded_model(config, dtype=torch.float32):
    """Model with non-trivial norms, biases, sinks and routing biases (so no path is trivially zero)."""
    model = build_model(config, dtype=torch.float32, seed=0)
    if dtype == torch.float64:
        model = model.double()
        for module in model.modules():  # torch._grouped_mm takes no fp64
            if hasattr(module, "grouped_gemm"):
                module.grouped_gemm = "loop"
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            elif name.endswith("sinks") or "bias" in name.rsplit(".", 1)[-1]:
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
            elif name.endswith(("gate.weight", "router.weight")):  # routers start at zero: make them route
                p.copy_(0.5 * torch.randn(p.shape, generator=gen))
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.01 * torch.randn(b.shape, generator=gen))
    return model


def loss_and_grads(model, ids):
    logits = model(ids)
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest elementwise difference over the reference's largest magnitude."""
    a, b = a.double(), b.double()
    scale = b.abs().max().item()
    return (a - b).abs().max().item() / (scale if scale > 0 else 1.0)


def norm_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    scale = b.norm().item()
    return (a - b).norm().item() / (scale if scale > 0 else 1.0)


def compare(model, tiling: TokenTiling, policy: str, ids, prepare=None) -> tuple[float, float, float, str]:
    """(loss error, worst gradient max-relative error, worst gradient norm error, its parameter);
    `prepare(tiled_model)` runs before the tiled step."""
    ref_loss, ref_grads = loss_and_grads(model, ids)
    tiled = tiled_copy(model, tiling, policy)
    if prepare is not None:
        prepare(tiled)
    loss, grads = loss_and_grads(tiled, ids)
    assert set(grads) == set(ref_grads)
    worst_max = max(rel_err(grads[n], ref_grads[n]) for n in ref_grads)
    worst_norm, name = max((norm_err(grads[n], ref_grads[n]), n) for n in ref_grads)
    return rel_err(loss, ref_loss), worst_max, worst_norm, name


def tiled_copy(model, tiling: TokenTiling, policy: str):
    tiled = copy.deepcopy(model)
    for layer in tiled.model.layers:
        layer.token_tiling = tiling
        apply_recompute(layer, policy)
    return tiled


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("policy", ["none", "full"])
def test_tiled_blocks_equal_untiled(family, policy):
    config = config_of(family)
    ids = torch.randint(0, config.vocab_size, (2, 23), generator=torch.Generator().manual_seed(7))
    # 46 tokens in tiles of at most 5 (10 tiles of 5 and 4 tokens): every MoE tile leaves experts empty.
    tiling = TokenTiling(tile_tokens=5)
    model32, model64 = seeded_model(config), seeded_model(config, torch.float64)
    ref_loss, ref = loss_and_grads(model32, ids)
    loss, got = loss_and_grads(tiled_copy(model32, tiling, policy), ids)
    _, exact = loss_and_grads(model64, ids)
    assert rel_err(loss, ref_loss) <= TOL
    for name in ref:
        allowed = max(TOL, 2 * norm_err(ref[name], exact[name]))
        err = norm_err(got[name], ref[name])
        assert err <= allowed, f"{family}/{policy} fp32: gradient of {name} differs by {err:.2e} (allowed {allowed:.2e})"
    tol = TOL_FP64_FP32_ROUTER if family == "deepseek_v3" else TOL_FP64
    loss, worst, _, _ = compare(model64, tiling, policy, ids)
    assert loss <= tol and worst <= tol, f"{family}/{policy} fp64: loss {loss:.2e}, gradients {worst:.2e}"


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3", "gpt_oss"])
def test_moe_tiles_leave_experts_empty(family):
    """Tiles of one to five tokens: experts with no row in a tile (the grouped GEMM's empty groups)
    are common, and results still match (fp32 on the grouped_mm path above; here fp64 on the loop
    path, elementwise)."""
    config = tiny_config(family)
    ids = torch.randint(0, config.vocab_size, (1, 9), generator=torch.Generator().manual_seed(3))
    model = seeded_model(config, torch.float64)
    empty = []

    def count_empty_experts(tiled):
        for moe in (m for m in tiled.modules() if hasattr(m, "experts")):
            moe.experts.register_forward_pre_hook(lambda module, args: empty.append(int((args[1] == 0).sum())))

    for tiles in (9, 2):  # one-token tiles, then tiles of 5 and 4 tokens
        loss, worst, _, _ = compare(model, TokenTiling(tiles=tiles), "none", ids, count_empty_experts)
        tol = TOL_FP64_FP32_ROUTER if family == "deepseek_v3" else TOL_FP64
        assert loss <= tol and worst <= tol, f"{family} {tiles} tiles: loss {loss:.2e}, gradients {worst:.2e}"
    assert empty and min(empty) > 0, "every tile should leave some expert without tokens"


def test_tile_sizes_and_counts():
    assert tile_count(65536, 8192) == 8 and tile_count(65536, None) == 1 and tile_count(65536, 0) == 1
    assert tile_count(8192, 8192) == 1 and tile_count(8193, 8192) == 2
    assert tile_sizes(10, 4) == [3, 3, 2, 2] and sum(tile_sizes(65537, 8)) == 65537
    assert TokenTiling(tiles=8).count(6) == 6 and TokenTiling(tile_tokens=3).count(10) == 4


def test_each_tile_runs_alone_under_its_checkpoint():
    """Tiles see their own tokens, in order; in backward each tile's forward runs again (the recompute)."""
    seen = []

    def fn(piece):
        tile = current_tile()
        seen.append((tile.index, tile.tokens, torch.is_grad_enabled()))
        return piece.sin()  # sin keeps its input: the backward needs the tile's forward again

    x = torch.randn(2, 5, 3, requires_grad=True)
    out = run_in_tiles(fn, x, 3)
    assert out.shape == x.shape and torch.equal(out, x.sin())
    assert [s[:2] for s in seen] == [(0, 4), (1, 3), (2, 3)]
    out.sum().backward()
    assert torch.allclose(x.grad, x.detach().cos())
    assert [s[0] for s in seen[3:]] == [2, 1, 0]  # recomputed last tile first, one at a time
    assert current_tile() is None


def test_tiny_configs_cover_every_family():
    assert {f for f in FAMILIES if f != "llama"} == set(TINY)


@pytest.mark.parametrize("family", ["qwen3", "gpt_oss", "deepseek_v3"])
def test_traced_attention_keeps_no_score_matrix(family):
    """The attention the planner prices (tiled or not) holds no [heads, seq, seq] scores: SDPA's
    fused kernel (plain causal attention) no [seq, seq] tensor at all, the blockwise path (sinks,
    windows, MLA) one block of query rows at a time (runtime/models/blockwise_attention.py),
    forward and backward."""
    from xplan.planner.trace import trace_model
    from xplan.runtime.models.blockwise_attention import block_rows

    seq = 4096
    config = tiny_config(family)
    trace = trace_model(config, seq, use_cache=False, loss="chunked", tiles=4)
    largest = 0
    for _, d in trace.graph.nodes(data=True):
        if d.get("type") == "op" and d.get("module", "").startswith("self_attn") and d.get("out_shape"):
            elements = 1
            for size in d["out_shape"].split("x"):
                elements *= int(size)
            largest = max(largest, elements)
    if family == "qwen3":
        assert largest < seq * seq, largest
    else:
        assert largest <= config.num_heads * block_rows(seq) * seq < config.num_heads * seq * seq, largest
