"""Compute time of one micro-batch on one rank, priced op by op from the traced graph."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, replace

from .comm import under_tp_sm_margin
from .kernels import DTYPE_BYTES, attention_time, gemm_time, memory_time
from .ops import PricedOp, is_norm_module, priced_ops


@dataclass(frozen=True)
class RankWork:
    """How one rank's share of a micro-batch relates to the traced micro-batch (1 × seq_len)."""

    token_factor: float  # micro_batch / sp
    tp: int = 1
    ep: int = 1
    expert_tp: int = 0  # ranks a routed expert is split over (Layout.expert_tp); 0: tp
    imbalance: float = 1.0  # busiest EP rank's routed-token load over the mean
    precision: str = "bf16"
    seq_len: int = 4096
    traced_dtype_bytes: int = 2
    fused_elementwise: bool = True  # kernels.elementwise == "fused"
    fused_norm: bool = False  # kernels.norm == "fused": norm modules' ops fused beside eager elementwise ops
    fused_loss: bool = False  # kernels.loss == "fused": one cross-entropy kernel over the logits (fused_loss_time)
    attention_kernel: str = "flash"  # kernels.attention: sdpa prices at the profile's sdpa_fraction
    moe_gemm: str = "grouped_mm"  # kernels.moe_gemm: loop issues one GEMM per local expert
    # Selective recompute also redoes every n-th forward aten.mm of a block (torchtitan's op-level
    # SAC: 2, "every second mm"); 0: every GEMM output is kept (the trace's own policy).
    recompute_every_mm: int = 0
    # fp8: the share of a weight's cast one micro-batch pays (1 / micro-batches per step; see fp8_cast_time)
    weight_cast_share: float = 1.0


# Traced groups outside the decoder blocks (embedding, final norm, LM head, loss, ...).
OUTSIDE_BLOCKS = ("embed", "head", "loss", "norm", "rotary", "model")
FP8_ALIGNMENT = 16  # torch._scaled_mm needs both weight widths to be multiples of 16


def gemm_precision(op: PricedOp, precision: str) -> str:
    """The precision a GEMM runs in. Under fp8 the runtime converts only the decoder blocks'
    linear layers whose widths are multiples of 16 (runtime/precision.py, torchtitan's rule): the
    LM head, the routers (`mlp.gate`, `mlp.router`) and the routed experts' grouped GEMMs run in
    bf16, as its `precision_executed.kept_bf16` says."""
    if precision != "fp8":
        return precision
    router = op.module.rsplit(".", 1)[-1] in ("gate", "router")
    if op.category != "gemm" or op.group in OUTSIDE_BLOCKS or not op.module or router:
        return "bf16"
    if any(int(width) % FP8_ALIGNMENT for width in op.dims[1:]):
        return "bf16"
    return "fp8"


#: M tile of the grouped (expert) GEMM kernels on Hopper: DeepGEMM's contiguous-layout grouped
#: GEMM pads every expert's rows to get_m_alignment_for_contiguous_layout() = 128 (deepseek-ai/
#: DeepGEMM README, "M-axis" alignment of each group); CUTLASS grouped GEMMs (Transformer Engine
#: GroupedLinear, torch._grouped_mm) tile M by 128 as well (assumed the same).
GROUP_TILE_ROWS = 128


def grouped_rows(rows: float) -> float:
    """Rows one expert's GEMM computes: its `rows` plus the empty part of its last M tile. Per-
    expert token counts vary step to step around the mean, so the last tile is on average half
    empty: rows + GROUP_TILE_ROWS / 2 (0 rows: nothing computed)."""
    return rows + GROUP_TILE_ROWS / 2 if rows > 0 else 0.0


