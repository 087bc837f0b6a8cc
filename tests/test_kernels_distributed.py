"""World-size parity of the kernel choices that run on CPU but not by default: `kernels.attention:
eager` (the other CPU choices, `sdpa`, `grouped_mm` / `loop`, `chunked` / `full` and elementwise
`eager`, are what tests/test_distributed.py and tests/test_run_cli.py run already).

Tiny Qwen3-MoE, GPT-OSS (sinks, sliding window, kv heads < sp) and DeepSeek-V3 (MLA) models, 4 gloo
processes, Ulysses 2 × EP 2 with selective recompute and FSDP 4 with gradient accumulation: three
AdamW steps of the runtime's own `train_step`; losses, gradient norms and parameters equal the
single-process run with the same kernels within 1e-5 (fp32), and that run equals the default
kernels' within 1e-5.
"""

from __future__ import annotations

import logging

import pytest
import torch

from tests.test_distributed import (
    CONFIGS,
    STEPS,
    TOL,
    full_params,
    make_config,
    make_model,
    max_rel_err,
    reference_run,
    run_steps,
)
from xplan.layout import Layout

WORLD = 4
KERNELS = {"attention": "eager", "elementwise": "eager"}
LAYOUTS = {
    "sp2_ep2_selective": dict(fsdp=4, sp=2, ep=2, micro_batch=4, recompute="selective"),
    "fsdp4_accum2": dict(fsdp=4, micro_batch=1, recompute="none"),
}


def with_kernels(model, layout: Layout):
    from xplan.runtime.kernels import apply_kernels

    executed = apply_kernels(model, layout, "cpu")
    assert layout.kernels.attention != "eager" or executed["attention"] == "eager"
    return model


def single_process(kind: str, kernels: dict) -> dict:
    """The truth: one process, the whole global batch, torch's clip_grad_norm_."""
    layout = Layout(devices=1, fsdp=1, precision="fp32", kernels=kernels)
    return reference_run(kind, with_kernels(make_model(make_config(kind)), layout))


def worker(rank: int, world: int, configs: dict, out_path: str) -> None:

    from xplan.runtime.distributed import build_meshes, parallelize

    logging.getLogger("torch.distributed.tensor._redistribute").setLevel(logging.ERROR)
    results = {}
    for kind, config in configs.items():
        for name, fields in LAYOUTS.items():
            layout = Layout(devices=world, precision="fp32", kernels=KERNELS, **fields)
            meshes = build_meshes(layout, "cpu")
            model = parallelize(with_kernels(make_model(config), layout), layout, meshes)
            losses, norms = run_steps(model, layout, meshes)
            params = full_params(model)
            if rank == 0:
                results[(kind, name)] = {"losses": losses, "norms": norms, "params": params}
    if rank == 0:
        torch.save(results, out_path)


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict:
    from xplan.runtime.distributed.testing import spawn

    out = tmp_path_factory.mktemp("kernels") / "results.pt"
    spawn(worker, WORLD, {kind: make_config(kind) for kind in sorted(CONFIGS)}, str(out), timeout_s=300)
    return torch.load(out)


def assert_same_run(got: dict, want: dict, where: str) -> None:
    for what in ("losses", "norms"):
        for step, (a, b) in enumerate(zip(got[what], want[what], strict=True)):
            assert abs(a - b) / abs(b) <= TOL, f"{where}: {what} of step {step}: {a} vs {b}"
    assert set(got["params"]) == set(want["params"]), where
    for name, value in want["params"].items():
        err = max_rel_err(got["params"][name], value)
        assert err <= TOL, f"{where}: parameter {name} after {STEPS} steps: relative error {err:.2e}"


@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_eager_attention_matches_world_size_one(kind, results):
    truth = single_process(kind, KERNELS)
    assert_same_run(truth, single_process(kind, {"elementwise": "eager"}), f"{kind} eager vs default kernels")
    for name in LAYOUTS:
        assert_same_run(results[(kind, name)], truth, f"{kind} {name} eager attention")
