"""Distributed runtime core on CPU/gloo: every layout trains exactly like one process.

Tiny Qwen3-MoE, DeepSeek-V3 (MLA, group-limited routing, shared expert) and GPT-OSS (sinks,
sliding window, expert biases, kv heads < sp) models; world size 4; layouts FSDP 4 (with gradient
accumulation), HSDP 2×2, EP 2 × FSDP 2, EP 4, Ulysses 2 × FSDP 2 (HSDP), Ulysses 2 × EP 2, each
with recompute none and full; plus selective recompute with EP, HSDP × EP, offload, and a bf16 run. Three AdamW steps
(the runtime's own `train_step`) on a fixed global batch (8 × 16 tokens, the same data whatever the
world size) with gradient clipping: losses, gradient norms and the updated parameters must equal
the single-process run (max relative error <= 1e-5).

One spawn of 4 processes per model; the layouts run one after the other inside it.
"""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from xplan.errors import InputError
from xplan.layout import Layout
from xplan.runtime import build_model
from xplan.runtime.models import model_config_from_dict

TOL = 1e-5
WORLD = 4
VOCAB, BATCH, SEQ, STEPS = 128, 8, 16, 3
LR, EPS, WEIGHT_DECAY, MAX_NORM = 1e-3, 1e-4, 0.1, 0.5

CONFIGS = {
    "qwen3_moe": dict(
        model_type="qwen3_moe", vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_experts=8, num_experts_per_tok=2,
        moe_intermediate_size=16, norm_topk_prob=True, max_position_embeddings=64, tie_word_embeddings=False,
    ),
    "deepseek_v3": dict(
        model_type="deepseek_v3", vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
        first_k_dense_replace=1, num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8,
        n_shared_experts=1, num_experts_per_tok=2, n_group=2, topk_group=1, norm_topk_prob=True,
        routed_scaling_factor=2.0, moe_intermediate_size=16, q_lora_rank=24, kv_lora_rank=16,
        qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=12, max_position_embeddings=64,
        tie_word_embeddings=False, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    ),
    "gpt_oss": dict(
        model_type="gpt_oss", vocab_size=VOCAB, hidden_size=32, intermediate_size=16, num_hidden_layers=2,
        layer_types=["sliding_attention", "full_attention"], sliding_window=6, num_attention_heads=4,
        num_key_value_heads=1, head_dim=8, num_local_experts=8, num_experts_per_tok=2, swiglu_limit=1.5,
        max_position_embeddings=64, tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    ),
}

# name -> layout fields (devices = 4).
LAYOUTS = {
    "fsdp4_accum2": dict(fsdp=4, micro_batch=1),
    "hsdp2x2": dict(fsdp=2, micro_batch=2),
    "ep2_fsdp2": dict(fsdp=4, ep=2, micro_batch=2),
    "ep4": dict(fsdp=4, ep=4, micro_batch=2),
    "sp2_fsdp2": dict(fsdp=2, sp=2, micro_batch=4),
    "sp2_ep2": dict(fsdp=4, sp=2, ep=2, micro_batch=4),
}
RECOMPUTE = ("none", "full")
# Every layout × recompute must match exactly; so must these extra runs: (label, variant) ->
# (base layout, changed fields).
EXTRA_EXACT = {
    ("ep2_fsdp2", "selective"): ("ep2_fsdp2", dict(recompute="selective")),
    ("sp2_ep2", "selective"): ("sp2_ep2", dict(recompute="selective")),
    # HSDP replicas of expert-parallel groups (expert mesh: replicate 2 × efsdp 1 × ep 2).
    ("hsdp2_ep2", "full"): ("ep2_fsdp2", dict(fsdp=2, recompute="full")),
    # Offload on cpu, the CUDA code path run synchronously: the AdamW moments leave
    # the device storage between steps, every block's saved tensors go to host copies.
    ("sp2_ep2", "offload"): ("sp2_ep2", dict(recompute="none", offload=("optimizer", "activations"))),
    ("ep2_fsdp2", "offload_full"): ("ep2_fsdp2", dict(recompute="full", offload=("optimizer", "activations"))),
    # MoE blocks (and their expert units) gathered across the step's two micro-batches (ZeRO-2-like).
    ("fsdp4_accum2", "keep_gathered"): ("fsdp4_accum2", dict(recompute="full", keep_gathered=("moe",))),
    ("ep2_fsdp2", "keep_gathered"): ("ep2_fsdp2", dict(micro_batch=1, recompute="none", keep_gathered=("moe",))),
}
BF16_RUN = ("sp2_ep2", "bf16")  # mixed precision: losses close to the fp32 run, not equal
BF16_TOL = 3e-2