def fp8_cast_time(m: float, n: float, k: float, groups: int, work: RankWork, profile,
                  grouped: bool = False) -> float:
    """fp8 GEMMs quantise their operands: read bf16 (2 B), write fp8 (1 B) per element (the
    scaling-factor reductions ride along).

    The token-sized operand [m, k] is cast inside the kernel that produces it when elementwise
    kernels are fused (Transformer Engine's LayerNormLinear / LayerNormMLP and fused
    cast-transpose kernels, inductor's fusion under torch.compile), standalone otherwise. The
    weight-sized operand [k, n] is cast once per optimizer step: Transformer Engine caches the fp8
    weights after the step's first micro-batch (`is_first_microbatch`), so a micro-batch pays
    `weight_cast_share` = 1 / micro-batches of it.

    A grouped (expert) GEMM's token operand is the dispatched, permuted tokens: Transformer
    Engine's GroupedLinear quantises them in a kernel of its own (one multi-tensor quantise over
    the groups), fused or not.
    """
    if work.precision != "fp8":
        return 0.0
    tokens = 0.0 if work.fused_elementwise and not grouped else m * k
    return memory_time(profile, groups * (tokens + k * n * work.weight_cast_share) * 3)


def rank_gemm(op: PricedOp, work: RankWork) -> tuple[float, float, float, int, float]:
    """(m, n, k, groups, repeat) of a GEMM or grouped-GEMM op on one rank under `work`: the call
    is `groups` GEMMs of [m, k] x [k, n] issued as one, made `repeat` times."""
    m, n, k = op.dims
    if op.category == "grouped":  # m = rows per expert on the busiest EP rank (its last tile padded)
        load = work.imbalance if work.ep > 1 else 1.0
        # Experts split over expert_tp ranks see the tokens of expert_tp sequence-parallel slices.
        etp = work.expert_tp or work.tp
        rows = m * work.token_factor * work.ep * load * etp / work.tp
        # a grouped kernel pads each expert's last M tile; a loop's plain matmuls are priced as GEMMs
        rows = rows if expert_loop(op, work) else grouped_rows(rows)
        return rows, n / etp, k, max(1, op.groups // work.ep), 1.0
    if op.token_scaled:
        return m * work.token_factor, n / work.tp, k, op.groups, 1.0
    # Token count sits in a batch dimension (e.g. per-head matmuls): cost scales linearly.
    return m, n, k, op.groups, work.token_factor / work.tp


def expert_loop(op: PricedOp, work: RankWork) -> bool:
    """A routed-expert GEMM run as a loop of per-expert matmuls (`kernels.moe_gemm: loop`,
    runtime/models/grouped.py) rather than one grouped call."""
    return op.category == "grouped" and work.moe_gemm == "loop"


#: Attention kernel choices that run attention as one fused kernel per pass (`Kernels.attention`).
FUSED_ATTENTION = ("flash", "flash1")


def inside_fused_attention(op: PricedOp, work: RankWork) -> bool:
    """Whether `op` is part of the runtime's blockwise attention and `work` prices a fused kernel
    in its place: its score math runs in the kernel's registers, its tail and launch once per pass
    (see `attention_call_time`)."""
    return op.in_attention_kernel and work.attention_kernel in FUSED_ATTENTION


def attention_tail(profile, work: RankWork, backward: bool) -> float:
    """The per-call tail of one fused attention pass (see `kernels.attention_time`)."""
    from .kernels import attention_kernel_fraction

    fit = profile.compute.attention.backward if backward else profile.compute.attention.forward
    return (fit.tail_us or 0.0) * 1e-6 / attention_kernel_fraction(profile, work.attention_kernel)


def op_time(op: PricedOp, work: RankWork, profile) -> float:
    """Seconds for one traced op on one rank under `work`."""
    overhead = profile.compute.gemm.overhead_us * 1e-6
    if op.category == "attention":
        dtype = "fp32" if work.precision == "fp32" else "bf16"
        backward = op.phase == "backward"
        t = attention_time(profile, op.flops * work.token_factor / work.tp, work.seq_len, backward=backward,
                           kernel=work.attention_kernel, dtype=dtype)
        if inside_fused_attention(op, work):  # one block of a fused call: its FLOPs (group_times adds the call)
            return t - attention_tail(profile, work, backward)
        return t + overhead
    if op.category == "memory" and inside_fused_attention(op, work):
        return 0.0  # the fused kernel's own softmax and masking
    if op.category in ("grouped", "gemm"):
        m, n, k, groups, repeat = rank_gemm(op, work)
        precision = gemm_precision(op, work.precision)
        cast = (fp8_cast_time(m, n, k, groups, work, profile, grouped=op.category == "grouped")
                if precision == "fp8" else 0.0)
        if expert_loop(op, work):  # one GEMM (and its launch overhead) per local expert
            return op.repeat * repeat * (groups * gemm_time(profile, m, n, k, precision, 1) + cast)
        return op.repeat * repeat * (gemm_time(profile, m, n, k, precision, groups) + cast)
    scale = DTYPE_BYTES.get(work.precision, 2) / work.traced_dtype_bytes if work.precision == "fp32" else 1.0
    fused = work.fused_elementwise or (work.fused_norm and is_norm_module(op.module))
    nbytes = op.fused_nbytes if fused else op.nbytes
    if fused and not nbytes:
        return 0.0  # folded into a neighbouring kernel: no launch of its own
    return op.repeat * (memory_time(profile, nbytes / op.repeat * scale * work.token_factor / work.tp) + overhead)


def redone_by_selective(op: PricedOp, mm_seen: dict[str, int], every_mm: int) -> bool:
    """Whether the selective recompute policy runs this forward op again in the backward.

    The trace marks what its policy keeps (GEMMs, attention, collectives): everything else - the
    memory-bound norms, activations, RoPE - is redone, and costs its time again although it has
    no FLOPs. With `every_mm` = n, every n-th `mm` of the block (counted in forward order, as
    torchtitan's op-SAC policy counts aten.mm calls per checkpointed block) is redone as well.
    `mm_seen` carries the per-group count between calls.
    """
    if op.phase != "forward":
        return False
    if op.op == "mm" and every_mm > 0:
        mm_seen[op.group] = mm_seen.get(op.group, 0) + 1
        if mm_seen[op.group] % every_mm == 0:
            return True
    return not op.selective_saved


def traced_loss(kernel: str) -> str:
    """The loss kernel a layout's trace is taken with: a fused cross entropy prices the full loss's
    LM head and prices its loss from the logits' size (`fused_loss_time`)."""
    return "full" if kernel == "fused" else kernel


def logits_bytes(trace) -> int:
    """Bytes of the traced micro-batch's logits (the LM head GEMM's output, compute dtype)."""
    return max((op.out_bytes for op in priced_ops(trace) if op.group == "head" and op.phase == "forward"
                and op.category == "gemm"), default=0)


def fused_loss_time(trace, work: RankWork, profile) -> tuple[float, float]:
    """(forward, backward) seconds of a fused cross entropy (Transformer Engine / Megatron): the
    forward reads the logits once, the backward reads them and writes their gradient in place."""
    nbytes = logits_bytes(trace) * work.token_factor / work.tp
    overhead = profile.compute.gemm.overhead_us * 1e-6
    return memory_time(profile, nbytes) + overhead, memory_time(profile, 2 * nbytes) + overhead


def kernel_choice(work: RankWork) -> tuple[bool, bool, bool, bool]:
    """What of `work` decides which traced ops cost anything (the key of the per-trace op lists):
    fused elementwise, fused norm, fused attention, fused loss."""
    return work.fused_elementwise, work.fused_norm, work.attention_kernel in FUSED_ATTENTION, work.fused_loss


def costing_ops(trace, work: RankWork) -> list[PricedOp]:
    """The traced ops that cost time or a launch under `work`'s kernel choices, in trace order: an
    elementwise op a fused kernel folds into its neighbour (no bytes of its own) and the score
    math inside a fused attention kernel price 0 s and issue nothing, so `group_times` skips them
    (a fused loss drops the traced loss ops: `fused_loss_time` prices it). Kept per trace and
    choice of kernels: the ops of a trace never change."""
    key = kernel_choice(work)
    memo = trace.__dict__.setdefault("_costing_ops", {})
    if key not in memo:
        kept = []
        for op in priced_ops(trace):
            if work.fused_loss and op.group == "loss":
                continue
            if op.category == "memory":
                fused = work.fused_elementwise or (work.fused_norm and is_norm_module(op.module))
                if (fused and not op.fused_nbytes) or inside_fused_attention(op, work):
                    continue
            kept.append(op)
        memo[key] = kept
    return memo[key]


def _costing_op_keys(trace, work: RankWork) -> list[tuple]:
    """`costing_ops` with the keys `group_times` adds each op's time and launches under, and
    whether it is a norm (what `fused_norm` fuses), worked out once per trace and kernel choice."""
    key = kernel_choice(work)
    memo = trace.__dict__.setdefault("_costing_op_keys", {})
    if key not in memo:
        rows = []
        for op in costing_ops(trace, work):
            group, phase = op.group, op.phase
            gemm = op.category in ("gemm", "grouped")
            keys = ((group, phase), (group, "gemm") if gemm else None, (group, "gemm_" + phase) if gemm else None,
                    (group, "gemm_tp_margin") if op.category == "gemm" and under_tp_sm_margin(op.module, phase)
                    else None,
                    (group, f"attention_{phase}") if op.category == "attention" else None,
                    (group, "selective_recompute"), (group, "ops_selective"), (group, "ops"), (group, "ops_forward"))
            rows.append((op, keys, is_norm_module(op.module)))
        memo[key] = rows
    return memo[key]


def group_times(trace, work: RankWork, profile, op_times: OpTimes | None = None) -> dict[tuple[str, str], float]:
    """{(group, phase): seconds} for one instance of each traced group (block kind, embed, head...).

    Phase `selective_recompute` is what the selective recompute policy redoes of the forward (see
    `redone_by_selective`); phase `gemm` is the GEMM and grouped-GEMM time of both passes (what
    overlapped tensor-parallel collectives can hide under), `gemm_forward` / `gemm_backward` by
    pass, `gemm_tp_margin` the GEMMs an overlapped TP collective takes SMs from
    (`comm.under_tp_sm_margin`); phase `ops` counts (not seconds) the ops the host issues for both passes: every traced
    op when elementwise kernels run eagerly, else the GEMMs, attention and fused chains (what
    `host.dispatch_us` prices); `ops_forward` and `ops_selective` count those of the forward and
    of what selective recompute redoes. The runtime's blockwise attention priced as a fused
    kernel (`inside_fused_attention`) is one call per pass. `op_times`: the op times already
    priced on `profile` (a PricingContext's), looked up rather than priced again.
    """
    times = _loss_times(trace, work, profile)
    _add_op_times(times, _costing_op_keys(trace, work), work, profile, op_times)
    return dict(times)


def _loss_times(trace, work: RankWork, profile) -> defaultdict:
    """A fused cross entropy's times and launches (the traced loss ops are left out then)."""
    times: defaultdict = defaultdict(float)
    if work.fused_loss:
        forward, backward = fused_loss_time(trace, work, profile)
        times[("loss", "forward")] += forward
        times[("loss", "backward")] += backward
        times[("loss", "ops")] += 2
        times[("loss", "ops_forward")] += 1
    return times


def _add_op_times(times: defaultdict, rows: list[tuple], work: RankWork, profile,
                  op_times: OpTimes | None = None) -> None:
    """Add each op's seconds and launches to `times` under its keys (`group_times`)."""
    mm_seen: dict[str, int] = {}
    fused_calls: set[tuple[str, str]] = set()  # (group, phase) of blockwise attention priced as one kernel
    overhead = profile.compute.gemm.overhead_us * 1e-6
    priced = op_times.rows(rows, work, profile) if op_times is not None else None
    for i, (op, keys, norm) in enumerate(rows):
        phase_key, gemm_key, gemm_phase_key, tp_key, attention_key, selective_key, ops_selective_key, ops_key, \
            ops_forward_key = keys
        t = priced[i] if priced is not None else op_time(op, work, profile)
        inside = inside_fused_attention(op, work)
        fused = work.fused_elementwise or (work.fused_norm and norm)
        issued = op.category != "memory" or not fused or bool(op.fused_nbytes)
        if inside:  # the first block of a pass issues the fused call: its tail and launch, once
            issued = op.category == "attention" and phase_key not in fused_calls
            if issued:
                fused_calls.add(phase_key)
                t += attention_tail(profile, work, op.phase == "backward") + overhead
        times[phase_key] += t
        if gemm_key is not None:
            times[gemm_key] += t
            times[gemm_phase_key] += t
            if tp_key is not None:
                times[tp_key] += t
        elif attention_key is not None:  # what an eager kernel replaces (estimate.eager_attention)
            times[attention_key] += t
        # kernels the host launches for the op: one per local expert for an expert loop
        issued *= rank_gemm(op, work)[3] if expert_loop(op, work) else 1
        if redone_by_selective(op, mm_seen, work.recompute_every_mm):
            times[selective_key] += t
            times[ops_selective_key] += issued * op.repeat
        if issued:
            times[ops_key] += issued * op.repeat
            times[ops_forward_key] += issued * (op.phase == "forward") * op.repeat


def _memory_op_sums(trace, work: RankWork) -> tuple[list[tuple], dict, dict]:
    """(the rows of the ops other than memory-bound ones, {key: [bytes, launches]} and {key:
    launch count} of the memory-bound ones) for `group_times_summed`; once per trace and kernel
    choice."""
    key = kernel_choice(work)
    memo = trace.__dict__.setdefault("_memory_op_sums", {})
    if key not in memo:
        rows, seconds, counts = [], defaultdict(lambda: [0.0, 0]), defaultdict(int)
        for op, keys, norm in _costing_op_keys(trace, work):
            if op.category != "memory":
                rows.append((op, keys, norm))
                continue
            fused = work.fused_elementwise or (work.fused_norm and norm)
            nbytes = op.fused_nbytes if fused else op.nbytes
            redone = op.phase == "forward" and not op.selective_saved  # `redone_by_selective` of a non-mm op
            for k in (keys[0], keys[5]) if redone else (keys[0],):  # its phase; selective_recompute
                seconds[k][0] += nbytes
                seconds[k][1] += op.repeat
            counts[keys[7]] += op.repeat  # ops (every kept memory op is issued)
            if op.phase == "forward":
                counts[keys[8]] += op.repeat
            if redone:
                counts[keys[6]] += op.repeat
        memo[key] = (rows, dict(seconds), dict(counts))
    return memo[key]


def group_times_summed(trace, work: RankWork, profile, op_times: OpTimes | None = None) -> dict[tuple[str, str], float]:
    """`group_times` with the memory-bound ops' seconds summed per key in closed form (their bytes
    over the bandwidth plus a launch each) rather than op by op: the same up to floating-point
    reassociation (about 1e-15 relative), several times faster. A search ranks with it and
    prices what it reports with `group_times` (`PricingContext(summed=True)`)."""
    times = _loss_times(trace, work, profile)
    rows, seconds, counts = _memory_op_sums(trace, work)
    scale = DTYPE_BYTES.get(work.precision, 2) / work.traced_dtype_bytes if work.precision == "fp32" else 1.0
    per_byte = scale * work.token_factor / work.tp / profile.hbm_bandwidth()
    overhead = profile.compute.gemm.overhead_us * 1e-6
    for key, (nbytes, launches) in seconds.items():
        times[key] += nbytes * per_byte + launches * overhead
    for key, count in counts.items():
        times[key] += count
    _add_op_times(times, rows, work, profile, op_times)
    return dict(times)


class OpTimes:
    """`op_time` of each op a PricingContext has priced, shared across rank works and traces.

    An op's time is a pure function of the op's fields, the work and the profile: ops with equal
    fields (a block's ops in the traces of each loss kernel) share it, and only a routed-expert
    (grouped) GEMM reads the work's expert-parallel fields (ep, expert_tp, imbalance, moe_gemm);
    recompute_every_mm and fused_loss no op's. So every other op's time is kept per work with
    those fields at their defaults: one price serves every EP size of a micro-batch shape."""

    NOT_READ = {"recompute_every_mm": 0, "fused_loss": False}
    EXPERT_FIELDS = {"ep": 1, "expert_tp": 0, "imbalance": 1.0, "moe_gemm": "grouped_mm"}

    def __init__(self, profile) -> None:
        self.profile = profile
        self._ids: dict[PricedOp, int] = {}  # equal ops, one id
        self._rows: dict[int, tuple[list, list[int], list[bool]]] = {}  # id(rows) -> (rows, op ids, grouped)
        self._times: dict[RankWork, dict[int, float]] = {}  # work as the op reads it -> {op id: seconds}

    def rows(self, rows: list[tuple], work: RankWork, profile) -> list[float]:
        """op_time of each row's op under `work` (the rows of `_add_op_times`)."""
        if profile is not self.profile:
            raise ValueError("op times are kept for one profile")
        known = self._rows.get(id(rows))
        if known is None:  # holds `rows`, so its id names no other list
            known = self._rows[id(rows)] = (rows, [self._ids.setdefault(op, len(self._ids)) for op, _, _ in rows],
                                            [op.category == "grouped" for op, _, _ in rows])
        _, ids, grouped = known
        routed = replace(work, **self.NOT_READ)
        tables = (self._times.setdefault(replace(routed, **self.EXPERT_FIELDS), {}), self._times.setdefault(routed, {}))
        out = []
        for (op, _, _), op_id, expert in zip(rows, ids, grouped, strict=True):
            table = tables[expert]
            t = table.get(op_id)
            if t is None:
                t = table[op_id] = op_time(op, work, profile)
            out.append(t)
        return out


class PricingContext:
    """The group times one search (or one estimate) has priced on `profile`, per trace and
    `RankWork`: a search prices many layouts that share both, so it makes one context and passes
    it to every estimate. The context holds the traces it has seen, so its memo lives exactly as
    long as the search that made it and never outlives a trace."""

    def __init__(self, profile, summed: bool = False, share_ops: bool = True) -> None:
        self.profile = profile
        self.summed = summed  # group_times_summed: for ranking; what is reported is priced again exactly
        self._memos: list[tuple[object, dict[RankWork, dict[tuple[str, str], float]]]] = []
        # Op times shared across rank works and traces (`OpTimes`): what a context pricing many
        # layouts gains; one estimate alone prices each op once anyway.
        self.op_times = OpTimes(profile) if share_ops else None
        self.memos: dict[str, dict] = {}  # other priced results by kind (peak_memory: 'memory')

    def group_times(self, trace, work: RankWork) -> dict[tuple[str, str], float]:
        """`group_times(trace, work, self.profile)`, priced once per (trace, work)."""
        memo = next((m for known, m in self._memos if known is trace), None)
        if memo is None:  # a search holds one trace per loss kernel: a short list
            memo = {}
            self._memos.append((trace, memo))
        if work not in memo:
            memo[work] = (group_times_summed if self.summed else group_times)(trace, work, self.profile,
                                                                             self.op_times)
        return memo[work]


def pricing_for(profile, pricing: PricingContext | None) -> PricingContext:
    """`pricing` when it prices on `profile`, a fresh context when None (one estimate alone)."""
    if pricing is None:
        return PricingContext(profile, share_ops=False)
    if pricing.profile is not profile:
        raise ValueError(f"a pricing context for profile {pricing.profile.name!r} cannot price on {profile.name!r}")
    return pricing
