"""Every private torch API the runtime relies on (`xplan.runtime.compat`), on the installed torch.

Each test exercises one touch point the way the runtime uses it and checks the behaviour relied
on, not only that the name exists. Test ids carry the torch version they ran on
(``[torch-2.13.0+cpu]``), so a CI log says which version was checked.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from xplan.runtime import compat
from xplan.runtime.dryrun import fake_process_group


@pytest.fixture(autouse=True, params=[torch.__version__], ids=lambda v: f"torch-{v}")
def torch_version(request):
    return request.param


def test_torch_is_in_the_supported_range():
    major, minor = (int(part) for part in torch.__version__.split(".")[:2])
    assert (2, 10) <= (major, minor) < (2, 15)  # pyproject's torch range


# ---- grouped GEMM ------------------------------------------------------------------------------

def test_grouped_mm_equals_one_matmul_per_expert():
    assert compat.has_grouped_mm()
    gen = torch.Generator().manual_seed(0)
    counts = [3, 0, 7, 2]  # an idle expert included
    x = torch.randn(sum(counts), 16, generator=gen, requires_grad=True)
    weight = torch.randn(len(counts), 16, 8, generator=gen, requires_grad=True)  # [experts, in, out]
    offsets = torch.cumsum(torch.tensor(counts), 0).to(torch.int32)
    out = compat.grouped_mm(x, weight, offsets)
    x_ref, w_ref = x.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    ref = torch.cat([rows @ w_ref[e] for e, rows in enumerate(torch.split(x_ref, counts))])
    torch.testing.assert_close(out, ref)
    grad = torch.randn(out.shape, generator=gen)
    out.backward(grad)
    ref.backward(grad)
    torch.testing.assert_close(x.grad, x_ref.grad)
    torch.testing.assert_close(weight.grad, w_ref.grad)



@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fake_grouped_mm_gives_the_real_output_shapes(dtype):
    """The meta kernel takes bf16 only; the tracer and the dry run (dispatch modes that return
    `fake_grouped_mm` where it answers) need the fp32 shapes too, with the op still seen as
    `_grouped_mm`."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from xplan.runtime.models.grouped import grouped_linear_mm

    class ShapeRule(TorchDispatchMode):
        seen: list = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.seen.append(func.overloadpacket)
            out = compat.fake_grouped_mm(func, args, kwargs or {})
            return func(*args, **(kwargs or {})) if out is None else out

    counts = [3, 0, 7, 6]
    real = (torch.randn(sum(counts), 16, dtype=dtype, requires_grad=True),
            torch.randn(len(counts), 8, 16, dtype=dtype, requires_grad=True))  # x, weight [experts, out, in]
    real_out = grouped_linear_mm(*real, torch.tensor(counts))
    real_out.sum().backward()
    mode = compat.fake_tensor_mode()
    x, weight = (mode.from_tensor(t.detach()).requires_grad_() for t in real)
    tokens_per_expert = mode.from_tensor(torch.tensor(counts))
    with mode, ShapeRule():
        out = grouped_linear_mm(x, weight, tokens_per_expert)
        out.sum().backward()
    assert (out.shape, out.dtype) == (real_out.shape, real_out.dtype)
    assert x.grad.shape == real[0].grad.shape and weight.grad.shape == real[1].grad.shape
    assert ShapeRule.seen.count(torch.ops.aten._grouped_mm) == 3  # forward, input and weight gradients

# ---- fake process group, collectives, meshes ---------------------------------------------------

