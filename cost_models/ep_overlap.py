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
  can be fully hidden"; the communication kernels keep 20 of the H800's 132 SMs (§3.2.2), so the
  overlapped compute runs on the rest. A pair takes max(compute / (1 - 20/132), all-to-all +
  pipeline sends).
"""

from __future__ import annotations

EP_OVERLAPS = ("exposed", "microbatch", "dualpipe")
#: Share of the SMs DeepSeek's communication kernels occupy while they overlap compute: 20 of an
#: H800's 132 (DeepSeek-V3 report §3.2.2, "only 20 SMs are sufficient to fully utilize the
#: bandwidths of IB and NVLink"; DeepEP's default Buffer.num_sms = 20).
DUALPIPE_COMM_SM_SHARE = 20 / 132


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
        hidden_under = max(0.0, all_to_all - compute)
        return (1.0 - paired) * all_to_all + paired * hidden_under, pipeline_p2p
    if mode == "dualpipe":
        slowdown = 1.0 / (1.0 - DUALPIPE_COMM_SM_SHARE) if all_to_all > 0 else 1.0
        pair = max(compute * slowdown, all_to_all + pipeline_p2p)
        return pair - compute, 0.0
    raise ValueError(f"unknown ep_overlap {mode!r}; known: {', '.join(EP_OVERLAPS)}")
