"""Training data: a pure function of (step, sequence index), so a step's global batch never depends
on the world size and resuming needs only the step number.

Sources (plan `training.data.kind`):
- ``synthetic``: seeded token sequences with learnable structure (random "words" of a fixed
  seeded lexicon, concatenated in random order), so the loss of a fresh model goes down.
- ``jsonl``: one document per line, a JSON list of token ids or an object with ``input_ids`` /
  ``tokens`` / ``ids`` holding one.
- ``text``: a UTF-8 text file tokenised with a local tokenizer directory (transformers'
  ``AutoTokenizer``, ``local_files_only``); one document per non-empty line, EOS appended.
- ``image_jsonl``: image + text samples of a vision-language model (``image_data``).

With ``training.image_tokens`` (vision-language models) synthetic samples carry random images first,
or, with ``training.image_fraction`` < 1, only those that ``carries_images`` picks by global index
(the others are text only); see the image section at the end of this module.

Local documents are concatenated into one token stream and packed into windows of
``seq_len + 1`` tokens (stride ``seq_len``, so every token is a label once per epoch); inputs are
``window[:-1]`` and labels ``window[1:]``, i.e. labels are shifted on the full sequence before any
split across sequence-parallel ranks. Window order is reshuffled every epoch from ``data.seed``.

Sequence ``j`` of step ``t`` is global sample ``t * global_batch + j``. Data-parallel rank ``r``
of ``D`` takes sequences ``[r * G / D, (r + 1) * G / D)`` of each step and cuts them into
micro-batches of ``micro_batch`` sequences.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from xplan.errors import InputError

WORD_LEN = 8
NUM_WORDS = 64


@dataclass
class Batch:
    """One micro-batch on one rank: input ids, labels and global positions, all [b, s_local]."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    positions: torch.Tensor
    pixel_values: torch.Tensor | None = None  # [b * images per sample, C, H, W] (vision-language models)

    def to(self, device: torch.device | str) -> Batch:
        pixels = None if self.pixel_values is None else self.pixel_values.to(device, non_blocking=True)
        return Batch(self.input_ids.to(device, non_blocking=True), self.labels.to(device, non_blocking=True),
                     self.positions.to(device, non_blocking=True), pixels)


class DataSource:
    """Windows of seq_len + 1 token ids, addressed by global sample index."""

    seq_len: int

    def windows(self, samples: range) -> torch.Tensor:  # [len(samples), seq_len + 1] int64
        raise NotImplementedError

    def global_batch(self, step: int, global_batch: int) -> torch.Tensor:
        return self.windows(range(step * global_batch, (step + 1) * global_batch))

    def image_samples(self, samples: range) -> int:
        """How many of `samples` carry images (vision-language data; text-only sources: none)."""
        return 0

    def describe(self) -> str:
        raise NotImplementedError


class SyntheticData(DataSource):
    """Each sample is seeded by (seed, sample index): random words of a fixed seeded lexicon. With
    `image_tokens` (and the model's VisionSpec `vision`), the samples that `carries_images` picks at
    `image_fraction` hold random images first (`image_micro_batches`); the others are text only."""

    def __init__(self, vocab_size: int, seq_len: int, seed: int = 0, image_tokens: int = 0, vision=None,
                 image_fraction: float = 1.0):
        self.vocab_size, self.seq_len, self.seed = vocab_size, seq_len, seed
        self.image_tokens, self.vision, self.image_fraction = image_tokens, vision, image_fraction
        gen = torch.Generator().manual_seed(seed)
        self.lexicon = torch.randint(0, vocab_size, (NUM_WORDS, WORD_LEN), generator=gen)

    def windows(self, samples: range) -> torch.Tensor:
        n_words = (self.seq_len + 1) // WORD_LEN + 2
        rows = []
        for index in samples:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + index * 7919 + 12345)
            words = torch.randint(0, NUM_WORDS, (n_words,), generator=gen)
            offset = int(torch.randint(0, WORD_LEN, (1,), generator=gen))
            rows.append(self.lexicon[words].reshape(-1)[offset: offset + self.seq_len + 1])
        if not rows:
            return torch.empty(0, self.seq_len + 1, dtype=torch.int64)
        return torch.stack(rows)

    def image_samples(self, samples: range) -> int:
        if not self.image_tokens:
            return 0
        return image_sample_count(samples.start, samples.stop, self.image_fraction)

    def describe(self) -> str:
        if self.image_tokens and self.image_fraction < 1:
            return f"synthetic (seed {self.seed}, images on {self.image_fraction:g} of the samples)"
        return f"synthetic (seed {self.seed})"