def test_fake_process_group_all_to_all_shapes():
    import torch.distributed as dist

    with fake_process_group(4, rank=1):
        assert (dist.get_backend(), dist.get_world_size(), dist.get_rank()) == ("fake", 4, 1)
        group = dist.group.WORLD
        # Uneven splits (expert-parallel dispatch): the output has the rows this rank receives.
        x = torch.randn(6, 3, requires_grad=True)
        y = compat.wait_collective(compat.all_to_all_single_autograd(x, [1, 2, 3, 4], [3, 1, 1, 1], group))
        assert type(y) is torch.Tensor and y.shape == (10, 3)
        y.sum().backward()  # differentiable: the gradient goes back through the reverse all-to-all
        assert x.grad is not None and x.grad.shape == x.shape
        # Even splits (split-size exchange, Ulysses).
        counts = compat.wait_collective(compat.all_to_all_single(torch.arange(8), None, None, group))
        assert type(counts) is torch.Tensor and counts.shape == (8,)
    assert not dist.is_initialized()


def test_collective_op_names_exist():
    for namespace in compat.COLLECTIVE_NAMESPACES:
        assert getattr(torch.ops, namespace, None) is not None, namespace
    found = compat.all_to_all_overloads()
    assert torch.ops._c10d_functional.all_to_all_single.default in found
    assert torch.ops.c10d.alltoall_base_.default in found
    assert compat.op_packets("_c10d_functional", ("wait_tensor", "no_such_op")) == \
        {torch.ops._c10d_functional.wait_tensor}


def test_unflatten_mesh_views_one_world_mesh():
    from torch.distributed.device_mesh import init_device_mesh

    with fake_process_group(8, rank=5):
        root = init_device_mesh("cpu", (8,), mesh_dim_names=("world",))
        mesh = compat.unflatten_mesh(root, 0, (2, 2, 2), ("replicate", "shard", "ep"))
        assert mesh.shape == (2, 2, 2) and mesh.mesh_dim_names == ("replicate", "shard", "ep")
        assert tuple(mesh.get_coordinate()) == (1, 0, 1)  # rank 5 = 1·4 + 0·2 + 1: innermost = consecutive ranks
        assert mesh["ep"].mesh.tolist() == [4, 5]
        assert mesh["shard"].mesh.tolist() == [5, 7]
        assert mesh["replicate", "shard"].mesh.tolist() == [[1, 3], [5, 7]]
    with pytest.raises(RuntimeError, match="_unflatten"):
        compat.unflatten_mesh(SimpleNamespace(), 0, (1,), ("x",))


def test_dtensor_keeping_device_wraps_without_copying():
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard

    with fake_process_group(4, rank=1):
        mesh = init_device_mesh("cpu", (4,), mesh_dim_names=("world",))
        local = torch.ones(2, 3)
        master = compat.dtensor_keeping_device(local, mesh, [Shard(0)], torch.Size((7, 3)), (3, 1))
        assert master.to_local().data_ptr() == local.data_ptr()  # the shard itself, not a copy
        assert master.shape == (7, 3) and master.placements == (Shard(0),) and master.dtype == torch.float32


# ---- fake tensors ------------------------------------------------------------------------------

def test_fake_tensor_mode_allocates_nothing():
    assert compat.active_fake_mode() is None
    with compat.fake_tensor_mode(allow_non_fake_inputs=True) as mode:
        assert compat.active_fake_mode() is mode
        big = torch.empty(1 << 20, 1 << 20)  # 4 TiB if it were real
        assert compat.is_fake(big) and big.shape == (1 << 20, 1 << 20)
        assert compat.is_fake(big @ torch.ones(1 << 20, 2))  # real inputs mix in (meshes' rank tables)
    assert compat.active_fake_mode() is None
    assert not compat.is_fake(torch.ones(2))


# ---- dispatch-mode stack ------------------------------------------------------------------------

def test_selective_checkpoint_modes_can_be_left_and_reentered():
    """What `expert_parallel._OutsideRecomputeRegion` does for FSDP2's hooks inside a checkpointed
    block: ops run with the SAC modes popped are neither cached nor replayed, and gradients stay right."""
    from torch.utils.checkpoint import checkpoint

    from xplan.runtime.recompute import selective_context_fn

    popped = []

    def block(x):
        modes = compat.pop_dispatch_modes_while(compat.is_selective_checkpoint_mode)
        popped.append([type(m).__name__ for m in modes])
        try:
            y = x.sin()
        finally:
            compat.push_dispatch_modes(modes)
        return (y * x).cos()

    x = torch.randn(5, requires_grad=True)
    checkpoint(block, x, use_reentrant=False, context_fn=selective_context_fn).sum().backward()
    assert popped == [["_CachingTorchDispatchMode"], ["_CachedTorchDispatchMode"]]  # forward, recompute
    ref = x.detach().clone().requires_grad_()
    (ref.sin() * ref).cos().sum().backward()
    torch.testing.assert_close(x.grad, ref.grad)