def runs() -> dict[tuple[str, str], dict]:
    """(layout name, variant) -> Layout keyword arguments."""
    out = {(n, r): dict(LAYOUTS[n], recompute=r, precision="fp32") for n in LAYOUTS for r in RECOMPUTE}
    for key, (base, changes) in EXTRA_EXACT.items():
        out[key] = dict(LAYOUTS[base], precision="fp32", **changes)
    out[BF16_RUN] = dict(LAYOUTS[BF16_RUN[0]], recompute="none", precision="bf16")
    return out


def make_config(kind: str):
    return model_config_from_dict(dict(CONFIGS[kind]), name=f"tiny-{kind}")


def make_model(config) -> torch.nn.Module:
    """Seeded model with non-trivial norms, biases, sinks and routing biases."""
    model = build_model(config, dtype=torch.float32, seed=0)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            elif name.endswith("sinks"):
                p.copy_(torch.randn(p.shape, generator=gen))
            elif "bias" in name.rsplit(".", 1)[-1]:
                p.copy_(0.02 * torch.randn(p.shape, generator=gen))
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.01 * torch.randn(b.shape, generator=gen))
    return model


def global_batches() -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(1234)
    return [torch.randint(0, VOCAB, (BATCH, SEQ), generator=gen) for _ in range(STEPS)]


def make_optimizer(model):
    return torch.optim.AdamW(model.parameters(), lr=LR, eps=EPS, weight_decay=WEIGHT_DECAY, foreach=False)


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1),
                           ignore_index=-100, reduction="sum")


def reference_run(kind: str, model=None) -> dict:
    """The single-process truth: plain model (or `model`, e.g. with other kernels), global batch,
    torch's clip_grad_norm_."""
    from xplan.runtime.distributed import shift_labels

    model = model if model is not None else make_model(make_config(kind))
    opt = make_optimizer(model)
    losses, norms = [], []
    for ids in global_batches():
        labels = shift_labels(ids)
        opt.zero_grad()
        loss = token_loss_sum(model(ids), labels) / int((labels != -100).sum())
        loss.backward()
        norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM).item())
        opt.step()
        losses.append(loss.item())
    return {"losses": losses, "norms": norms,
            "params": {n: p.detach().clone() for n, p in model.named_parameters()}}


def logits_loss(model, micro_batch) -> torch.Tensor:
    """The step's loss function here: full logits through the model's own forward, summed token losses."""
    return token_loss_sum(model(micro_batch.input_ids, micro_batch.positions), micro_batch.labels)


def run_steps(model, layout: Layout, meshes) -> tuple[list[float], list[float]]:
    """STEPS optimizer steps of the runtime's own `train_step` on the fixed global batches:
    (global mean losses, gradient norms)."""
    from xplan.runtime.distributed import apply_optimizer_offload, local_batch
    from xplan.runtime.train.step import train_step

    opt = make_optimizer(model)
    apply_optimizer_offload(opt, layout, meshes.device_type)
    losses, norms = [], []
    for ids in global_batches():
        batch = local_batch(ids, meshes)
        result = train_step(model, opt, batch.micro_batches(layout.micro_batch), logits_loss, batch.global_tokens,
                            meshes, MAX_NORM)
        norms.append(result.grad_norm.item())
        losses.append(result.global_loss(meshes))
    return losses, norms


