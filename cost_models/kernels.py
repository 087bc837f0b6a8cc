"""What one kernel costs on a hardware profile: GEMM, fused attention, memory-bound ops and
collectives, as small pure functions of (profile, shape).

Every time formula of xplan lives here once; the profile (``hw_profiles``) holds only the
constants they read. Everything is in SI units: FLOPs, bytes, bytes/s, seconds.
"""

from __future__ import annotations

from xplan.errors import InputError
from xplan.hw_profiles.schema import COLLECTIVES, Profile, canonical_dtype

#: Bytes per element of each compute dtype.
DTYPE_BYTES: dict[str, int] = {"bf16": 2, "fp8": 1, "fp32": 4}
#: The dtype a GEMM writes its output in: fp8 GEMMs write bf16, the others their input dtype.
GEMM_OUTPUT_DTYPE: dict[str, str] = {"bf16": "bf16", "fp8": "bf16", "fp32": "fp32"}


# ---------------------------------------------------------------------- GEMM
def gemm_flops(m: float, n: float, k: float, groups: int = 1) -> float:
    """FLOPs of ``groups`` GEMMs of [m, k] x [k, n] (a multiply and an add per term)."""
    return 2.0 * m * n * k * groups


def gemm_bytes(m: float, n: float, k: float, dtype: str, groups: int = 1) -> tuple[float, float]:
    """(input bytes, output bytes) of ``groups`` GEMMs of [m, k] x [k, n]: both operands read
    once, the output written once (what the HBM roofline counts)."""
    d = canonical_dtype(dtype)
    return (groups * (m * k + k * n) * DTYPE_BYTES[d],
            groups * m * n * DTYPE_BYTES[GEMM_OUTPUT_DTYPE[d]])


def width_alignment(n: float, k: float) -> str | None:
    """How a GEMM's widths n, k miss cuBLAS's 8-element (16-byte bf16) alignment: ``odd`` when
    either is odd (or fractional), ``even`` when both are even but one is off a multiple of 8,
    None when both are aligned (see ``GemmModel.unaligned``)."""
    widths = [round(v) for v in (n, k)]
    if any(abs(v - w) > 1e-6 or w % 2 for v, w in zip((n, k), widths, strict=True)):
        return "odd"
    if any(w % 8 for w in widths):
        return "even"
    return None


def gemm_rate(profile: Profile, n: float, k: float, dtype: str = "bf16") -> float:
    """Compute-bound FLOP/s of a GEMM with widths n, k: peak x ``gemm.max_fraction``, the
    fraction capped by ``gemm.unaligned`` for bf16 widths off a multiple of 8 (fp8 stacks pad
    their operands and are not affected)."""
    d = canonical_dtype(dtype)
    gemm = profile.compute.gemm
    fraction = getattr(gemm.max_fraction, d)
    alignment = width_alignment(n, k) if gemm.unaligned is not None and d == "bf16" else None
    if alignment is not None:
        fraction = min(fraction, getattr(gemm.unaligned, alignment))
    return profile.peak_flops(d) * fraction


def roofline_time(flops: float, rate: float, in_bytes: float, out_bytes: float, bandwidth: float,
                  overhead_s: float, epilogue_fraction: float | None = None) -> float:
    """max(FLOPs / rate, bytes / bandwidth) + overhead: a kernel bound by compute or by memory.

    With ``epilogue_fraction`` set, the output bytes leave the max and add
    ``epilogue_fraction x out_bytes / bandwidth`` after it: each output tile is stored after its
    K loop ends, which is what makes shallow-K GEMMs slow.
    """
    if epilogue_fraction is None:
        busy = max(flops / rate, (in_bytes + out_bytes) / bandwidth)
    else:
        busy = max(flops / rate, in_bytes / bandwidth) + epilogue_fraction * out_bytes / bandwidth
    return busy + overhead_s


def gemm_time(profile: Profile, m: float, n: float, k: float, dtype: str = "bf16", groups: int = 1) -> float:
    """Seconds for ``groups`` GEMMs of [m, k] x [k, n] issued as one (grouped) call: the
    roofline of ``gemm_flops`` at ``gemm_rate`` and ``gemm_bytes`` at the achievable HBM
    bandwidth, plus ``gemm.overhead_us`` (launch, pipeline fill and drain) once per call."""
    for label, v in (("m", m), ("n", n), ("k", k)):
        if v < 0:
            raise ValueError(f"gemm_time: {label}={v} must be >= 0")
    if groups < 1:
        raise ValueError(f"gemm_time: groups={groups} must be >= 1")
    gemm = profile.compute.gemm
    in_bytes, out_bytes = gemm_bytes(m, n, k, dtype, groups)
    return roofline_time(gemm_flops(m, n, k, groups), gemm_rate(profile, n, k, dtype), in_bytes, out_bytes,
                         profile.hbm_bandwidth(), gemm.overhead_us * 1e-6, gemm.epilogue_fraction)


