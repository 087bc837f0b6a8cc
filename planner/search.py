"""Search: enumerate layouts, check constraints, prune dominated ones, price the rest.

Space: FSDP shard group (whole data-parallel world, each interconnect level's unit = HSDP; 1 =
ZeRO-1 with `allow_3d`), expert parallel, Ulysses, recompute (none, selective, fractions, full), offload,
blocks kept gathered across micro-batches (by MLP kind), token tiles of the feed-forward half
(`TILE_TOKENS`, where a rank's micro-batch has more tokens), micro-batch (gradient accumulation
follows from the global batch), loss kernel; TP/PP with `allow_3d`. Decisions given by the caller
are pinned.

Pruning (exact, so `exhaustive=True` finds the same best plan): for one "core" layout (sharding,
EP, SP, micro-batch, loss kernel) and offload setting, the recompute settings none → 25% → 50% →
75% → full use monotonically less memory and more time, so the first that fits is the fastest
fitting one and the rest of the chain is dominated ('selective' is priced on its own). With
activation offload the copy time falls as recompute rises, so every fitting setting of such a
chain is priced. Memory is checked before time, so layouts that cannot fit are never fully priced.
Token tiling adds compute at a given recompute setting (each tile's forward is redone, GEMMs
shrink, all-to-alls multiply), which can also hide more of the FSDP collectives, so without
activation offload tiles are tried on the settings up to the untiled (then the larger tile's)
first fit. Under activation
offload tiling also shrinks the host traffic, so tiles are tried on the whole chain there. Each
offload and keep_gathered setting gets its own tiling and recompute chain: the three are weighed
together by the time of what fits. Offload only adds time at a given recompute and tiling, so
once the untiled layout without offload fits, offloaded variants are priced only up to its
recompute setting; blocks kept gathered only add memory, so a kept variant's bisection starts
where the same layout keeping none first fit.

Across cores, branch and bound (`search_bounds`): cores are priced fastest bound first, and a core
none of whose variants can be listed (within `LISTED_SHARE` of the fastest plan, among the `top`
or on the Pareto front) nor beat the best runnable plan is skipped.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, get_args

from xplan.errors import InputError
from xplan.layout import (
    DEFAULT_KERNELS,
    DEVICE_TYPE_OF_KIND,
    GATHERED_KINDS,
    Layout,
    check_layout,
    runtime_refusals,
)
from xplan.layout_tiles import feed_forward_tiles, tile_count
from xplan.layout_values import parse_recompute

from .pricing import (
    Workload,
    check_pinned_images,
    device_kernel_defaults,
    get_trace,
    load_hw,
    load_model_config,
    workload_image_refusals,
)
from .search_bounds import LISTED_SHARE, SearchBounds, Variants, _Core, collector_paused, tile_tried

# Increasing time cost: what to try first when memory allows.
RECOMPUTE_ORDER: tuple[str | float, ...] = ("none", "selective", 0.25, 0.5, 0.75, "full")
VISION_RECOMPUTES: tuple[str, ...] = get_args(Layout.model_fields["vision_recompute"].annotation)
OFFLOAD_ORDER: tuple[tuple[str, ...], ...] = ((), ("optimizer",), ("activations",), ("optimizer", "activations"),
                                              ("params",))
MAX_MICRO_BATCH = 16
MAX_EP, MAX_SP = 64, 16
LOSS_KERNELS = ("chunked", "full")
TILE_TOKENS: tuple[int, ...] = (8192, 4096)  # tile sizes tried, largest (cheapest) first


@dataclass
class SearchResult:
    plans: list[Any]  # Estimates that fit, best first
    pareto: list[Any]  # fitting estimates not dominated in (throughput, memory)
    candidates_evaluated: int
    search_time_s: float
    smallest: dict[str, Any] = field(default_factory=dict)  # lowest-peak estimate without / with offload
    best_runnable: Any = None  # fastest fitting estimate the runtime executes on the profile's device
    device_type: str = "cuda"
    rejected: dict[str, int] = field(default_factory=dict)  # constraint -> count
    trace_time_s: float = 0.0  # loading model, profile and traces (tracing when not cached)
    headroom_bytes: float = 0.0  # device memory kept free: a layout fits within HBM less this


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _powers_of_two_upto(n: int) -> list[int]:
    return [2**i for i in range(max(n, 0).bit_length())]


def gathered_choices(config, images: bool = False) -> list[tuple[str, ...]]:
    """`keep_gathered` settings to try: none, each block kind (by MLP) the model has, all of them;
    with images, a vision-language model's tower too."""
    kinds = config.block_kinds | ({"vision"} if images and config.is_vlm else set())
    present = tuple(k for k in GATHERED_KINDS if k in kinds)
    return list(dict.fromkeys([(), *((k,) for k in present), present]))