# ---- module hooks ------------------------------------------------------------------------------

def test_move_forward_hooks_reorders_registered_hooks():
    module, order = nn.Identity(), []
    for name in ("a", "b", "c"):
        module.register_forward_pre_hook(lambda m, args, name=name: order.append(f"pre-{name}"))
        module.register_forward_hook(lambda m, args, out, name=name: order.append(f"post-{name}"))
    names = {h: h.__defaults__[0] for h in [*module._forward_pre_hooks.values(), *module._forward_hooks.values()]}
    compat.move_forward_hooks(module, first_pre_hooks=lambda h: names[h] == "c", last_hooks=lambda h: names[h] == "a")
    module(torch.ones(1))
    assert order == ["pre-c", "pre-a", "pre-b", "post-b", "post-c", "post-a"]


# ---- FSDP2 internals ---------------------------------------------------------------------------

@pytest.mark.parametrize(("shape", "chunks", "dim"), [((10, 3), 4, 0), ((7, 5), 8, 0), ((256, 4), 256, 0),
                                                      ((3, 16), 8, 1), ((5,), 2, 0), ((1, 4), 16, 0), ((0, 4), 4, 0)])
def test_lazy_chunks_equal_fsdp_chunk_with_empty(shape, chunks, dim):
    t = torch.randn(shape)
    eager, lazy = compat.fsdp_chunk_with_empty(t, chunks, dim), compat.chunk_with_empty(t, chunks, dim)
    assert len(eager) == len(lazy) == chunks
    for a, b in zip(eager, lazy, strict=True):
        assert a.shape == b.shape and a.stride() == b.stride() and a.storage_offset() == b.storage_offset()
        assert torch.equal(a, b)


def test_lazy_fsdp_chunks_shard_parameters_like_fsdp2(monkeypatch):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    calls = []
    lazy = compat.chunk_with_empty

    def spy(tensor, num_chunks, dim):
        calls.append(num_chunks)
        return lazy(tensor, num_chunks, dim)

    monkeypatch.setattr(compat, "chunk_with_empty", spy)
    with fake_process_group(4, rank=1):
        mesh = init_device_mesh("cpu", (4,), mesh_dim_names=("world",))
        linear = nn.Linear(3, 10)
        full = linear.weight.detach().clone()
        with compat.lazy_fsdp_chunks():
            fully_shard(linear, mesh=mesh)
        assert calls and set(calls) == {4}  # FSDP2 sharded through the patched chunking
        assert linear.weight.to_local().shape == (3, 3)  # rows 3..5 of 10: chunks of ceil(10 / 4)
        assert torch.equal(linear.weight.to_local(), full[3:6])
        calls.clear()
        fully_shard(nn.Linear(3, 10), mesh=mesh)
        assert not calls  # the patch is undone on exit


def test_fsdp_unsharded_grads_are_the_accumulated_gradients():
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    with fake_process_group(1):
        linear = nn.Linear(4, 3)
        fully_shard(linear, mesh=init_device_mesh("cpu", (1,), mesh_dim_names=("world",)))
        linear.set_requires_gradient_sync(False)  # deferred sync: gradients stay unsharded
        x = torch.randn(5, 4)
        linear(x).sum().backward()
        grads = {tuple(g.shape): g for g in compat.fsdp_unsharded_grads(linear)}
        assert set(grads) == {(3, 4), (3,)}
        torch.testing.assert_close(grads[(3, 4)], torch.ones(5, 3).t() @ x)
        torch.testing.assert_close(grads[(3,)], torch.full((3,), 5.0))