def gemm_efficiency(profile: Profile, m: float, n: float, k: float, dtype: str = "bf16", groups: int = 1) -> float:
    """Achieved fraction of the dtype's peak for this GEMM shape (see ``gemm_time``): rises with
    every dimension and with ``groups``, stays below ``gemm.max_fraction``; 0 for an empty GEMM."""
    t = gemm_time(profile, m, n, k, dtype, groups)
    return gemm_flops(m, n, k, groups) / (profile.peak_flops(dtype) * t)


# ---------------------------------------------------------------------- attention
def causal_attention_flops(batch: float, heads: float, seq_len: float, qk_dim: float, v_dim: float,
                           backward: bool = False) -> float:
    """Model FLOPs of causal attention: the score and value matmuls over half of the (query,
    key) pairs; the backward is twice the forward (what a fused backward recomputes left out)."""
    forward = 2.0 * batch * heads * seq_len * seq_len * (qk_dim + v_dim) / 2
    return 2 * forward if backward else forward


def attention_kernel_fraction(profile: Profile, kernel: str) -> float:
    """What ``kernel`` reaches relative to the profile's fused-kernel fit: 1 for ``flash``, ``flex``
    (a compiled fused kernel, priced as one until kernels_gpu.py measures it) and ``eager``
    (priced on its own by ``eager_attention_time``), and ``sdpa`` where the profile sets no
    ``sdpa_fraction``."""
    attention = profile.compute.attention
    if kernel == "sdpa" and attention.sdpa_fraction is not None:
        return attention.sdpa_fraction
    if kernel == "flash1":
        if attention.flash1_fraction is None:
            raise InputError(f"hardware profile {profile.name!r} states no FlashAttention-1 efficiency "
                             "(compute.attention.flash1_fraction); use kernels.attention flash or sdpa.")
        return attention.flash1_fraction
    return 1.0


def attention_efficiency(profile: Profile, seq_len: float, backward: bool = False, kernel: str = "flash") -> float:
    """Achieved fraction of the dtype's peak for a fused attention kernel at ``seq_len``:
    ``max_fraction x s / (s + half_seq)`` of the pass, times ``attention_kernel_fraction``. For
    packed variable-length batches pass the document length, not the pack length."""
    if seq_len <= 0:
        raise ValueError(f"attention_efficiency: seq_len={seq_len} must be > 0")
    fit = profile.compute.attention.backward if backward else profile.compute.attention.forward
    return fit.max_fraction * seq_len / (seq_len + fit.half_seq) * attention_kernel_fraction(profile, kernel)


def attention_time(profile: Profile, flops: float, seq_len: float, backward: bool = False, kernel: str = "flash",
                   dtype: str = "bf16") -> float:
    """Seconds for one fused attention call of ``flops`` model FLOPs at ``seq_len``:
    ``(flops / (peak x fused efficiency) + tail) / kernel fraction``; launch overhead not
    included. ``eager`` (unfused matmuls) pays no tail."""
    fit = profile.compute.attention.backward if backward else profile.compute.attention.forward
    fused = attention_efficiency(profile, seq_len, backward)
    tail = 0.0 if kernel == "eager" or fit.tail_us is None else fit.tail_us * 1e-6
    return (flops / (profile.peak_flops(dtype) * fused) + tail) / attention_kernel_fraction(profile, kernel)


#: Bytes per [heads, seq, seq] score element the eager kernel's elementwise chain moves
#: (runtime/kernels/attention.py: eager_attention): forward, the bf16 scores written and read,
#: `.float()`, the scale, the mask, the fp32 softmax, the bf16 copy and its read by the value GEMM;
#: backward, the probability-gradient GEMM output, the casts', mask's, scale's and softmax's
#: backwards and the three GEMMs reading their [s, s] operand. Compiled blocks (elementwise fused)
#: keep one pass: scores read, fp32 and bf16 probabilities written (forward); the gradient, fp32
#: probabilities and the bf16 result (backward).
EAGER_SCORE_BYTES = {("forward", False): 41, ("backward", False): 49, ("forward", True): 12, ("backward", True): 16}
#: Bytes per score element the eager kernel saves for backward: the fp32 softmax output and its bf16 copy.
EAGER_SAVED_BYTES = 6


