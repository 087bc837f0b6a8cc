"""Pipeline parallelism: how layers split over the stages, how many micro-batches each stage holds
in flight under each schedule, and what the schedule leaves idle (the bubble).

Schedules (`schedule`):
- ``1f1b``: Megatron's non-interleaved one-forward-one-backward (vpp = 1). Stage r runs
  pp - r - 1 warm-up forwards before its first backward (Megatron-LM
  `forward_backward_pipelining_without_interleaving`: num_warmup_microbatches = pp - rank - 1),
  so it holds pp - r micro-batches' activations at its peak: pp on the first stage, 1 on the last.
- ``interleaved``: Megatron's interleaved 1F1B (vpp > 1 model chunks per rank). Rank r runs
  (pp - r - 1) x 2 + (vpp - 1) x pp warm-up chunks
  (`forward_backward_pipelining_with_interleaving`), each 1/vpp of its layers: the first rank holds
  pp + (pp - 1) / vpp micro-batches of its layers, the last ((vpp - 1) pp + 1) / vpp.
- ``dualpipe``: DeepSeek's DualPipe (DeepSeek-V3 technical report, arXiv 2412.19437, §3.2.1 and
  Table 2): micro-batches fed from both ends, each rank holding two stages' parameters (2x) and
  pp + 1 micro-batches of activations; bubble (pp/2 - 1)(F&B + B - 3W), where F&B is a forward
  and a backward chunk run as one overlapped pair and W the backward's weight-gradient part.
Every count is capped by the micro-batches of the step. Pipeline sends: `exposed_p2p`.
"""

from __future__ import annotations

from dataclasses import dataclass

SCHEDULES = ("1f1b", "interleaved", "dualpipe")
# Parts of the model outside the blocks: what every rank runs, what the first and last hold.
EVERY_RANK_PARTS = ("rotary", "model")
# vision, vision_embed: a vision-language model's encoder layers; its patch embedding and projector
FIRST_RANK_PARTS = ("embed", "vision", "vision_embed")
LAST_RANK_PARTS = ("norm", "head", "loss")


def schedule(layout) -> str:
    """The pipeline schedule a layout names: DualPipe when its EP overlap is `dualpipe`, else
    interleaved 1F1B with virtual stages, else 1F1B."""
    if getattr(layout, "ep_overlap", "exposed") == "dualpipe":
        return "dualpipe"
    return "interleaved" if layout.vpp > 1 else "1f1b"


def in_flight(kind: str, pp: int, vpp: int, stage: int, micro_batches: int) -> float:
    """Micro-batches whose activations pipeline stage `stage` (0 = first) holds at its peak, in
    units of one micro-batch through all of the stage's layers (see the module docstring)."""
    if pp <= 1:
        return 1.0
    if not 0 <= stage < pp:
        raise ValueError(f"stage {stage} outside 0..{pp - 1}")
    cap = float(max(1, micro_batches))
    if kind == "dualpipe":
        return min(pp + 1.0, cap)
    if kind == "interleaved" and vpp > 1:
        chunks = (pp - stage - 1) * 2 + (vpp - 1) * pp + 1
        return min(chunks / vpp, cap)
    return min(float(pp - stage), cap)


def exposed_p2p(kind: str, p2p: float, compute: float) -> float:
    """Seconds of one micro-batch's pipeline sends and receives (`p2p`) left on a rank's critical
    path beside `compute` seconds of its compute. Interleaved 1F1B: Megatron posts each chunk's
    sends and receives before the next chunk's compute and waits for them after it
    (`overlap_p2p_comm`, on by default: Megatron-LM megatron/training/arguments.py
    `--no-overlap-p2p-communication` turns it off, and it is forced off without virtual stages;
    megatron/core/pipeline_parallel/schedules.py), so only what the compute cannot cover stays
    exposed. 1F1B: exposed (blocking sends and receives). DualPipe: `ep_overlap.overlap_micro`."""
    if kind == "interleaved":
        return max(0.0, p2p - compute)
    return p2p


def parameter_copies(kind: str) -> int:
    """Model-state copies per rank: DualPipe keeps two stages' parameters on every rank."""
    return 2 if kind == "dualpipe" else 1


def bubble_slots(kind: str, pp: int, vpp: int) -> float:
    """Idle micro-batch slots of a step under 1F1B schedules: (pp - 1) / vpp (each slot one
    micro-batch's forward and backward on the mean rank). DualPipe's is `dualpipe_bubble`."""
    if pp <= 1:
        return 0.0
    if kind == "dualpipe":
        raise ValueError("DualPipe's bubble is not a whole number of slots: use dualpipe_bubble")
    return (pp - 1) / vpp


def dualpipe_bubble(pp: int, paired: float, backward: float, weight_grad: float) -> float:
    """DualPipe's bubble (DeepSeek-V3 report Table 2): (pp/2 - 1) x (F&B + B - 3W), with F&B the
    time of one overlapped forward-and-backward pair, B a backward chunk and W its weight-gradient
    part, all per micro-batch on one rank."""
    if pp <= 1:
        return 0.0
    return max(0.0, (pp / 2 - 1) * (paired + backward - 3 * weight_grad))


@dataclass(frozen=True)
class PipelineRank:
    """What one pipeline rank runs per micro-batch: `layers` transformer layers, plus the
    embedding on the first rank and the final norm, LM head and loss on the last."""

    layers: float
    first: bool
    last: bool

    def parts(self) -> tuple[str, ...]:
        return (EVERY_RANK_PARTS + (FIRST_RANK_PARTS if self.first else ())
                + (LAST_RANK_PARTS if self.last else ()))


def pipeline_ranks(num_layers: int, pp: int, vpp: int = 1) -> list[tuple[PipelineRank, int]]:
    """The distinct ranks of a pipeline and how many ranks are alike, split as Megatron splits.

    The layers divide evenly over the pp x vpp model chunks when they can, the embedding and
    the head riding on the first and last rank. Otherwise, when layers + 2 divide, the embedding
    and the loss take a layer's slot each (Megatron's account-for-embedding / loss split), so
    the first and last rank run one layer fewer. Any other count is spread evenly (fractional
    layers: Megatron would need explicit first / last stage sizes).
    """
    if pp == 1:
        return [(PipelineRank(float(num_layers), first=True, last=True), 1)]
    chunks = pp * vpp
    per_rank, edge = num_layers / pp, 0
    if num_layers % chunks and (num_layers + 2) % chunks == 0:
        per_rank, edge = (num_layers + 2) / pp, 1
    ranks = [(PipelineRank(per_rank - edge, first=True, last=False), 1)]
    if pp > 2:
        ranks.append((PipelineRank(per_rank, first=False, last=False), pp - 2))
    ranks.append((PipelineRank(per_rank - edge, first=False, last=True), 1))
    return ranks


def stage_layer_count(num_layers: int, pp: int, vpp: int, stage: str) -> int:
    """Whole layers the first or last rank holds (Megatron's split, rounded up)."""
    ranks = pipeline_ranks(num_layers, pp, vpp)
    rank = ranks[0][0] if stage == "first" else ranks[-1][0]
    return max(1, -(-int(round(rank.layers * 1000)) // 1000))
