"""Blockwise attention (runtime/models/blockwise_attention.py) against the explicit masked softmax,
forward and float64 gradients, with the block size forced small so several blocks run."""

import pytest
import torch

from xplan.runtime.models import blockwise_attention as ba


def reference(q, k, v, scale, window, sinks, q_offset):
    sq, sk = q.shape[2], k.shape[2]
    q_pos = torch.arange(sq)[:, None] + q_offset
    k_pos = torch.arange(sk)[None, :]
    allowed = k_pos <= q_pos
    if window is not None:
        allowed &= q_pos - k_pos < window
    scores = (q @ k.transpose(-1, -2) * scale).masked_fill(~allowed, float("-inf"))
    if sinks is None:
        return scores.softmax(-1) @ v
    sink = sinks.reshape(1, -1, 1, 1).expand(q.shape[0], -1, sq, 1)
    return torch.cat([scores, sink], dim=-1).softmax(-1)[..., :-1] @ v


@pytest.fixture
def small_blocks(monkeypatch):
    monkeypatch.setattr(ba, "MIN_BLOCK_ROWS", 4)
    monkeypatch.setattr(ba, "MAX_BLOCKS", 5)


@pytest.mark.parametrize("window, with_sinks, q_offset, v_dim", [
    (None, False, 0, 3),  # MLA-like: value width unlike the query width
    (5, False, 0, 8),  # sliding window
    (None, True, 0, 8),  # GPT-OSS sinks
    (7, True, 3, 8),  # sinks + window + queries at an offset
])
def test_matches_the_masked_softmax_and_its_gradients(small_blocks, window, with_sinks, q_offset, v_dim):
    torch.manual_seed(0)
    q = torch.randn(1, 2, 21, 4, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, 2, 21 + q_offset, 4, dtype=torch.float64, requires_grad=True)
    v = torch.randn(1, 2, 21 + q_offset, v_dim, dtype=torch.float64, requires_grad=True)
    sinks = torch.randn(2, dtype=torch.float64, requires_grad=True) if with_sinks else None
    assert len(ba._plan(q, k, q_offset, window)[0]) == 5

    def run(q, k, v, sinks):
        return ba.blockwise_attention(q, k, v, 0.3, window, sinks, q_offset)

    out = run(q, k, v, sinks)
    torch.testing.assert_close(out, reference(q, k, v, 0.3, window, sinks, q_offset), rtol=0, atol=1e-12)
    assert torch.autograd.gradcheck(run, (q, k, v, sinks), fast_mode=True)


def test_block_rows_scale_with_the_sequence_only():
    assert ba.block_rows(4096) == ba.MIN_BLOCK_ROWS  # short sequences: few, larger blocks
    assert ba.block_rows(65536) == 65536 // ba.MAX_BLOCKS
    assert ba.block_rows(100) == 100


def test_kept_pairs_add_up_to_the_mask():
    blocks, kept_total = ba._plan(torch.empty(1, 1, 1000, 1), torch.empty(1, 1, 1000, 1), 0, 64)
    assert kept_total == sum(min(p + 1, 64) for p in range(1000))
    assert sum(b[4] for b in blocks) == kept_total