def recompute_chains(recomputes: list) -> list[list]:
    """Recompute settings grouped so that along each chain memory falls and time rises:
    none → fractions → full; 'selective' (op-level) stands alone."""
    chain = [r for r in recomputes if r != "selective"]
    chains = [chain] if chain else []
    if "selective" in recomputes:
        chains.append(["selective"])
    return chains


def search_dp_mode(fsdp: int, dp_world: int) -> str:
    """The data-parallel mode the search prices a shard-group size as: fsdp 1 is Megatron's
    distributed optimizer (ZeRO-1), the comparison layouts of `allow_3d`."""
    if fsdp == dp_world:
        return "fsdp"
    return "zero1" if fsdp == 1 else "hsdp"


def fsdp_choices(dp_world: int, profile, allow_3d: bool = False, dp_mode: str | None = None) -> list[int]:
    """Whole world and one unit of each interconnect level (HSDP); 1 (Megatron's distributed
    optimizer, ZeRO-1, priced for comparison only) when pricing 3D layouts. A pinned dp_mode
    keeps the sizes it allows."""
    if dp_mode in ("ddp", "zero1"):
        return [1]
    if dp_mode == "fsdp":
        return [dp_world]
    choices = {dp_world}
    if allow_3d or dp_world == 1:
        choices.add(1)
    for level in profile.levels:
        if level.devices and level.devices < dp_world and dp_world % level.devices == 0:
            choices.add(level.devices)
    if dp_mode == "hsdp":
        choices = {c for c in choices if 1 < c < dp_world}
    return sorted(choices, reverse=True)


def ep_choices(config, fsdp: int, dp_world: int) -> list[int]:
    if not config.num_experts:
        return [1]
    group = fsdp if fsdp > 1 else dp_world
    # EP beyond 64 ranks is all-to-all over the slowest level for every token: not explored.
    return [e for e in _powers_of_two_upto(min(group, config.num_experts, MAX_EP))
            if config.num_experts % e == 0 and group % e == 0] or [1]


def sp_choices(config, dp_world: int, seq_len: int) -> list[int]:
    heads = config.num_heads
    kv = heads if config.attention_kind == "mla" else config.num_kv_heads
    return [s for s in _powers_of_two_upto(min(MAX_SP, dp_world)) if heads % s == 0 and (kv % s == 0 or s % kv == 0)
            and seq_len % s == 0 and dp_world % s == 0]