class PackedTokens(DataSource):
    """A token stream packed into windows, reshuffled each epoch."""

    def __init__(self, tokens: torch.Tensor, seq_len: int, seed: int, source: str):
        self.tokens, self.seq_len, self.seed, self.source = tokens, seq_len, seed, source
        self.num_windows = (len(tokens) - 1) // seq_len
        if self.num_windows < 1:
            raise InputError(f"{source} holds {len(tokens)} tokens, fewer than one training sequence of "
                             f"seq_len + 1 = {seq_len + 1}; use more data or a shorter --seq-len.")
        self._perms: dict[int, torch.Tensor] = {}

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perms = {epoch: torch.randperm(self.num_windows, generator=gen)}
        return self._perms[epoch]

    def windows(self, samples: range) -> torch.Tensor:
        rows = []
        for index in samples:
            epoch, k = divmod(index, self.num_windows)
            start = int(self._perm(epoch)[k]) * self.seq_len
            rows.append(self.tokens[start: start + self.seq_len + 1])
        if not rows:
            return torch.empty(0, self.seq_len + 1, dtype=torch.int64)
        return torch.stack(rows)

    def describe(self) -> str:
        return f"{self.source} ({len(self.tokens)} tokens, {self.num_windows} sequences per epoch)"


def _jsonl_tokens(path: Path) -> list[int]:
    out: list[int] = []
    with path.open() as handle:
        for number, line in enumerate(handle, 1):
            line = line.strip()
            if not line:
                continue
            try:
                doc = json.loads(line)
            except json.JSONDecodeError as exc:
                raise InputError(f"{path}:{number} is not valid JSON ({exc.msg}); each line must be a list "
                                 "of token ids or an object with `input_ids`.") from None
            if isinstance(doc, dict):
                doc = next((doc[k] for k in ("input_ids", "tokens", "ids") if k in doc), None)
            if not isinstance(doc, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in doc):
                raise InputError(f"{path}:{number} must be a JSON list of integer token ids (or an object "
                                 "with `input_ids` holding one).")
            out.extend(doc)
    return out


def _text_tokens(path: Path, tokenizer_dir: str | None) -> list[int]:
    if not tokenizer_dir:
        raise InputError("training.data.kind is 'text' but training.data.tokenizer is not set; give a local "
                         "tokenizer directory (one holding tokenizer.json / tokenizer_config.json).")
    tok_path = Path(tokenizer_dir)
    if not tok_path.is_dir():
        raise InputError(f"tokenizer directory {tok_path} does not exist; training.data.tokenizer must be a "
                         "local directory (there is no hub access at run time).")
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(tok_path), local_files_only=True)
    except Exception as exc:  # noqa: BLE001 - transformers raises several kinds here
        raise InputError(f"cannot load a tokenizer from {tok_path}: {exc}") from None
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    out: list[int] = []
    eos = tokenizer.eos_token_id
    for start in range(0, len(lines), 1024):
        for ids in tokenizer(lines[start: start + 1024], add_special_tokens=False)["input_ids"]:
            out.extend(ids)
            if eos is not None:
                out.append(eos)
    return out


def check_data_settings(data, base_dir: Path | None = None) -> None:
    """Fail fast (before any process starts) on a missing data file or tokenizer."""
    if data.kind == "synthetic":
        return
    if not data.path:
        raise InputError(f"training.data.kind is {data.kind!r} but training.data.path is not set.")
    path = resolve_path(data.path, base_dir)
    if not path.is_file():
        raise InputError(f"data file {path} does not exist (training.data.path); fix the path in the plan or "
                         "use `data: {kind: synthetic}`.")
    if data.kind == "text" and data.tokenizer and not resolve_path(data.tokenizer, base_dir).is_dir():
        raise InputError(f"tokenizer directory {resolve_path(data.tokenizer, base_dir)} does not exist "
                         "(training.data.tokenizer).")


def resolve_path(value: str, base_dir: Path | None) -> Path:
    path = Path(value).expanduser()
    if not path.is_absolute() and base_dir is not None and not path.exists() and (base_dir / path).exists():
        return base_dir / path
    return path


