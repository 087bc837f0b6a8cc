"""Predicted vs dry-run peak memory per device over a matrix of full-size plans.

    python benchmarks/memory_matrix.py [--quick] [--rows 1,5,9] [--hardware h800] [--layers N | --full-depth]
                                       [--json out.json] [--list]

Each row is a plan (model, devices, FSDP over all ranks or ZeRO-1, EP, Ulysses, recompute, sequence
length, global batch, EP imbalance, precision). The prediction is `planner.pricing.price` (the cost model as it is
now, not a stored plan); the measurement is `xplan.runtime.dryrun.dry_run`: the runtime's own
training step at the plan's world size and model size under fake tensors, rank 0 = the largest
rank; `xplan.app.dryrun_compare` joins the two. Acceptance (the "close the loop" issue):
|error| <= 3% on every row, error = (predicted - measured) / measured. Prints one table row per
plan as it finishes, then the components of every row that misses, and exits 1 if any row misses.

By default every dry run keeps 3 (and, in one extra run per segment, 4) copies of each repeated
block pattern and extrapolates each memory moment linearly (`compare_dry_run(plan, layers=3)`;
`tests/test_dryrun.py` checks that this equals the full-depth run, and on this matrix it is bit-exact
against `--full-depth`). Timings on 2 shared CPU cores: the first 21 rows ~2.5 min with
extrapolation (the five token-tiled rows, 32k-64k tokens without Ulysses, ~12 min more), ~25 min
at full depth. `--quick` runs one row per model (~20 s).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass

THRESHOLD = 0.03


@dataclass(frozen=True)
class Row:
    model: str
    devices: int
    ep: int
    sp: int
    recompute: str | float
    seq_len: int
    grad_accum: int = 2
    micro_batch: int = 1
    imbalance: float = 1.0
    dp_mode: str = "fsdp"
    precision: str = "bf16"
    tile_tokens: int | None = None
    yarn: float | None = None  # the preset with YaRN rope scaling by this factor (a longer context)

    @property
    def global_batch(self) -> int:
        return self.devices // self.sp * self.micro_batch * self.grad_accum

    def layout_label(self) -> str:
        rc = self.recompute if isinstance(self.recompute, str) else f"{self.recompute:g}"
        parts = [f"{self.devices}d", f"ep{self.ep}", f"sp{self.sp}", f"rc={rc}", f"ga{self.grad_accum}"]
        if self.micro_batch != 1:
            parts.append(f"mb{self.micro_batch}")
        if self.imbalance != 1.0:
            parts.append(f"imb{self.imbalance:g}")
        if self.dp_mode != "fsdp":
            parts.append(self.dp_mode)
        if self.precision != "bf16":
            parts.append(self.precision)
        if self.tile_tokens:
            parts.append(f"tile{self.tile_tokens}")
        if self.yarn:
            parts.append(f"yarn{self.yarn:g}")
        return " ".join(parts)


MATRIX: list[Row] = [
    # Qwen3-30B-A3B: 48 MoE layers, 128 experts, 32 q / 4 kv heads.
    Row("qwen3-30b-a3b", 32, 1, 1, "none", 4096),
    Row("qwen3-30b-a3b", 64, 8, 1, "none", 4096),
    Row("qwen3-30b-a3b", 64, 8, 1, "full", 32768),
    Row("qwen3-30b-a3b", 64, 64, 4, 0.5, 32768),
    Row("qwen3-30b-a3b", 64, 8, 8, "full", 32768),
    Row("qwen3-30b-a3b", 64, 8, 1, "none", 4096, grad_accum=1),
    Row("qwen3-30b-a3b", 64, 8, 1, "selective", 8192, micro_batch=2),
    # Qwen3-235B-A22B: 94 MoE layers, 128 experts, 64 q / 4 kv heads.
    Row("qwen3-235b-a22b", 128, 1, 1, "full", 4096),
    Row("qwen3-235b-a22b", 128, 8, 1, "none", 4096),
    Row("qwen3-235b-a22b", 128, 8, 1, "none", 4096, imbalance=1.5),
    Row("qwen3-235b-a22b", 256, 16, 2, 0.5, 16384),
    Row("qwen3-235b-a22b", 256, 64, 8, "full", 32768),
    # DeepSeek-V3: 3 dense + 58 MoE layers, 256 experts, MLA with 128 heads.
    Row("deepseek-v3", 256, 8, 1, "none", 4096),
    Row("deepseek-v3", 256, 8, 1, "full", 4096),
    Row("deepseek-v3", 256, 8, 1, "full", 4096, grad_accum=1),
    Row("deepseek-v3", 512, 32, 4, 0.5, 16384),
    Row("deepseek-v3", 512, 64, 8, "full", 32768),
    # GPT-OSS-120B: 36 MoE layers alternating sliding / full attention with sinks, 128 experts.
    Row("gpt-oss-120b", 64, 1, 1, "none", 4096),
    Row("gpt-oss-120b", 64, 8, 1, "full", 8192),
    Row("gpt-oss-120b", 128, 16, 4, 0.5, 16384),
    Row("gpt-oss-120b", 128, 64, 8, "full", 65536),
    # ZeRO-1: replicated bf16 parameters and fp32 gradients, optimizer states sharded.
    Row("qwen3-30b-a3b", 16, 8, 1, "full", 4096, micro_batch=4, dp_mode="zero1"),
    Row("qwen3-8b", 8, 1, 2, "selective", 4096, grad_accum=8, dp_mode="zero1"),
    # fp8 (torchao Float8Linear in the blocks' linear layers).
    Row("qwen3-8b", 8, 1, 1, "selective", 4096, micro_batch=4, precision="fp8"),
    Row("qwen3-30b-a3b", 16, 8, 1, "full", 4096, micro_batch=4, dp_mode="zero1", precision="fp8"),
    # ZeRO-1 with one micro-batch: the fp32 gradient buffers appear as the backward reaches each parameter.
    Row("qwen3-8b", 8, 1, 1, "none", 4096, grad_accum=1, dp_mode="zero1"),
    Row("llama3-8b", 8, 1, 1, "full", 4096, grad_accum=1, micro_batch=2, dp_mode="zero1"),
    # Token tiling of the feed-forward half (tile_tokens): long sequences without Ulysses.
    # (Qwen3 reaches 64k with YaRN x4, as its model card describes; the runtime refuses longer
    # sequences than the config's max_position_embeddings.)
    Row("qwen3-235b-a22b", 256, 64, 1, "full", 65536, tile_tokens=8192, yarn=4.0),
    Row("qwen3-30b-a3b", 64, 8, 1, "full", 32768, tile_tokens=4096),
    Row("qwen3-30b-a3b", 64, 8, 1, "none", 16384, tile_tokens=4096),
    Row("deepseek-v3", 512, 64, 1, "full", 32768, tile_tokens=8192),
    Row("gpt-oss-120b", 128, 64, 1, "full", 65536, tile_tokens=8192),
]
QUICK = [2, 9, 13, 18]  # 1-based row numbers: one per model, short sequences


def model_of(row: Row) -> str:
    """The row's preset, or a config directory of it with YaRN rope scaling (`row.yarn`)."""
    if not row.yarn:
        return row.model
    import tempfile
    from pathlib import Path

    from xplan.runtime.models.config import read_config_json

    config = dict(read_config_json(row.model)[0])
    original = config["max_position_embeddings"]
    config["rope_scaling"] = {"rope_type": "yarn", "factor": row.yarn, "original_max_position_embeddings": original}
    config["max_position_embeddings"] = int(original * row.yarn)
    folder = Path(tempfile.gettempdir()) / "xplan-memory-matrix" / f"{row.model}-yarn{row.yarn:g}"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=1))
    return str(folder)


