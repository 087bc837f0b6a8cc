"""ZeRO-1 (`dp_mode: zero1`) on CPU/gloo: trains exactly like one process, checkpoints reshard.

The tiny models, data and single-process reference of `test_distributed`; world size 4 in fp32:
ZeRO-1 alone (with and without gradient accumulation), with expert parallelism (EP 2 and 4, the
experts' optimizer states sharded over the expert-data-parallel ranks), with Ulysses, with full and
selective recompute; DDP with EP (the expert mesh that ZeRO-1 needs also serves DDP). Losses,
gradient norms and parameters after three AdamW steps equal the single process within 1e-5; a bf16
ZeRO-1 run stays close. Checkpoints: two ZeRO-1 steps saved with DCP and resumed as FSDP2 (4 ranks)
and as ZeRO-1 on 2 ranks, and an FSDP2 checkpoint resumed as ZeRO-1, finish the third step exactly
like the reference.
"""

from __future__ import annotations

import logging

import pytest
import torch

from tests.test_distributed import (
    BF16_TOL,
    CONFIGS,
    EPS,
    LR,
    MAX_NORM,
    TOL,
    WEIGHT_DECAY,
    global_batches,
    logits_loss,
    make_config,
    make_model,
    max_rel_err,
    reference_run,
)
from xplan.layout import Layout

WORLD = 4
LAYOUTS = {
    "zero1": dict(dp_mode="zero1", micro_batch=2),
    "zero1_accum2": dict(dp_mode="zero1", micro_batch=1),
    "zero1_ep2": dict(dp_mode="zero1", ep=2, micro_batch=2),
    "zero1_ep4_full": dict(dp_mode="zero1", ep=4, micro_batch=1, recompute="full"),
    "zero1_sp2_ep2": dict(dp_mode="zero1", sp=2, ep=2, micro_batch=4),
    "zero1_ep2_selective": dict(dp_mode="zero1", ep=2, micro_batch=2, recompute="selective"),
    "ddp_ep2": dict(dp_mode="ddp", ep=2, micro_batch=1),
}
BF16 = "zero1_ep2_bf16"
RESUMES = ("zero1->fsdp", "fsdp->zero1", "zero1 world 4->2")


def optimizer_for(model):
    """The tests' AdamW (one group, no foreach) over what the runtime's optimizer steps on."""
    from xplan.runtime.distributed import bind_optimizer, optimizer_parameters

    opt = torch.optim.AdamW([p for _, p in optimizer_parameters(model)], lr=LR, eps=EPS, weight_decay=WEIGHT_DECAY,
                            foreach=False)
    bind_optimizer(model, opt)
    return opt


def build(config, world: int, fields: dict):
    from xplan.runtime.distributed import build_meshes, parallelize

    layout = Layout(devices=world, **{"precision": "fp32", **fields})
    meshes = build_meshes(layout, "cpu")
    model = parallelize(make_model(config), layout, meshes)
    return layout, meshes, model, optimizer_for(model)


def steps(model, opt, layout, meshes, batches) -> tuple[list[float], list[float]]:
    from xplan.runtime.distributed import local_batch
    from xplan.runtime.train.step import train_step

    losses, norms = [], []
    for ids in batches:
        batch = local_batch(ids, meshes)
        result = train_step(model, opt, batch.micro_batches(layout.micro_batch), logits_loss, batch.global_tokens,
                            meshes, MAX_NORM)
        norms.append(result.grad_norm.item())
        losses.append(result.global_loss(meshes))
    return losses, norms


def full_params(model) -> dict[str, torch.Tensor]:
    """Every parameter at full size: ZeRO-1's fp32 masters (the replicas may be bf16), else the model's."""
    from torch.distributed.tensor import DTensor

    from xplan.runtime.distributed import zero1_of

    zero = zero1_of(model)
    if zero is not None:
        return zero.full_state_dict()
    return {n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone() for n, p in model.named_parameters()}


def save(model, opt, directory: str, world: int) -> None:
    from xplan.runtime.train.checkpoint import save_checkpoint

    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    save_checkpoint(directory, 2, model, opt, scheduler, {}, torch.distributed.get_rank(), world)


def resume(config, world: int, fields: dict, directory: str) -> dict:
    """Load step 2 from `directory` into a fresh model of `fields` and run the third step."""
    from xplan.runtime.train.checkpoint import load_checkpoint, step_dir

    layout, meshes, model, opt = build(config, world, fields)
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    load_checkpoint(step_dir(directory, 2), model, opt, scheduler, torch.distributed.get_rank(), world)
    losses, norms = steps(model, opt, layout, meshes, global_batches()[2:])
    return {"losses": losses, "norms": norms, "params": full_params(model)}