# ---- DTensor shape propagation -----------------------------------------------------------------

def test_skip_sharding_propagation_marks_dtensor_shape_propagation(monkeypatch):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard
    from torch.distributed.tensor._sharding_prop import ShardingPropagator

    flags = []
    original = ShardingPropagator._propagate_tensor_meta_non_cached

    def probe(self, op_schema):
        flags.append(compat.in_sharding_propagation())
        return original(self, op_schema)

    monkeypatch.setattr(ShardingPropagator, "_propagate_tensor_meta_non_cached", probe)
    with fake_process_group(2):
        mesh = init_device_mesh("cpu", (2,), mesh_dim_names=("world",))
        with compat.skip_sharding_propagation(), compat.fake_tensor_mode(allow_non_fake_inputs=True):
            d = DTensor.from_local(torch.randn(2, 5), mesh, [Shard(0)], run_check=False)
            out = (d * 3.0 + 1.0).sum(dim=1)
        assert out.shape == (4,) and out.placements == (Shard(0),)
    assert flags and all(flags)  # DTensor propagated shapes, every time inside the mark
    assert ShardingPropagator._propagate_tensor_meta_non_cached is probe  # restored on exit
    assert not compat.in_sharding_propagation()


# ---- FSDPMemTracker ----------------------------------------------------------------------------

def test_mem_tracker_base_reads_the_tracker_state():
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    base = compat.mem_tracker_base()

    class Probe(base):
        extra_categories = ("Optimizer scratch",)

        def __init__(self, model, optimizer):
            super().__init__(model, optimizer)
            self.states, self.registered = [], 0

        def category_of(self, func):
            return "Optimizer scratch" if self.in_optimizer_step else self.Ref.ACT

        def on_hooks_registered(self):
            self.registered += 1

        def on_memory_change(self):
            self.states.append((self.in_backward, self.in_optimizer_step, self.in_recompute,
                                set(self.running_modules)))

    with fake_process_group(2):
        mesh = init_device_mesh("cpu", (2,), mesh_dim_names=("world",))
        with compat.fake_tensor_mode(allow_non_fake_inputs=True) as fake:
            model = nn.Sequential(nn.Linear(8, 16), nn.Linear(16, 4))
            fully_shard(model[0], mesh=mesh)
            fully_shard(model, mesh=mesh)
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
            tracker = Probe(model, optimizer)
            with fake, tracker:
                model(torch.randn(3, 8)).sum().backward()
                assert tracker.module_name(model[0]) == "FSDPSequential.0"  # known once it has run
                optimizer.step()
            assert tracker.root_module is model and tracker.registered == 1
            assert any(s[0] for s in tracker.states) and any(s[1] for s in tracker.states)
            assert not any(s[2] for s in tracker.states)  # nothing recomputed here
            assert {"FSDPSequential.0", "FSDPSequential.1"} <= set().union(*(s[3] for s in tracker.states))
            snapshot = tracker.snapshots()[0]
            params = sum(p.to_local().numel() * 4 for p in model.parameters())
            assert snapshot[base.Ref.SHARDED_PARAM] == params
            assert snapshot[base.Ref.OPT] == 2 * params + 4 * 4  # AdamW moments, a step count per parameter
            assert "Optimizer scratch" in snapshot and snapshot["Total"] == sum(
                v for k, v in snapshot.items() if k != "Total")
            extra = torch.empty(4, 4)
            tracker.label(extra, base.Ref.SHARDED_GRAD)
            assert tracker.snapshots()[0][base.Ref.SHARDED_GRAD] == params + 64


def test_allocator_settings_round_trip():
    from xplan.runtime import compat

    before = compat.allocator_settings()
    try:
        compat.set_allocator_settings("expandable_segments:True")
        assert "expandable_segments:True" in compat.allocator_settings()
    finally:
        compat.set_allocator_settings(before or "expandable_segments:False")