def distributed_worker(rank: int, world: int, configs: dict, out_path: str) -> None:
    """Every model × run on one group of `world` processes; rank 0 saves the results."""

    from xplan.runtime.distributed import build_meshes, parallelize

    # full_tensor() of strided expert shards logs a performance note per call.
    logging.getLogger("torch.distributed.tensor._redistribute").setLevel(logging.ERROR)
    results = {}
    for kind, config in configs.items():
        for key, fields in runs().items():
            layout = Layout(devices=world, **fields)
            meshes = build_meshes(layout, "cpu")
            model = parallelize(make_model(config), layout, meshes)
            losses, norms = run_steps(model, layout, meshes)
            params = full_params(model)
            if rank == 0:
                results[(kind, *key)] = {"losses": losses, "norms": norms, "params": params}
    if rank == 0:
        torch.save(results, out_path)


def full_params(model) -> dict:
    """Every parameter whole (DTensor shards gathered), detached copies, by name."""
    from torch.distributed.tensor import DTensor

    return {n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()
            for n, p in model.named_parameters()}


def max_rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    denom = b.abs().max().item()
    return (a - b).abs().max().item() / (denom if denom > 0 else 1.0)


@pytest.fixture(scope="module")
def distributed_results(tmp_path_factory) -> dict:
    """One spawn of WORLD processes for all models (configs are parsed here: workers skip transformers)."""
    from xplan.runtime.distributed.testing import spawn

    out = tmp_path_factory.mktemp("distributed") / "results.pt"
    spawn(distributed_worker, WORLD, {kind: make_config(kind) for kind in sorted(CONFIGS)}, str(out), timeout_s=300)
    return torch.load(out)


@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_layouts_match_single_process(kind, distributed_results):
    ref = reference_run(kind)
    results = {key[1:]: value for key, value in distributed_results.items() if key[0] == kind}
    assert set(results) == set(runs())
    worst = (0.0, "")
    for key, got in results.items():
        where = f"{kind} {key[0]} {key[1]}"
        if key == BF16_RUN:
            for step, (a, b) in enumerate(zip(got["losses"], ref["losses"], strict=True)):
                assert abs(a - b) / abs(b) <= BF16_TOL, f"{where}: loss of step {step} is {a}, fp32 single process {b}"
            continue
        for step, (a, b) in enumerate(zip(got["losses"], ref["losses"], strict=True)):
            err = abs(a - b) / abs(b)
            assert err <= TOL, f"{where}: loss of step {step} is {a}, single process {b}"
            worst = max(worst, (err, f"{where} loss {step}"))
        for step, (a, b) in enumerate(zip(got["norms"], ref["norms"], strict=True)):
            err = abs(a - b) / abs(b)
            assert err <= TOL, f"{where}: gradient norm of step {step} is {a}, single process {b}"
        assert set(got["params"]) == set(ref["params"]), where
        for pname, value in ref["params"].items():
            assert got["params"][pname].shape == value.shape, f"{where}: {pname} shape"
            err = max_rel_err(got["params"][pname], value)
            assert err <= TOL, f"{where}: parameter {pname} differs after {STEPS} steps: relative error {err:.2e}"
            worst = max(worst, (err, f"{where} {pname}"))
    print(f"{kind}: {len(results)} runs, worst relative error {worst[0]:.2e} ({worst[1]})")