def zero1_worker(rank: int, world: int, configs: dict, out_path: str, checkpoints: str) -> None:
    logging.getLogger("torch.distributed.tensor._redistribute").setLevel(logging.ERROR)
    results = {}
    for kind, config in configs.items():
        runs = {name: dict(fields) for name, fields in LAYOUTS.items()}
        runs[BF16] = dict(LAYOUTS["zero1_ep2"], precision="bf16")
        for name, fields in runs.items():
            layout, meshes, model, opt = build(config, world, fields)
            losses, norms = steps(model, opt, layout, meshes, global_batches())
            results[(kind, name)] = {"losses": losses, "norms": norms, "params": full_params(model)}
        # Checkpoints after two steps: ZeRO-1 with EP 2, and FSDP2 with EP 2.
        for name, fields in (("zero1", LAYOUTS["zero1_ep2"]), ("fsdp", dict(fsdp=4, ep=2, micro_batch=2))):
            layout, meshes, model, opt = build(config, world, fields)
            steps(model, opt, layout, meshes, global_batches()[:2])
            save(model, opt, f"{checkpoints}/{kind}-{name}", world)
        results[(kind, "zero1->fsdp")] = resume(config, world, dict(fsdp=2, micro_batch=2),
                                                f"{checkpoints}/{kind}-zero1")
        results[(kind, "fsdp->zero1")] = resume(config, world, LAYOUTS["zero1_sp2_ep2"], f"{checkpoints}/{kind}-fsdp")
    if rank == 0:
        torch.save(results, out_path)


def zero1_resume_worker(rank: int, world: int, configs: dict, out_path: str, checkpoints: str) -> None:
    results = {(kind, "zero1 world 4->2"): resume(config, world, LAYOUTS["zero1_ep2"], f"{checkpoints}/{kind}-zero1")
               for kind, config in configs.items()}
    if rank == 0:
        torch.save(results, out_path)


@pytest.fixture(scope="module")
def zero1_results(tmp_path_factory) -> dict:
    from xplan.runtime.distributed.testing import spawn

    tmp = tmp_path_factory.mktemp("zero1")
    configs = {kind: make_config(kind) for kind in sorted(CONFIGS)}
    spawn(zero1_worker, WORLD, configs, str(tmp / "four.pt"), str(tmp / "ckpt"), timeout_s=300)
    spawn(zero1_resume_worker, 2, configs, str(tmp / "two.pt"), str(tmp / "ckpt"), timeout_s=300)
    return {**torch.load(tmp / "four.pt"), **torch.load(tmp / "two.pt")}


def assert_matches(where: str, got: dict, ref: dict, first_step: int = 0) -> float:
    worst = 0.0
    for step, (a, b) in enumerate(zip(got["losses"], ref["losses"][first_step:], strict=True)):
        assert abs(a - b) / abs(b) <= TOL, f"{where}: loss of step {first_step + step} is {a}, single process {b}"
        worst = max(worst, abs(a - b) / abs(b))
    for step, (a, b) in enumerate(zip(got["norms"], ref["norms"][first_step:], strict=True)):
        assert abs(a - b) / abs(b) <= TOL, f"{where}: gradient norm of step {first_step + step} is {a}, single {b}"
    assert set(got["params"]) == set(ref["params"]), where
    for name, value in ref["params"].items():
        err = max_rel_err(got["params"][name], value)
        assert err <= TOL, f"{where}: parameter {name} differs: relative error {err:.2e}"
        worst = max(worst, err)
    return worst


@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_zero1_matches_single_process(kind, zero1_results):
    ref = reference_run(kind)
    worst = {name: assert_matches(f"{kind} {name}", zero1_results[(kind, name)], ref) for name in LAYOUTS}
    for step, (a, b) in enumerate(zip(zero1_results[(kind, BF16)]["losses"], ref["losses"], strict=True)):
        assert abs(a - b) / abs(b) <= BF16_TOL, f"{kind} {BF16}: loss of step {step} is {a}, fp32 single process {b}"
    print(f"{kind}: worst relative error {max(worst.values()):.2e}")


@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_zero1_checkpoints_reshard(kind, zero1_results):
    ref = reference_run(kind)
    for name in RESUMES:
        assert_matches(f"{kind} {name}", zero1_results[(kind, name)], ref, first_step=2)