def core_layouts(config, workload: Workload, devices: int, profile, pinned: dict[str, Any],
                 allow_3d: bool, ranks_per_device: int = 1) -> list[dict[str, Any]]:
    """Sharding × EP × SP × micro-batch × loss (× TP/PP) before recompute/offload are chosen.
    Sizes count ranks (devices × ranks_per_device; `profile` is the per-rank view)."""
    ranks = devices * ranks_per_device
    tps = [pinned["tp"]] if "tp" in pinned else ([1, 2, 4, 8] if allow_3d else [1])
    pps = [pinned["pp"]] if "pp" in pinned else ([1, 2, 4, 8, 16] if allow_3d else [1])

    def runs_images(sp: int, micro_batch: int) -> bool:  # tp and pp: priced for comparison regardless
        return not workload_image_refusals(workload, SimpleNamespace(sp=sp, tp=1, pp=1, micro_batch=micro_batch))

    # The vision tower's recompute, with image tokens: none, selective and full are each priced
    # (they trade its saved activations for redone forwards like the decoder's settings).
    visions = [pinned["vision_recompute"]] if "vision_recompute" in pinned else (
        list(VISION_RECOMPUTES) if workload.image_tokens and config.is_vlm else [])
    out = []
    for tp, pp in itertools.product(tps, pps):
        if ranks % (tp * pp):
            continue
        dp_world = ranks // (tp * pp)
        vpps = [pinned["vpp"]] if "vpp" in pinned else ([1, 2, 4] if pp > 1 else [1])
        fsdps = [pinned["fsdp"]] if "fsdp" in pinned else fsdp_choices(dp_world, profile, allow_3d,
                                                                        pinned.get("dp_mode"))
        for fsdp in fsdps:
            dp_mode = pinned.get("dp_mode") or search_dp_mode(fsdp, dp_world)
            eps = [pinned["ep"]] if "ep" in pinned else ep_choices(config, fsdp, dp_world)
            sps = [pinned["sp"]] if "sp" in pinned else sp_choices(config, dp_world, workload.seq_len)
            for ep, sp, vpp in itertools.product(eps, sps, vpps):
                data_parallel = dp_world // sp if dp_world % sp == 0 else 0
                per_rank = workload.global_batch // data_parallel if data_parallel else 0
                mbs = [pinned["micro_batch"]] if "micro_batch" in pinned else [
                    m for m in range(1, MAX_MICRO_BATCH + 1)
                    if per_rank and workload.global_batch % (data_parallel * m) == 0]
                mbs = [m for m in mbs if runs_images(sp, m)]
                losses = [pinned["loss"]] if "loss" in pinned else list(LOSS_KERNELS)
                for mb, loss, vision in itertools.product(mbs, losses, visions or [None]):
                    out.append({"devices": devices, "ranks_per_device": ranks_per_device, "dp_mode": dp_mode,
                                "fsdp": fsdp, "ep": ep, "sp": sp, "tp": tp, "pp": pp, "vpp": vpp, "micro_batch": mb,
                                "loss": loss, **({"vision_recompute": vision} if vision else {})})
    return out