def build_data(data, vocab_size: int, seq_len: int, base_dir: Path | None = None, image_tokens: int = 0,
               vision=None, image_fraction: float = 1.0) -> DataSource:
    """The plan's data source (`data` is the plan's DataSettings; `image_tokens` per image sample,
    the model's VisionSpec `vision` and the share of image samples `image_fraction` for synthetic
    image + text data and `image_jsonl`)."""
    check_data_settings(data, base_dir)
    if data.kind == "synthetic":
        if image_tokens and vision is not None:
            return SyntheticData(vocab_size, seq_len, data.seed, image_tokens, vision, image_fraction)
        return SyntheticData(vocab_size, seq_len, data.seed)
    path = resolve_path(data.path, base_dir)
    if data.kind == "image_jsonl":
        from .image_data import build_image_data

        if not image_tokens or vision is None:
            raise InputError("training.data.kind 'image_jsonl' needs a vision-language model and "
                             "training.image_tokens > 0.")
        return build_image_data(path, seq_len, image_tokens, vision, vocab_size, data.seed, image_fraction)
    if data.kind == "jsonl":
        tokens = _jsonl_tokens(path)
    else:
        tok_dir = str(resolve_path(data.tokenizer, base_dir)) if data.tokenizer else None
        tokens = _text_tokens(path, tok_dir)
    tensor = torch.tensor(tokens, dtype=torch.int64)
    if len(tensor) and (int(tensor.min()) < 0 or int(tensor.max()) >= vocab_size):
        raise InputError(f"{path} holds token ids outside the model's vocabulary [0, {vocab_size}) "
                         f"(min {int(tensor.min())}, max {int(tensor.max())}); the data was tokenised for "
                         "another model.")
    return PackedTokens(tensor, seq_len, data.seed, str(path))


def rank_windows(source: DataSource, step: int, global_batch: int, dp_rank: int, dp_size: int) -> torch.Tensor:
    """The windows of step `step` that data-parallel rank `dp_rank` of `dp_size` trains on."""
    per_rank = global_batch // dp_size
    first = step * global_batch + dp_rank * per_rank
    return source.windows(range(first, first + per_rank))


def split_micro_batches(windows: torch.Tensor, micro_batch: int, sp_rank: int = 0, sp_size: int = 1) -> list[Batch]:
    """Cut this rank's windows [n, seq_len + 1] into micro-batches.

    Labels are shifted on the full sequence, then the sequence is split over sp ranks
    (contiguous shards; positions are global)."""
    seq_len = windows.shape[1] - 1
    shard = seq_len // sp_size
    lo, hi = sp_rank * shard, (sp_rank + 1) * shard
    positions = torch.arange(lo, hi, dtype=torch.int64).unsqueeze(0)
    out = []
    for start in range(0, windows.shape[0], micro_batch):
        chunk = windows[start: start + micro_batch]
        out.append(Batch(chunk[:, lo:hi].contiguous(), chunk[:, lo + 1: hi + 1].contiguous(), positions))
    return out


# ---------------------------------------------------------------------------------------------
# Image + text samples (vision-language models): a sample carries images or is text only; one
# that carries images holds a fixed number of image tokens, the images first (their placeholder
# tokens at positions [0, image_tokens)), then text. A text-only sample is text from position 0.


def carries_images(index: int, fraction: float) -> bool:
    """Whether global sample `index` carries images when a share `fraction` (training.image_fraction,
    in (0, 1]) of the samples does (synthetic data): floor((i + 1) f) > floor(i f). Image samples are
    spread evenly (every sample at f = 1, every other one at f = 0.5) and depend on the index only,
    so the world size never changes a step's batch and resuming needs only the step."""
    return fraction >= 1 or math.floor((index + 1) * fraction) > math.floor(index * fraction)


def image_sample_count(start: int, stop: int, fraction: float) -> int:
    """How many of global samples [start, stop) `carries_images` picks: floor(stop f) - floor(start f)
    (the rule's steps telescope)."""
    if fraction >= 1:
        return stop - start
    return math.floor(stop * fraction) - math.floor(start * fraction)


def images_per_sample(spec, image_tokens: int) -> int:
    return image_tokens // spec.tokens_per_image