def eager_attention_time(profile: Profile, elements: float, qk_dim: float, v_dim: float, dtype: str = "bf16",
                         backward: bool = False, fused_elementwise: bool = False) -> float:
    """Seconds for unfused (`eager`) attention over ``elements`` = batch x heads x seq x seq scores:
    its batched GEMMs compute the whole square (the causal or sliding mask is applied to the
    scores afterwards), two forward (q k^T, p v) and four backward, at the GEMM rate; its softmax
    chain moves ``EAGER_SCORE_BYTES`` per element at the HBM bandwidth. Launches not included."""
    flops = 2.0 * elements * (qk_dim + v_dim) * (2 if backward else 1)
    phase = "backward" if backward else "forward"
    chain = elements * EAGER_SCORE_BYTES[(phase, fused_elementwise)]
    return flops / gemm_rate(profile, qk_dim, v_dim, dtype) + chain / profile.hbm_bandwidth()


# ---------------------------------------------------------------------- memory-bound
def memory_time(profile: Profile, nbytes: float) -> float:
    """Seconds for a memory-bound op that reads plus writes ``nbytes`` in total."""
    return nbytes / profile.hbm_bandwidth()


# ---------------------------------------------------------------------- collectives
def collective_bandwidth(profile: Profile, level: int | str, kind: str, group_size: int | None = None) -> float:
    """Achievable per-device, per-direction bus bandwidth (bytes/s, the NCCL busBw sense) of
    collective ``kind`` on one level: nominal ``bandwidth_gbps`` x ``fraction[kind]``. On a
    ``full_mesh`` level a group smaller than the level uses only (group_size-1)/(devices-1) of
    the links."""
    lv = profile.levels[profile.level_index(level)]
    if kind not in COLLECTIVES:
        raise ValueError(f"unknown collective kind {kind!r}; kinds: {', '.join(COLLECTIVES)}")
    bw = lv.bandwidth_gbps * 1e9 * getattr(lv.fraction, kind)
    if lv.topology == "full_mesh" and group_size is not None and lv.devices is not None and group_size > 1:
        bw *= (min(group_size, lv.devices) - 1) / (lv.devices - 1)
    return bw


def collective_terms(kind: str, nbytes: float, group_size: int) -> tuple[float, float]:
    """(latency steps, per-device traffic bytes) of one ring collective over ``group_size`` ranks.

    ``nbytes``: the full gathered output (all_gather), the full input (reduce_scatter), the
    buffer (all_reduce), one device's whole send buffer (all_to_all), the message (p2p). Traffic
    is (n-1)/n x nbytes in n-1 steps (all_gather, reduce_scatter, all_to_all), twice that
    (all_reduce = reduce-scatter then all-gather), or the message in one step (p2p).
    """
    if kind not in COLLECTIVES:
        raise ValueError(f"unknown collective kind {kind!r}; kinds: {', '.join(COLLECTIVES)}")
    n = group_size
    if kind == "all_reduce":
        return 2.0 * (n - 1), 2.0 * (n - 1) / n * nbytes
    if kind == "p2p":
        return 1.0, nbytes
    return float(n - 1), (n - 1) / n * nbytes


def alpha_beta_time(kind: str, nbytes: float, group_size: int, latency_s: float, bandwidth: float) -> float:
    """The alpha-beta model: one ``latency_s`` per step plus the traffic at ``bandwidth``
    (``collective_terms``); 0 for a group of one or an empty message."""
    if group_size <= 1 or nbytes <= 0:
        return 0.0
    steps, traffic = collective_terms(kind, nbytes, group_size)
    return steps * latency_s + traffic / bandwidth


def collective_time(profile: Profile, kind: str, nbytes: float, group_size: int, stride: int = 1,
                    total_devices: int | None = None) -> float:
    """Alpha-beta time of one collective on the single level its group spans (``level_for_group``):
    that level's latency per step and its ``collective_bandwidth``. ``cost_models.comm`` refines
    the bandwidth of groups that span several levels."""
    if kind not in COLLECTIVES:
        raise ValueError(f"unknown collective kind {kind!r}; kinds: {', '.join(COLLECTIVES)}")
    if group_size <= 1 or nbytes <= 0:
        return 0.0
    level = profile.level_for_group(group_size, stride, total_devices)
    return alpha_beta_time(kind, nbytes, group_size, profile.latency(level),
                           collective_bandwidth(profile, level, kind, group_size))