@collector_paused()
def search(workload: Workload, devices: int, pinned: dict[str, Any] | None = None, *, allow_3d: bool = False,
           exhaustive: bool = False, top: int = 10, bound: bool = True,
           progress: Callable[[int, int], None] | None = None, headroom_bytes: float = 0.0) -> SearchResult:
    """Find the fastest layouts that fit; see the module docstring for the space and pruning.
    `headroom_bytes`: device memory to keep free (a layout fits when its peak is within HBM less
    this). `bound`: skip core layouts none of whose variants can be listed (`search_bounds`;
    `exhaustive` prices everything)."""
    from xplan.cost_models import PricingContext, estimate, fits_memory, host_capacity, memory_estimate

    loading = time.perf_counter()
    workload.check()
    if devices < 1:
        raise InputError(f"--devices must be a positive integer, got {devices}.")
    pinned = dict(pinned or {})
    config = load_model_config(workload.model)
    check_pinned_images(workload, pinned)
    device_profile = load_hw(workload.hardware)
    # Sizes, memory and times are per rank: a3 runs two ranks (dies) per device, each with half of it.
    ranks_per_device = device_profile.device.ranks_per_device
    profile = device_profile.per_rank()
    # Op times priced once per (trace, rank work) for this search, memory-bound ops summed per key:
    # candidates are ranked with these; what the search reports is priced again exactly (`exact`).
    pricing, exact = PricingContext(profile, summed=True), PricingContext(profile)
    precision = pinned.pop("precision", "bf16")
    elementwise = pinned.pop("elementwise", device_kernel_defaults(profile)["elementwise"])
    pinned_kernels = {slot: pinned.pop(slot) for slot in ("attention", "moe_gemm") if slot in pinned}
    # Knobs the search does not vary: a pinned value reaches every layout it prices.
    extra = {name: pinned.pop(name) for name in ("tp_comm", "allocator") if name in pinned}
    recomputes = [parse_recompute(pinned.pop("recompute"))] if "recompute" in pinned else list(RECOMPUTE_ORDER)
    offloads = [pinned.pop("offload")] if "offload" in pinned else list(OFFLOAD_ORDER)
    tile_options = [pinned.pop("tile_tokens")] if "tile_tokens" in pinned else [None, *TILE_TOKENS]
    keeps = [pinned.pop("keep_gathered")] if "keep_gathered" in pinned else gathered_choices(
        config, bool(workload.image_tokens))
    losses = [pinned["loss"]] if "loss" in pinned else list(LOSS_KERNELS)
    traces = {(loss, 1): get_trace(workload.model, workload.seq_len, loss, 1, workload.image_tokens)
              for loss in losses}
    tracing = [0.0]

    def trace_for(loss: str, tiles: int):
        """The trace of `tiles` token tiles, traced on first use (its time is not search time)."""
        if (loss, tiles) not in traces:
            began = time.perf_counter()
            traces[(loss, tiles)] = get_trace(workload.model, workload.seq_len, loss, tiles, workload.image_tokens)
            tracing[0] += time.perf_counter() - began
        return traces[(loss, tiles)]

    # The clock starts once model, profile and traces are loaded (tracing is cached on disk and
    # timed by its own benchmark): it measures enumerating and pricing.
    start = time.perf_counter()
    cores = core_layouts(config, workload, devices, profile, pinned, allow_3d, ranks_per_device)
    fitting, evaluated, smallest, rejected = [], 0, None, {}
    smallest_memory: dict[str, tuple] = {}  # 'device' / 'offload' -> (peak bytes, layout, trace)

    def track(memory, layout, trace) -> None:
        kind = "offload" if layout.offload else "device"
        if kind not in smallest_memory or memory.allocated < smallest_memory[kind][0]:
            smallest_memory[kind] = (memory.allocated, layout, trace)

    # Per rank (the rank profile: a node level counts ranks, its host memory is split per rank).
    hbm = profile.hbm_bytes() - headroom_bytes / ranks_per_device
    host = host_capacity(profile, devices * ranks_per_device)
    if headroom_bytes < 0 or hbm <= 0:
        raise InputError(f"--headroom must be at least 0 and below the device memory "
                         f"({device_profile.hbm_bytes() / 2**30:.0f} GiB), got {headroom_bytes / 2**30:.1f} GiB.")
    device_type = DEVICE_TYPE_OF_KIND.get(device_profile.device.kind, "cuda")
    chains = recompute_chains(recomputes)
    variants = Variants()  # a core's variants: copies of its validated layout
    prepared: list[_Core] = []
    for i, core in enumerate(cores):
        loss = core.pop("loss")
        kernels = {**DEFAULT_KERNELS, **pinned_kernels, "loss": loss, "elementwise": elementwise}
        try:
            base = Layout(**core, **extra, precision=precision, kernels=kernels)
            check_layout(base, config, workload.seq_len, workload.global_batch)
        except InputError as exc:
            reason = str(exc).split(" (")[0][:60]
            rejected[reason] = rejected.get(reason, 0) + 1
            continue
        # Recompute and offload leave the gradient accumulation alone; kept-gathered blocks need
        # FSDP's resharding.
        prepared.append(_Core(i, core, base, loss, kernels, base.grad_accum(workload.global_batch),
                              core["dp_mode"] in ("fsdp", "hsdp")))

    def price_core(c: _Core, memory_cap: float | None = None) -> None:
        """Price one core layout's recompute × offload × keep_gathered × tiling variants (the
        pruning of the module docstring); fitting estimates go to `fitting`. With `memory_cap`,
        variants whose allocated peak reaches it are not priced (`SearchBounds.memory_cap`)."""
        nonlocal evaluated
        base, loss, grad_accum = c.base, c.loss, c.grad_accum
        # Offload only adds time (copies, a host-side step) at a given recompute and tiling: once
        # the untiled layout without offload fits at chain[i], offloaded variants are priced on
        # chain[:i + 1] only (the tie at i kept: an offload that costs no time but memory wins).
        plain_limit: dict[tuple, int] = {}
        # Blocks kept gathered only add memory: a kept variant fits no earlier along its chain than
        # the same layout keeping none (checked first), so its bisection starts where that one's ended.
        keep_floor: dict[tuple, int] = {}
        for offload, keep, (n, chain) in itertools.product(offloads, keeps if c.sharded else [()], enumerate(chains)):
            offload = tuple(offload)
            # Recompute settings a tiled or offloaded layout may still win with: chain[:limit].
            limit = len(chain) if not offload else plain_limit.get((keep, n), len(chain))
            for tile in tile_options:
                tiles = tile_count(base.micro_batch * workload.seq_len // base.sp, tile)
                if not tile_tried(tile, tiles, "selective" in chain, len(tile_options)):
                    continue
                if limit == 0:
                    break
                trace = trace_for(loss, tiles)
                template = variants.of(base, offload=offload, keep_gathered=keep, tile_tokens=tile, recompute=chain[0])

                def make(recompute, template=template):
                    """The group's layout at one recompute setting (values parsed once, below)."""
                    return template.model_copy(update={"recompute": recompute})
                if exhaustive:
                    candidates = [make(r) for r in chain[:limit]]
                else:
                    # Memory falls along the chain: bisect for the first layout that fits (only the
                    # layouts the bisection reaches are built).
                    lo = min(limit, keep_floor.get((offload, n, tile), 0)) if keep else 0
                    hi, first_fitting = limit, None
                    while lo < hi:
                        mid = (lo + hi) // 2
                        layout = make(chain[mid])
                        evaluated += 1
                        memory = memory_estimate(trace, layout, device_profile, grad_accum, workload.imbalance,
                                                 config, pricing=pricing)
                        if fits_memory(memory, hbm, host):
                            hi, first_fitting = mid, layout
                        else:
                            lo = mid + 1
                            track(memory, layout, trace)
                    if not keep:
                        keep_floor[(offload, n, tile)] = lo
                    candidates = [first_fitting] if first_fitting is not None else []
                    if first_fitting is not None and not offload and tile is None:
                        plain_limit[(keep, n)] = lo + 1
                    if first_fitting is not None and "activations" in offload:
                        # Offloaded activations cost copy time that falls as recompute rises (less
                        # to copy): time is not monotone along such a chain, so every fitting
                        # setting is priced.
                        candidates += [make(r) for r in chain[lo + 1:limit]]
                    if "activations" not in offload:
                        # The next (smaller) tile is tried up to this one's first fit: tiling adds
                        # compute, which can also hide FSDP collectives, so at the same recompute
                        # setting a tiled layout may be the faster one.
                        limit = min(limit, lo + 1)
                for layout in candidates:
                    if memory_cap is not None and memory_estimate(
                            trace, layout, device_profile, grad_accum, workload.imbalance, config,
                            pricing=pricing).allocated >= memory_cap:
                        continue
                    evaluated += exhaustive
                    est = estimate(trace, config, layout, device_profile, workload.global_batch,
                                   workload.imbalance, pricing=pricing, image_fraction=workload.image_fraction)
                    if fits_memory(est.memory, hbm, host):
                        fitting.append((c.index, est))
                    else:
                        track(est.memory, layout, trace)

    order = prepared
    bounds = None
    if bound and not exhaustive:
        # Branch and bound: cores in order of the fastest any of their variants could be; a core
        # none of whose variants could reach the listed plans, the Pareto front or the best
        # runnable plan is not priced (see `SearchBounds`).
        bounds = SearchBounds(workload, config, device_profile, pricing, trace_for, top, offloads, keeps,
                              tile_options, chains, recomputes, device_type, variants)
        for c in prepared:
            c.fastest = bounds.fastest(c)
        order = sorted(prepared, key=lambda c: -c.fastest)
    skipped: list[_Core] = []
    capped: list[_Core] = []  # priced under a memory cap: only their light variants can be listed
    for n, c in enumerate(order):
        if progress and n % 16 == 0:
            progress(n, len(order))
        if bounds is not None and bounds.cannot_matter(c, fitting):
            skipped.append(c)
            continue
        cap = bounds.memory_cap(c, fitting) if bounds is not None else None
        if cap is not None:
            capped.append(c)
        price_core(c, cap)
    # The threshold a core was skipped or capped against can fall as later plans dominate earlier
    # ones: checked again against the final set until it holds for every such core; a capped core
    # that no longer qualifies is priced again in full.
    while bounds is not None:
        late = [c for c in skipped if not bounds.cannot_matter(c, fitting, exact=True)]
        redo = [c for c in capped if bounds.memory_cap(c, fitting, exact=True) is None]
        if not late and not redo:
            break
        for c in late:
            skipped.remove(c)
            price_core(c)
        for c in redo:
            capped.remove(c)
            fitting[:] = [pair for pair in fitting if pair[0] != c.index]
            price_core(c)
    if bounds is not None:
        evaluated += bounds.evaluated
    fitting = [est for _, est in sorted(fitting, key=lambda pair: pair[0])]  # the order of `cores`
    smallest = {}
    for kind, (_, layout, trace) in smallest_memory.items():
        smallest[kind] = estimate(trace, config, layout, device_profile, workload.global_batch, workload.imbalance,
                                  pricing=exact, image_fraction=workload.image_fraction)
    repriced: dict[int, Any] = {}

    def reported(est):
        """`est` priced exactly, op by op (the search ranked it with memory-bound ops summed)."""
        if id(est) not in repriced:
            layout = est.layout  # priced on the trace of its loss kernel and token tiles
            trace = trace_for(layout.kernels.loss, feed_forward_tiles(layout, workload.seq_len))
            repriced[id(est)] = estimate(trace, config, layout, device_profile, workload.global_batch,
                                         workload.imbalance, pricing=exact, image_fraction=workload.image_fraction)
        return repriced[id(est)]
    if progress:
        progress(len(cores), len(cores))
    # Listed: plans within LISTED_SHARE of the fastest one's throughput (slower ones are not worth
    # choosing: --headroom asks for memory to spare instead), ranked, and the Pareto front of those.
    floor = LISTED_SHARE * max((e.tokens_per_s_per_device for e in fitting), default=0.0)
    listed = [e for e in fitting if e.tokens_per_s_per_device >= floor]
    ranked = rank_plans(listed)
    # From every fitting layout, not the ranked list: rank_plans drops a layout another one beats on
    # speed and memory, and with allow_3d that is often a price-only 3D layout beating every runnable one.
    runnable = next((e for e in sorted(fitting, key=rank_key) if not runtime_refusals(e.layout, device_type)), None)
    plans = sorted((reported(e) for e in ranked[:top]), key=rank_key)
    return SearchResult(plans=plans, pareto=[reported(e) for e in pareto_front(listed)], candidates_evaluated=evaluated,
                        search_time_s=time.perf_counter() - start - tracing[0], smallest=smallest,
                        rejected=rejected, best_runnable=runnable and reported(runnable), device_type=device_type,
                        trace_time_s=start - loading + tracing[0], headroom_bytes=headroom_bytes)


def rank_key(est: Any) -> tuple:
    """Fastest first, then the smaller allocated peak (what must fit), then less offload."""
    return -round(est.tokens_per_s_per_device, 6), est.memory.allocated, len(est.layout.offload)


def rank_plans(estimates: list[Any]) -> list[Any]:
    """Fastest first; a plan no faster than one already listed and using no less memory is dropped
    (e.g. an offload that changes nothing)."""
    ranked = sorted(estimates, key=rank_key)
    out: list[Any] = []
    for est in ranked:
        if any(o.tokens_per_s_per_device >= est.tokens_per_s_per_device * 0.9999
               and o.memory.allocated <= est.memory.allocated for o in out):
            continue
        out.append(est)
    return out


def pareto_front(estimates: list[Any]) -> list[Any]:
    """Fitting plans no other plan beats on both throughput and peak memory, fastest first."""
    front, best_memory = [], float("inf")
    for est in sorted(estimates, key=lambda e: (-e.tokens_per_s_per_device, e.memory.allocated)):
        if est.memory.allocated < best_memory:
            front.append(est)
            best_memory = est.memory.allocated
    return front


def explain_nothing_fits(result: SearchResult, workload: Workload, devices: int) -> str:
    """The exit-2 message: smallest peak found, what dominates it, and the levers."""
    if not result.smallest:
        reasons = "; ".join(f"{k} ({v}x)" for k, v in result.rejected.items()) or "no layout was valid"
        return (f"no valid layout of {workload.model} on {devices} devices: {reasons}. "
                "Change --devices or the pinned flags.")
    est = result.smallest.get("device") or result.smallest["offload"]
    mem = est.memory.gib()
    parts = sorted(((k, v) for k, v in mem.items() if k not in ("total", "allocated", "offloaded_to_host")),
                   key=lambda kv: -kv[1])[:3]
    breakdown = ", ".join(f"{k} {v:.1f}" for k, v in parts)
    lay = est.layout
    dominant = est.memory.dominant()
    levers = []
    if dominant in ("parameters", "gradients", "optimizer", "gathered_parameters"):
        levers.append(f"more devices (model states shrink with the FSDP group; {devices} now)")
    if dominant == "gathered_parameters":
        levers.append("a larger --ep (fewer experts gathered per block)")
    if dominant in ("activations", "logits_loss", "temporaries"):
        levers += ["--recompute full", "a longer Ulysses degree (--sp)", "--offload activations",
                   "a smaller --micro-batch or --seq-len"]
        if dominant == "temporaries" and lay.tile_tokens is None:
            levers.append("--tile-tokens (the feed-forward half in token tiles)")
    levers.append("--offload optimizer,params (needs host memory)")
    message = (f"no layout of {workload.model} fits on {devices} x {workload.hardware} "
               f"({est.hbm_bytes / 2**30:.0f} GiB each) at seq {workload.seq_len}: without offload the smallest "
               f"peak found is {mem['allocated']:.1f} GiB allocated (fsdp={lay.fsdp} ep={lay.ep} sp={lay.sp} "
               f"recompute={lay.recompute} micro_batch={lay.micro_batch}"
               + (f" tile_tokens={lay.tile_tokens}" if lay.tile_tokens else "") + f"), dominated by {dominant} "
               f"({breakdown} GiB).")
    off = result.smallest.get("offload")
    if off is not None:
        om = off.memory.gib()
        message += (f" With offload ({','.join(off.layout.offload)}) the device peak falls to {om['allocated']:.1f} GiB "
                    f"but {om['offloaded_to_host']:.0f} GiB must live in host memory per device, which has "
                    f"{off.host_bytes / 2**30:.0f} GiB.")
    return message + f" Levers: {'; '.join(dict.fromkeys(levers))}."