def single_process_worker(rank: int, world: int, config, out_path: str) -> None:
    """World size 1 through the same runtime path (parallelize on a 1-rank mesh)."""
    from xplan.runtime.distributed import build_meshes, parallelize

    layout = Layout(devices=1, fsdp=1, micro_batch=BATCH, precision="fp32", recompute="full")
    meshes = build_meshes(layout, "cpu")
    assert (meshes.dp_size, meshes.sp_size, meshes.ep_size) == (1, 1, 1)
    model = parallelize(make_model(config), layout, meshes)
    losses, _ = run_steps(model, layout, meshes)
    params = {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
              for n, p in model.named_parameters()}
    torch.save({"losses": losses, "params": params}, out_path)


def test_world_size_one_matches_plain_model(tmp_path):
    from xplan.runtime.distributed.testing import spawn

    ref = reference_run("qwen3_moe")
    out = tmp_path / "one.pt"
    spawn(single_process_worker, 1, make_config("qwen3_moe"), str(out))
    got = torch.load(out)
    for a, b in zip(got["losses"], ref["losses"], strict=True):
        assert abs(a - b) / abs(b) <= TOL
    for name, value in ref["params"].items():
        assert max_rel_err(got["params"][name], value) <= TOL, name


# ---- no processes needed below ----------------------------------------------------------------

def fake_meshes(dp_rank: int, dp_size: int, sp_rank: int, sp_size: int):
    """`local_batch` reads only these four coordinates."""
    return SimpleNamespace(dp_rank=dp_rank, dp_size=dp_size, sp_rank=sp_rank, sp_size=sp_size)


def test_local_batch_splits_rows_and_sequence_chunks():
    from xplan.runtime.distributed import IGNORE_INDEX, local_batch, shift_labels

    ids = torch.arange(4 * 8).view(4, 8)
    parts = {(d, s): local_batch(ids, fake_meshes(d, 2, s, 2)) for d in range(2) for s in range(2)}
    for (d, s), part in parts.items():
        assert torch.equal(part.input_ids, ids[2 * d:2 * d + 2, 4 * s:4 * s + 4])
        assert torch.equal(part.positions, torch.arange(4 * s, 4 * s + 4).expand(2, 4))
        assert part.global_tokens == 4 * 7  # the last position of every sequence has no label
    # Labels are shifted on the full sequence: the first chunk's last label is the second chunk's first token.
    assert torch.equal(parts[(0, 0)].labels[:, -1], parts[(0, 1)].input_ids[:, 0])
    assert (parts[(1, 1)].labels[:, -1] == IGNORE_INDEX).all()
    rebuilt = torch.cat([torch.cat([parts[(d, s)].labels for s in range(2)], dim=1) for d in range(2)])
    assert torch.equal(rebuilt, shift_labels(ids))
    micro = parts[(0, 0)].micro_batches(1)
    assert len(micro) == 2 and torch.equal(micro[1].input_ids, ids[1:2, 0:4])


def test_local_batch_rejects_indivisible_shapes():
    from xplan.runtime.distributed import local_batch

    with pytest.raises(InputError, match="data-parallel"):
        local_batch(torch.zeros(3, 8, dtype=torch.long), fake_meshes(0, 2, 0, 1))
    with pytest.raises(InputError, match="multiple of sp"):
        local_batch(torch.zeros(2, 6, dtype=torch.long), fake_meshes(0, 1, 0, 4))


@pytest.mark.parametrize(("kind", "fields", "message"), [
    ("qwen3_moe", dict(devices=4, fsdp=2, tp=2), "tensor or pipeline"),
    ("qwen3_moe", dict(devices=4, fsdp=4, pp=2), "tensor or pipeline"),
    ("qwen3_moe", dict(devices=6, fsdp=6, ep=3), r"ep \(3\) must divide the number of routed experts"),
    ("gpt_oss", dict(devices=3, fsdp=3, sp=3), r"sp \(3\) must divide the attention heads"),
    ("deepseek_v3", dict(devices=8, fsdp=8, sp=8), r"sp \(8\) must divide the attention heads"),
])
def test_unsupported_layouts_are_input_errors(kind, fields, message):
    from xplan.runtime.distributed import check_runtime_layout

    with pytest.raises(InputError, match=message):
        check_runtime_layout(Layout(**fields), make_config(kind), seq_len=SEQ)


