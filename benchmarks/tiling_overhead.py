"""What token tiling of the feed-forward half costs: measured step time (CPU, real tensors) of a small
model tiled vs untiled, next to the cost model's prediction of the same ratio.

    python benchmarks/tiling_overhead.py                   # ~3 min on 2 shared cores
    python benchmarks/tiling_overhead.py --steps 3 --models moe --json out.json

For each model (a small Qwen3-MoE and a small dense Qwen3), recompute policy (none, full) and tile
size, one process runs the runtime's own model at world size 1 in fp32 (what `xplan run` runs
there: no FSDP wrapping) with the runtime's chunked loss and AdamW: `--steps` measured steps after
one warm-up, median step time. The prediction is `planner.pricing.price` on the `cpu` profile (or
--profile) for the same layout, `kernels.elementwise = eager`. Overhead = tiled / untiled step time
- 1; the table prints both and their ratio (predicted / measured of the tiled-to-untiled step-time
ratio; 1.00 = the cost model's overhead is exact). The untiled and tiled runs of one row
alternate step by step, so they share the machine's noise.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

MODELS = {
    "moe": {"model_type": "qwen3_moe", "vocab_size": 4096, "hidden_size": 512, "intermediate_size": 1024,
            "num_hidden_layers": 2, "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 64,
            "num_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 512, "norm_topk_prob": True,
            "max_position_embeddings": 8192, "tie_word_embeddings": False},
    "dense": {"model_type": "qwen3", "vocab_size": 4096, "hidden_size": 512, "intermediate_size": 2048,
              "num_hidden_layers": 2, "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 64,
              "max_position_embeddings": 8192, "tie_word_embeddings": False},
}
KERNELS = {"attention": "sdpa", "moe_gemm": "grouped_mm", "loss": "chunked", "elementwise": "eager"}


def layout_of(recompute: str, tile_tokens: int | None):
    from xplan.layout import Layout

    return Layout(devices=1, fsdp=1, micro_batch=1, precision="fp32", recompute=recompute, tile_tokens=tile_tokens,
                  kernels=dict(KERNELS))


def predicted_step(model_dir: str, profile: str, seq_len: int, layout) -> float:
    from xplan.planner.pricing import Workload, price

    return price(Workload(model_dir, profile, seq_len, 1), layout).step_time_s


def make_model(model_dir: str, layout):
    """The runtime's model as a world-1 fp32 run builds it, with the layout's tiling and recompute."""
    import torch

    from xplan.runtime import build_model, load_config
    from xplan.runtime.models.tiling import TokenTiling
    from xplan.runtime.recompute import apply_recompute

    model = build_model(load_config(model_dir), dtype=torch.float32, seed=0)
    tiling = TokenTiling(tile_tokens=layout.tile_tokens) if layout.tile_tokens else None
    for block, policy in zip(model.model.layers, layout.recompute_policies(len(model.model.layers)), strict=True):
        block.token_tiling = tiling
        apply_recompute(block, policy)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)
    return model, optimizer


def step_once(model, optimizer, ids, labels) -> float:
    from xplan.runtime.train.loss import token_loss_sum

    start = time.perf_counter()
    optimizer.zero_grad(set_to_none=True)
    loss = token_loss_sum(model, ids, labels, kind=KERNELS["loss"]) / labels.numel()
    loss.backward()
    optimizer.step()
    return time.perf_counter() - start


def measure_pair(model_dir: str, seq_len: int, untiled, tiled, steps: int) -> tuple[float, float]:
    """Median step seconds of the two layouts, their steps interleaved (one warm-up step each)."""
    import torch

    gen = torch.Generator().manual_seed(0)
    vocab = json.loads((Path(model_dir) / "config.json").read_text())["vocab_size"]
    ids = torch.randint(0, vocab, (1, seq_len), generator=gen)
    labels = torch.roll(ids, -1, dims=1)
    runs = [make_model(model_dir, untiled), make_model(model_dir, tiled)]
    for model, optimizer in runs:
        step_once(model, optimizer, ids, labels)
    times: list[list[float]] = [[], []]
    for _ in range(steps):
        for i, (model, optimizer) in enumerate(runs):
            times[i].append(step_once(model, optimizer, ids, labels))
    return statistics.median(times[0]), statistics.median(times[1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="moe,dense", help="comma-separated: " + ", ".join(MODELS))
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--tiles", default="2048,1024", help="tile sizes (tokens), comma-separated")
    parser.add_argument("--recompute", default="none,full")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the cpu profile's calibration)")
    parser.add_argument("--profile", default="cpu", help="hardware profile the prediction uses")
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args(argv)

    import torch

    from xplan.layout_tiles import feed_forward_tiles

    torch.set_num_threads(args.threads)
    rows = []
    header = (f"{'model':6s} {'recompute':9s} {'tile':>5s} {'tiles':>5s}  {'untiled s':>9s} {'tiled s':>8s}  "
              f"{'measured':>8s} {'predicted':>9s}  {'ratio':>5s}")
    print(header)
    print("-" * len(header))
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            model_dir = Path(tmp) / name
            model_dir.mkdir()
            (model_dir / "config.json").write_text(json.dumps(MODELS[name]))
            for recompute in args.recompute.split(","):
                untiled = layout_of(recompute, None)
                predicted_untiled = predicted_step(str(model_dir), args.profile, args.seq_len, untiled)
                for tile in (int(t) for t in args.tiles.split(",")):
                    tiled = layout_of(recompute, tile)
                    predicted_tiled = predicted_step(str(model_dir), args.profile, args.seq_len, tiled)
                    measured_untiled, measured_tiled = measure_pair(str(model_dir), args.seq_len, untiled, tiled,
                                                                    args.steps)
                    measured = measured_tiled / measured_untiled
                    predicted = predicted_tiled / predicted_untiled
                    row = {"model": name, "recompute": recompute, "tile_tokens": tile,
                           "tiles": feed_forward_tiles(tiled, args.seq_len), "measured_untiled_s": measured_untiled,
                           "measured_tiled_s": measured_tiled, "measured_overhead": measured - 1,
                           "predicted_untiled_s": predicted_untiled, "predicted_tiled_s": predicted_tiled,
                           "predicted_overhead": predicted - 1, "ratio": predicted / measured}
                    rows.append(row)
                    print(f"{name:6s} {recompute:9s} {tile:5d} {row['tiles']:5d}  {measured_untiled:9.3f} "
                          f"{measured_tiled:8.3f}  {measured - 1:+8.1%} {predicted - 1:+9.1%}  "
                          f"{predicted / measured:5.2f}", flush=True)
    print("\nmeasured / predicted: tiled over untiled step time - 1; ratio: predicted / measured of "
          "tiled over untiled")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
