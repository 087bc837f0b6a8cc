"""Train-loop building blocks: data slicing and packing, chunked loss, LR schedule, checkpoint dirs."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch

from xplan.errors import InputError
from xplan.plan import DataSettings
from xplan.runtime.train.checkpoint import latest_checkpoint, require_checkpoint, step_dir
from xplan.runtime.train.data import (
    PackedTokens,
    SyntheticData,
    build_data,
    rank_windows,
    split_micro_batches,
)
from xplan.runtime.train.loss import chunked_linear_cross_entropy, full_cross_entropy, token_loss_sum
from xplan.runtime.train.manifest import file_digest, write_manifest
from xplan.runtime.train.optim import LRSchedule

pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------- data


@pytest.mark.parametrize("dp", [1, 2, 4])
@pytest.mark.parametrize("sp", [1, 2])
def test_rank_slices_tile_the_global_batch(dp, sp):
    source = SyntheticData(vocab_size=50, seq_len=16, seed=3)
    step, global_batch, micro = 5, 8, 2
    full = source.global_batch(step, global_batch)
    assert full.shape == (8, 17)
    rows = []
    for dp_rank in range(dp):
        windows = rank_windows(source, step, global_batch, dp_rank, dp)
        per_sp = [split_micro_batches(windows, micro, sp_rank, sp) for sp_rank in range(sp)]
        for m in range(len(per_sp[0])):
            inputs = torch.cat([per_sp[r][m].input_ids for r in range(sp)], dim=1)
            labels = torch.cat([per_sp[r][m].labels for r in range(sp)], dim=1)
            positions = torch.cat([per_sp[r][m].positions for r in range(sp)], dim=1)
            assert inputs.shape == (micro, 16)
            assert torch.equal(labels[:, :-1], inputs[:, 1:])  # shifted on the full sequence
            assert torch.equal(positions[0], torch.arange(16))
            rows.append(torch.cat([inputs, labels[:, -1:]], dim=1))
    assert torch.equal(torch.cat(rows), full)  # same global batch whatever the world size


def test_slices_match_the_distributed_local_batch():
    """Same rows and sequence chunk as `xplan.runtime.distributed.local_batch` (given full labels)."""
    from xplan.runtime.distributed import local_batch

    source = SyntheticData(vocab_size=50, seq_len=16, seed=0)
    full = source.global_batch(2, 4)
    for dp_rank, sp_rank in [(0, 0), (0, 1), (1, 0), (1, 1)]:
        meshes = SimpleNamespace(dp_rank=dp_rank, dp_size=2, sp_rank=sp_rank, sp_size=2)
        ref = local_batch(full[:, :-1], meshes, global_labels=full[:, 1:])
        ours = split_micro_batches(rank_windows(source, 2, 4, dp_rank, 2), 2, sp_rank, 2)[0]
        assert torch.equal(ours.input_ids, ref.input_ids) and torch.equal(ours.labels, ref.labels)
        assert torch.equal(ours.positions.expand_as(ref.positions), ref.positions)
        assert ref.global_tokens == 4 * 16


def test_synthetic_is_seeded_and_learnable():
    a, b = SyntheticData(100, 32, seed=1), SyntheticData(100, 32, seed=1)
    assert torch.equal(a.global_batch(3, 4), b.global_batch(3, 4))
    assert not torch.equal(a.global_batch(3, 4), a.global_batch(4, 4))
    assert not torch.equal(a.global_batch(3, 4), SyntheticData(100, 32, seed=2).global_batch(3, 4))
    batch = a.global_batch(0, 64)
    assert int(batch.max()) < 100 and int(batch.min()) >= 0
    # Structure: the next token is mostly determined by the current one (words of a fixed lexicon).
    pairs = {}
    for row in batch.tolist():
        for x, y in zip(row, row[1:], strict=False):
            pairs.setdefault(x, set()).add(y)
    assert sum(len(v) for v in pairs.values()) / len(pairs) < 10


def test_jsonl_is_packed_into_windows_and_reshuffled(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text("\n".join([json.dumps(list(range(0, 10))), json.dumps({"input_ids": list(range(10, 25))}), ""]))
    source = build_data(DataSettings(kind="jsonl", path=str(path), seed=0), vocab_size=32, seq_len=4)
    assert isinstance(source, PackedTokens) and source.num_windows == 6  # (25 - 1) // 4
    epoch0 = source.windows(range(0, 6))
    starts = sorted(int(w[0]) for w in epoch0)
    assert starts == [0, 4, 8, 12, 16, 20]  # every window once per epoch, 5 tokens each
    assert all(torch.equal(w, torch.arange(int(w[0]), int(w[0]) + 5)) for w in epoch0)
    assert torch.equal(source.windows(range(6, 12)).sort(0).values, epoch0.sort(0).values)


@pytest.mark.parametrize("content, message", [
    ("[1, 2, 99]\n", "outside the model's vocabulary"),
    ("[1, 2, \n", "is not valid JSON"),
    ('{"text": "hi"}\n', "list of integer token ids"),
    ("[1, 2]\n", "fewer than one training sequence"),
])
def test_bad_jsonl_is_input_error(tmp_path, content, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(InputError, match=message):
        build_data(DataSettings(kind="jsonl", path=str(path)), vocab_size=32, seq_len=4)


def test_missing_data_file_is_input_error(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        build_data(DataSettings(kind="jsonl", path=str(tmp_path / "nope.jsonl")), 32, 4)
    with pytest.raises(InputError, match="tokenizer"):
        build_data(DataSettings(kind="text", path=__file__), 32, 4)


def make_tokenizer(directory):
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[UNK]": 0, "<eos>": 1}
    for word in "the cat sat on a mat dog ran far".split():
        vocab[word] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", unk_token="[UNK]") \
        .save_pretrained(directory)


def test_text_with_local_tokenizer(tmp_path):
    make_tokenizer(tmp_path / "tok")
    text = tmp_path / "corpus.txt"
    text.write_text("the cat sat on a mat\n\nthe dog ran far\n")
    source = build_data(DataSettings(kind="text", path=str(text), tokenizer=str(tmp_path / "tok")), 16, 4)
    assert torch.equal(source.tokens, torch.tensor([2, 3, 4, 5, 6, 7, 1, 2, 8, 9, 10, 1]))


# ---------------------------------------------------------------- loss


@pytest.mark.parametrize("chunk", [1, 7, 64, 1000])
def test_chunked_loss_equals_full_loss(chunk):
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(3, 21, 16, generator=gen, requires_grad=True)
    weight = torch.randn(40, 16, generator=gen, requires_grad=True)
    labels = torch.randint(0, 40, (3, 21), generator=gen)
    labels[1, 5:9] = -100
    full = full_cross_entropy(hidden @ weight.t(), labels)
    g_full = torch.autograd.grad(full / 50, (hidden, weight))
    chunked = chunked_linear_cross_entropy(hidden, weight, labels, chunk_tokens=chunk)
    g_chunked = torch.autograd.grad(chunked / 50, (hidden, weight))
    assert torch.allclose(chunked, full, rtol=1e-6)
    for a, b in zip(g_chunked, g_full, strict=True):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7)


def test_chunked_loss_in_float64_is_exact_to_rounding():
    gen = torch.Generator().manual_seed(1)
    hidden = torch.randn(50, 8, dtype=torch.float64, generator=gen)
    weight = torch.randn(30, 8, dtype=torch.float64, generator=gen)
    labels = torch.randint(0, 30, (50,), generator=gen)
    full = full_cross_entropy(hidden @ weight.t(), labels)
    assert abs(chunked_linear_cross_entropy(hidden, weight, labels, 8).item() - full.item()) < 1e-10


def test_model_loss_chunked_equals_full_and_restores_head():
    import xplan.runtime as xr
    from xplan.runtime.models import model_config_from_dict

    config = model_config_from_dict({
        "model_type": "qwen3_moe", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 48,
        "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 16,
        "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 16, "max_position_embeddings": 64})
    model = xr.build_model(config, seed=0)
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    labels = torch.roll(ids, -1, dims=1)
    results = {}
    for kind in ("full", "chunked"):
        model.zero_grad(set_to_none=True)
        loss = token_loss_sum(model, ids, labels, kind=kind, chunk_tokens=5)
        loss.backward()
        results[kind] = (loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()})
        assert "forward" not in model.lm_head.__dict__
    ref = torch.nn.functional.cross_entropy(model(ids).reshape(-1, 64), labels.reshape(-1), reduction="sum")
    assert torch.allclose(results["full"][0], ref.detach(), rtol=1e-6)
    assert torch.allclose(results["chunked"][0], results["full"][0], rtol=1e-6)
    for name, grad in results["full"][1].items():
        err = (results["chunked"][1][name] - grad).abs().max() / grad.abs().max()
        assert err < 1e-5, (name, float(err))


# ---------------------------------------------------------------- schedule, checkpoints


def test_lr_schedules():
    warm = LRSchedule("cosine", total_steps=10, warmup_steps=2, min_lr_ratio=0.1)
    assert [warm(0), warm(1)] == [0.5, 1.0]
    assert warm(2) == pytest.approx(1.0) and warm(10) == pytest.approx(0.1) and warm(50) == pytest.approx(0.1)
    assert warm(6) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    linear = LRSchedule("linear", total_steps=10, min_lr_ratio=0.0)
    assert [linear(0), linear(5), linear(10)] == [1.0, 0.5, 0.0]
    assert LRSchedule("constant", 10, warmup_steps=4)(1) == 0.5 and LRSchedule("constant", 10)(9) == 1.0


def test_incomplete_checkpoints_are_ignored(tmp_path):
    with pytest.raises(InputError, match="no complete checkpoint"):
        require_checkpoint(tmp_path)
    with pytest.raises(InputError, match="--checkpoint-dir"):
        require_checkpoint(None)
    (tmp_path / ".tmp-step_00000030").mkdir()  # a save that crashed before its rename
    step_dir(tmp_path, 20).mkdir()  # no manifest: the save did not finish
    done = step_dir(tmp_path, 10)
    done.mkdir()
    (done / "trainer.json").write_text("{}")
    write_manifest(done, 10, 1, "model", {}, {"trainer.json": file_digest(done / "trainer.json")})
    assert latest_checkpoint(tmp_path) == (10, done)
    step, path, _, notes = require_checkpoint(tmp_path)
    assert (step, path) == (10, done) and notes == ["skipped step_00000020: no manifest (the save did not finish)"]


def test_moe_block_accepts_zero_tokens():
    """A rank can receive no tokens (an empty micro-batch shard); the torch combine path must not fail."""
    from xplan.runtime.models.moe import MoE, SoftmaxTopKRouter, SwiGLUExperts

    torch.manual_seed(0)
    moe = MoE(SoftmaxTopKRouter(8, 4, 2, True), SwiGLUExperts(4, 8, 16), num_experts=4, top_k=2)
    out = moe(torch.randn(1, 0, 8, requires_grad=True))
    assert out.shape == (1, 0, 8)
    out.sum().backward()


def test_run_compares_allocated_memory_with_the_allocated_prediction():
    """`max_memory_allocated` excludes the allocator's reserve, so the prediction it is held
    against leaves the priced overhead out."""
    from xplan.runtime.train.metrics import predicted_values

    predictions = {"memory_gib": {"activations": 50.0, "overhead": 6.0, "total": 70.0}, "step_time_s": 2.5}
    assert predicted_values(predictions) == (64.0, 2.5)
    assert predicted_values({"memory_gib": 12.0}) == (12.0, None)
    assert predicted_values(None) == (None, None)