def image_batch(ids: torch.Tensor, spec, image_tokens: int,
                pixels: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`ids` [b, s] with each sample's first `image_tokens` positions set to the image token, and
    the images ([b * images, C, H, W]; zeros unless given) whose features replace them: every
    sample carries images (the dry run's and the tracer's micro-batch, the heaviest one)."""
    ids = ids.clone()
    ids[:, :image_tokens] = spec.image_token_id
    if pixels is None:
        n = ids.shape[0] * images_per_sample(spec, image_tokens)
        pixels = torch.zeros(n, spec.num_channels, *spec.image_size)
    return ids, pixels


def sample_pixels(spec, image_tokens: int, samples: Iterable[int], seed: int) -> torch.Tensor:
    """Random images of global samples `samples` (the same on every rank and world size)."""
    n = images_per_sample(spec, image_tokens)
    out = [torch.randn(n, spec.num_channels, *spec.image_size,
                       generator=torch.Generator().manual_seed(seed * 1_000_003 + 7919 * sample + 1))
           for sample in samples]
    return torch.cat(out) if out else torch.empty(0, spec.num_channels, *spec.image_size)


def image_share(images: int, sp_rank: int = 0, sp_size: int = 1) -> slice:
    """Which of a micro-batch's `images` Ulysses rank `sp_rank` of `sp_size` runs through the vision
    tower: a contiguous 1/sp of them, in order (`distributed.ulysses.apply_ulysses_images`)."""
    if images % sp_size:
        raise ValueError(f"{images} images of a micro-batch do not split over sp {sp_size} ranks")
    share = images // sp_size
    return slice(sp_rank * share, (sp_rank + 1) * share)


def label_tokens(seq_len: int, image_tokens: int) -> int:
    """Labelled tokens per sample: the image placeholders are never predicted (their labels,
    except the last one's, which is the first text token, are ignored). A text-only sample: 0."""
    return seq_len - max(image_tokens - 1, 0)


def step_tokens(source: DataSource, step: int, global_batch: int, seq_len: int, image_tokens: int) -> int:
    """The tokens step `step` trains on: `label_tokens` of each of its samples, those that carry
    images (`DataSource.image_samples`) with their placeholders, the others text only."""
    samples = range(step * global_batch, (step + 1) * global_batch)
    images = source.image_samples(samples) if image_tokens else 0
    return images * label_tokens(seq_len, image_tokens) + (global_batch - images) * seq_len


def image_micro_batches(windows: torch.Tensor, first_sample: int, micro_batch: int, spec, image_tokens: int,
                        seed: int, sp_rank: int = 0, sp_size: int = 1, fraction: float = 1.0) -> list[Batch]:
    """`split_micro_batches` for image + text samples (sample `first_sample + k` is row k; those that
    `carries_images` at `fraction` hold images, the others are text only): with sp > 1 each rank
    holds its chunk of every sequence and its share of each micro-batch's images (`image_share`).
    A micro-batch without image samples has an empty [0, C, H, W] `pixel_values` (never None: the
    vision tower runs on every rank, `models.vision.zero_rows`)."""
    from .loss import IGNORE_INDEX

    samples = range(first_sample, first_sample + windows.shape[0])
    carries = torch.tensor([carries_images(i, fraction) for i in samples], dtype=torch.bool)
    ids = windows.clone()
    ids[ids == spec.image_token_id] = spec.image_token_id + (1 if spec.image_token_id == 0 else -1)  # text only
    ids[carries[:, None] & (torch.arange(ids.shape[1]) < image_tokens)] = spec.image_token_id
    pixels = sample_pixels(spec, image_tokens, [i for i, c in zip(samples, carries.tolist(), strict=True) if c], seed)
    per = images_per_sample(spec, image_tokens)
    out, taken = [], 0
    for b in split_micro_batches(ids, micro_batch, sp_rank, sp_size):
        # a fresh tensor: labels may view the same storage as the input ids
        b.labels = torch.where(b.labels == spec.image_token_id, IGNORE_INDEX, b.labels)
        start = len(out) * micro_batch
        images = int(carries[start: start + b.input_ids.shape[0]].sum()) * per
        b.pixel_values = pixels[taken: taken + images]
        taken += images
        if sp_size > 1:
            b.pixel_values = b.pixel_values[image_share(b.pixel_values.shape[0], sp_rank, sp_size)]
        out.append(b)
    return out
