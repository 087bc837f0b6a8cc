"""Command-line options shared by estimate, search and whatif (names from DESIGN.md)."""

from __future__ import annotations

import typer

DEVICES = typer.Option(..., "--devices", "-n", help="Total number of devices.")
SEQ_LEN = typer.Option(4096, "--seq-len", help="Tokens per sequence.")
GLOBAL_BATCH = typer.Option(None, "--global-batch",
                            help="Sequences per optimizer step (default: 4 per device).")
MICRO_BATCH = typer.Option(None, "--micro-batch", help="Sequences per micro-batch per data-parallel rank.")
FSDP = typer.Option(None, "--fsdp", help="FSDP shard-group size (devices; < world = HSDP; 1 = ZeRO-1).")
EP = typer.Option(None, "--ep", help="Expert-parallel size.")
SP = typer.Option(None, "--sp", help="Ulysses sequence-parallel degree.")
TP = typer.Option(None, "--tp", help="Tensor-parallel degree (priced for comparison).")
PP = typer.Option(None, "--pp", help="Pipeline-parallel stages (priced for comparison).")
VPP = typer.Option(None, "--vpp", help="Virtual pipeline stages per rank (interleaved 1F1B).")
RECOMPUTE = typer.Option(None, "--recompute", help="none | selective | full | fraction of layers (e.g. 0.5).")
OFFLOAD = typer.Option(None, "--offload", help="none | optimizer,params,activations (comma-separated).")
PRECISION = typer.Option(None, "--precision", help="fp32 | bf16 | fp8.")
LOSS = typer.Option(None, "--loss", help="Loss kernel: full | chunked.")
IMBALANCE = typer.Option(1.0, "--imbalance", help="Busiest expert-parallel rank's routed load over the mean.")