def test_ulysses_head_checks():
    from xplan.runtime.distributed.ulysses import check_ulysses_heads

    for heads, kv, sp in ((8, 8, 4), (8, 4, 4), (8, 2, 4), (8, 1, 4), (16, 2, 4)):
        check_ulysses_heads(heads, kv, sp)
    with pytest.raises(InputError, match="kv heads"):
        check_ulysses_heads(12, 3, 2)
    with pytest.raises(InputError, match="attention heads"):
        check_ulysses_heads(6, 6, 4)


def test_recompute_fraction_marks_the_first_blocks():
    assert Layout(devices=1, fsdp=1, recompute=0.5).recompute_policies(4) == ["full", "full", "none", "none"]
    assert Layout(devices=1, fsdp=1, recompute="selective").recompute_policies(2) == ["selective"] * 2


def test_device_type_resolution(monkeypatch):
    from xplan.runtime.distributed import resolve_device_type

    monkeypatch.delenv("XPLAN_DEVICE", raising=False)
    assert resolve_device_type(override="cpu") == "cpu"
    assert resolve_device_type(override="gpu") == "cuda"
    assert resolve_device_type(SimpleNamespace(device=SimpleNamespace(kind="npu"))) == "npu"
    assert resolve_device_type(SimpleNamespace(device=SimpleNamespace(kind="gpu"))) == "cuda"
    assert resolve_device_type("cpu-laptop") == "cpu"  # no such profile file: the name decides
    from xplan.hw_profiles import profile_names

    shipped = {"cpu": "cpu", "h100": "cuda", "ascend-910b": "npu"}
    for name, device in shipped.items():
        if name in profile_names():
            assert resolve_device_type(name) == device, name
    monkeypatch.setenv("XPLAN_DEVICE", "cpu")
    assert resolve_device_type(SimpleNamespace(device=SimpleNamespace(kind="gpu"))) == "cpu"
    with pytest.raises(InputError, match="device must be one of"):
        resolve_device_type(override="tpu")


def test_npu_without_torch_npu_is_an_input_error():
    pytest.importorskip("torch")
    try:
        import torch_npu  # noqa: F401
        pytest.skip("torch_npu is installed")
    except ImportError:
        pass
    from xplan.runtime.distributed import init_distributed

    with pytest.raises(InputError, match="torch_npu"):
        init_distributed("npu")


def fake_dry_run_worker(index: int, config) -> None:
    """A dry run's view: fake process group at world size 8, fake tensors, rank 3's program."""
    from xplan.runtime import compat
    from xplan.runtime.distributed import build_meshes, local_batch, parallelize
    from xplan.runtime.dryrun import fake_process_group
    from xplan.runtime.models import CausalLM
    from xplan.runtime.train.step import train_step

    with fake_process_group(8, rank=3):
        layout = Layout(devices=8, fsdp=4, ep=2, sp=2, micro_batch=2, recompute="selective", precision="bf16",
                        offload=("optimizer", "activations"))
        meshes = build_meshes(layout, "cpu")
        ids = torch.randint(0, VOCAB, (8, 32), generator=torch.Generator().manual_seed(0))
        batch = local_batch(ids, meshes)
        with compat.fake_tensor_mode(allow_non_fake_inputs=True):  # meshes hold real rank tables
            model = parallelize(CausalLM(config), layout, meshes)
            opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
            train_step(model, opt, batch.micro_batches(layout.micro_batch), logits_loss, batch.global_tokens,
                       meshes, 1.0)


@pytest.mark.parametrize("kind", ["deepseek_v3"])
def test_parallelize_runs_under_fake_process_group_and_fake_tensors(kind):
    torch.multiprocessing.spawn(fake_dry_run_worker, args=(make_config(kind),), nprocs=1, join=True)