def make_row_plan(row: Row, hardware: str):
    from xplan.layout import Layout
    from xplan.plan import make_plan

    fsdp = 1 if row.dp_mode == "zero1" else row.devices
    layout = Layout(devices=row.devices, dp_mode=row.dp_mode, fsdp=fsdp, ep=row.ep, sp=row.sp,
                    micro_batch=row.micro_batch, recompute=row.recompute, precision=row.precision,
                    tile_tokens=row.tile_tokens)
    return make_plan(model_of(row), hardware, layout, {"seq_len": row.seq_len, "global_batch": row.global_batch})


def run_row(row: Row, hardware: str, layers: int | None):
    from xplan.app.dryrun_compare import compare_dry_run

    plan = make_row_plan(row, hardware)
    return compare_dry_run(plan, layers=layers, imbalance=row.imbalance, reprice=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=f"run rows {QUICK} only")
    parser.add_argument("--rows", help="comma-separated 1-based row numbers to run")
    parser.add_argument("--hardware", default="h800")
    parser.add_argument("--layers", type=int, default=3, help="copies of each repeated block pattern to run "
                        "(>= 3; the rest is extrapolated linearly)")
    parser.add_argument("--full-depth", action="store_true", help="run every layer (no extrapolation)")
    parser.add_argument("--json", help="write every row's dry-run report here")
    parser.add_argument("--list", action="store_true", help="print the matrix and exit")
    args = parser.parse_args(argv)

    layers = None if args.full_depth else args.layers
    numbers = list(range(1, len(MATRIX) + 1))
    if args.quick:
        numbers = QUICK
    if args.rows:
        numbers = [int(n) for n in args.rows.split(",")]
    if args.list:
        for n, row in enumerate(MATRIX, 1):
            print(f"{n:3d}  {row.model:18s} {row.layout_label():34s} seq {row.seq_len}")
        return 0

    header = (f"{'#':>3}  {'model':16s} {'layout':34s} {'seq':>6}  {'predicted GiB':>13} {'measured GiB':>12} "
              f"{'error %':>8}  {'peak at':10s} {'time s':>7}")
    print(header)
    print("-" * len(header))
    reports, failures, started = [], [], time.perf_counter()
    for n in numbers:
        row = MATRIX[n - 1]
        try:
            report = run_row(row, args.hardware, layers)
        except Exception as exc:  # noqa: BLE001 - a benchmark reports every row
            print(f"{n:3d}  {row.model:16s} {row.layout_label():34s} {row.seq_len:6d}  failed: "
                  f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}")
            failures.append((n, row, None))
            continue
        d = report.to_dict()
        error = d["error"] * 100
        ok = abs(d["error"]) <= THRESHOLD
        print(f"{n:3d}  {row.model:16s} {row.layout_label():34s} {row.seq_len:6d}  {d['predicted_peak_gib']:13.2f} "
              f"{d['measured_peak_gib']:12.2f} {error:+8.2f}  {d['peak_phase']:10s} {d['elapsed_s']:7.1f}"
              + ("" if ok else "  MISS"), flush=True)
        reports.append({"row": n, "model": row.model, "layout": row.layout_label(), "seq_len": row.seq_len,
                        "report": d})
        if not ok:
            failures.append((n, row, d))
    total = time.perf_counter() - started
    depth = "full depth" if layers is None else f"{layers}/{layers + 1} copies per segment, extrapolated"
    print(f"\n{len(numbers)} rows in {total:.0f} s ({depth}); {len(numbers) - len(failures)} within {THRESHOLD:.0%}")
    for n, row, d in failures:
        if d is None:
            continue
        print(f"\nrow {n} ({row.model} {row.layout_label()} seq {row.seq_len}): peak in {d['peak_phase']} at "
              f"{d['peak_where']}")
        print(f"  {'component':22s} {'measured GiB':>12} {'predicted GiB':>13} {'diff GiB':>9}")
        for name, c in d["components"].items():
            if c["measured"] or c["predicted"]:
                print(f"  {name:22s} {c['measured']:12.3f} {c['predicted']:13.3f} {c['predicted'] - c['measured']:+9.3f}")
        cats = ", ".join(f"{k} {v:.2f}" for k, v in d["tracker_categories_gib"].items() if v >= 0.005)
        print(f"  tracker categories at the peak (GiB): {cats}")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(reports, handle, indent=1)
    return 0 if not failures else 1


if __name__ == "__main__":
    sys.exit(main())
