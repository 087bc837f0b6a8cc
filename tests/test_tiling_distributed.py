"""Tiled layouts train exactly like one process (CPU/gloo, world size 4, fp32).

The tiny Qwen3-MoE, DeepSeek-V3 and GPT-OSS models of `tests/test_distributed.py`, three AdamW
steps of the runtime's own `train_step` with gradient clipping, with `tile_tokens` = 8 (a
micro-batch's 32 tokens per rank run in 4 tiles, each routing its own tokens, running its own
EP all-to-alls and the expert unit's FSDP hooks): EP 2 × expert-FSDP 2 with recompute none and
full, and Ulysses 2 × EP 2 with full recompute. Losses, gradient norms and the updated parameters
must equal the single-process, untiled run (max relative error <= 1e-5).
"""

from __future__ import annotations

import logging

import pytest
import torch

from tests.test_distributed import (
    CONFIGS,
    LAYOUTS,
    STEPS,
    full_params,
    make_config,
    make_model,
    max_rel_err,
    reference_run,
    run_steps,
)
from xplan.layout import Layout
from xplan.layout_tiles import feed_forward_tiles

TOL = 1e-5
WORLD = 4
TILE_TOKENS = 8
RUNS = {
    ("ep2_fsdp2", "none"): dict(LAYOUTS["ep2_fsdp2"], recompute="none"),
    ("ep2_fsdp2", "full"): dict(LAYOUTS["ep2_fsdp2"], recompute="full"),
    ("sp2_ep2", "full"): dict(LAYOUTS["sp2_ep2"], recompute="full"),
}


def tiled_worker(rank: int, world: int, configs: dict, out_path: str) -> None:

    from xplan.runtime.distributed import build_meshes, parallelize

    logging.getLogger("torch.distributed.tensor._redistribute").setLevel(logging.ERROR)
    results = {}
    for kind, config in configs.items():
        for key, fields in RUNS.items():
            layout = Layout(devices=world, precision="fp32", tile_tokens=TILE_TOKENS, **fields)
            meshes = build_meshes(layout, "cpu")
            model = parallelize(make_model(config), layout, meshes)
            assert feed_forward_tiles(layout, 16) == 4  # 2 or 4 sequences of 16 or 8 tokens per rank
            losses, norms = run_steps(model, layout, meshes)
            params = full_params(model)
            if rank == 0:
                results[(kind, *key)] = {"losses": losses, "norms": norms, "params": params}
    if rank == 0:
        torch.save(results, out_path)


@pytest.fixture(scope="module")
def tiled_results(tmp_path_factory) -> dict:
    from xplan.runtime.distributed.testing import spawn

    out = tmp_path_factory.mktemp("tiled") / "results.pt"
    spawn(tiled_worker, WORLD, {kind: make_config(kind) for kind in sorted(CONFIGS)}, str(out), timeout_s=300)
    return torch.load(out)


@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_tiled_layouts_match_single_process(kind, tiled_results):
    ref = reference_run(kind)
    worst = (0.0, "")
    for key in RUNS:
        got = tiled_results[(kind, *key)]
        where = f"{kind} {key[0]} {key[1]} tile_tokens={TILE_TOKENS}"
        for step in range(STEPS):
            for name in ("losses", "norms"):
                a, b = got[name][step], ref[name][step]
                err = abs(a - b) / abs(b)
                assert err <= TOL, f"{where}: {name} of step {step} is {a}, single process {b}"
                worst = max(worst, (err, f"{where} {name} {step}"))
        for pname, value in ref["params"].items():
            err = max_rel_err(got["params"][pname], value)
            assert err <= TOL, f"{where}: parameter {pname} differs after {STEPS} steps: relative error {err:.2e}"
            worst = max(worst, (err, f"{where} {pname}"))
    print(f"{kind}: worst relative error {worst[0]:.2e} ({worst[1]})")
