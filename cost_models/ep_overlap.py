"""What each expert-parallel all-to-all schedule (`Layout.ep_overlap`) hides, per micro-batch.

- ``exposed``: the dispatch and combine all-to-alls sit on the critical path (the runtime, and
  Megatron's alltoall dispatcher without overlap).
- ``microbatch``: one micro-batch's all-to-alls run while another micro-batch computes
  (Megatron-core's EP A2A overlap, `--overlap-moe-expert-parallel-comm`, Megatron-Bridge's
  `moe_a2a_overlap`: the forward of micro-batch i+1 and the backward of micro-batch i are
  scheduled as one merged chunk, each one's communication under the other's compute). Only
  micro-batches that have a partner overlap: the warm-up forwards and cool-down backwards of the
  pipeline (at least the first and the last micro-batch of a step) run alone, exposed.
- ``dualpipe``: DeepSeek's DualPipe (DeepSeek-V3 report, arXiv 2412.19437, §3.2.1): a forward and
  a backward chunk of two micro-batches overlapped so that "both all-to-all and PP communication
  can be fully hidden".
Overlap is not free: communication kernels occupy SMs while they run. DeepSeek measured that 20 of
the H800's 132 SMs saturate NVLink and IB for its all-to-alls (§3.2.2), so compute overlapped by
communication runs on the remaining 112 (`overlapped`); the same share is assumed for the
all-to-all kernels Megatron overlaps (no measurement of NCCL's SM use in that overlap was found).
"""

from __future__ import annotations

EP_OVERLAPS = ("exposed", "microbatch", "dualpipe")
#: Share of the SMs DeepSeek's communication kernels occupy while they overlap compute: 20 of an
#: H800's 132 (DeepSeek-V3 report §3.2.2, "only 20 SMs are sufficient to fully utilize the
#: bandwidths of IB and NVLink"; DeepEP's default Buffer.num_sms = 20).
DUALPIPE_COMM_SM_SHARE = 20 / 132


def overlapped(compute: float, communication: float) -> float:
    """Time of `compute` with `communication` running beside it: the communication kernels keep
    `DUALPIPE_COMM_SM_SHARE` of the SMs while they run, so the compute they overlap runs on the
    rest; what communication exceeds the (slowed) compute by stays exposed."""
    if communication <= 0:
        return compute
    share = DUALPIPE_COMM_SM_SHARE
    slowed = compute + min(communication, compute) * share / (1.0 - share)
    return max(slowed, communication)


def paired_share(mode: str, micro_batches: int, warmup: float) -> float:
    """Share of a step's micro-batches whose all-to-alls overlap a partner micro-batch's compute
    under `microbatch` overlap: all but max(1, `warmup`) of them (the warm-up forwards and the
    matching cool-down backwards of the rank's pipeline schedule)."""
    if mode != "microbatch" or micro_batches <= 1:
        return 0.0
    alone = min(float(micro_batches), max(1.0, warmup))
    return (micro_batches - alone) / micro_batches


def overlap_micro(mode: str, compute: float, all_to_all: float, pipeline_p2p: float,
                  paired: float = 0.0) -> tuple[float, float]:
    """(exposed all-to-all, exposed pipeline sends) of one micro-batch on one rank, seconds.

    `compute`: the micro-batch's compute on the rank (forward, backward and recompute);
    `all_to_all`: its EP dispatch and combine time, forward and backward; `pipeline_p2p`: its
    pipeline sends; `paired`: `paired_share` (microbatch mode). Under ``dualpipe`` the exposed
    all-to-all also carries the compute slowdown of sharing the SMs with communication.
    """
    if mode == "exposed" or all_to_all <= 0 and mode != "dualpipe":
        return all_to_all, pipeline_p2p
    if mode == "microbatch":
        paired_time = overlapped(compute, all_to_all)
        return (1.0 - paired) * all_to_all + paired * (paired_time - compute), pipeline_p2p
    if mode == "dualpipe":
        return overlapped(compute, all_to_all + pipeline_p2p) - compute, 0.0
    raise ValueError(f"unknown ep_overlap {mode!r}; known: {', '.join(EP_OVERLAPS)}")
