"""Local image + text samples for vision-language models (plan `training.data.kind: image_jsonl`).

A UTF-8 JSON-lines file, one sample per line:

    {"images": ["img/cat.npy", "img/dog.npy"], "input_ids": [17, 5, 42, 9]}
    {"image": "img/boat.pt", "input_ids": [8, 8, 30]}

- ``images`` (a list of paths) or ``image`` (one path): relative paths are read from the folder of
  the JSON-lines file. A sample that carries images holds exactly ``training.image_tokens /
  tokens_per_image`` of them (the plan fixes the image tokens per image sample, which the planner
  prices). With ``training.image_fraction`` < 1 a sample may also carry none (no ``images`` /
  ``image`` key, or an empty list): a text-only sample, whose text starts at position 0. With
  ``image_fraction`` 1 every sample must carry images. The planner prices the vision tower's
  compute at the plan's ``image_fraction`` (its memory at a micro-batch of image samples); the run
  logs the file's own share of image samples and warns when it differs from the plan's by more
  than 0.05.
- ``input_ids`` (or ``tokens`` / ``ids``): the sample's text as token ids in ``[0, vocab_size)``,
  without image placeholders (the runtime inserts them).

Image files are ``.npy`` (numpy) or ``.pt`` (one tensor, `torch.load(weights_only=True)`) arrays:

- ``uint8`` ``H x W x C``: raw RGB pixels. Scaled to [0, 1], resized to the vision tower's
  ``image_size`` (bicubic, antialiased, clamped to [0, 1]) and normalised with the ImageNet mean and
  std, as InternVL preprocesses images (its processors' ``image_mean`` / ``image_std``).
- floating ``C x H x W``: pixel values already normalised for the model; only resized (bicubic)
  when ``H x W`` differs from ``image_size``.

``C`` must be the tower's ``num_channels``. Sample ``i`` of the global sample order is line
``perm_e[i mod N]`` of epoch ``e = i // N`` (``N`` samples, ``perm_e`` a permutation seeded by
``data.seed`` and ``e``), so data is a pure function of (step, sample index): the world size never
changes a step's global batch and resuming needs only the step.

Each sequence of ``seq_len + 1`` tokens is ``image_tokens`` image placeholders, then the text
(truncated when longer than the room left), then padding; a text-only sample's is its text
(truncated to ``seq_len + 1`` tokens, at least 2), then padding. Labels of the placeholders (but the
last, which predicts the first text token) and of the padding are ignored (a text-only sample's
first token is predicted by nothing); a step's loss is the mean over the labelled tokens of its
global batch.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from xplan.errors import InputError

from .data import Batch, DataSource

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # InternVL's image_mean (OpenGVLab preprocessing, ImageNet statistics)
IMAGENET_STD = (0.229, 0.224, 0.225)  # InternVL's image_std
IMAGE_SUFFIXES = (".npy", ".pt")
TEXT_KEYS = ("input_ids", "tokens", "ids")


@dataclass(frozen=True)
class ImageSample:
    images: tuple[Path, ...]
    text: tuple[int, ...]


def _raw_array(path: Path):
    """The image file's array, memory-mapped (numpy's map for .npy, `torch.load(mmap=True)` for a
    .pt in torch's zip format): the pre-spawn check of every image reads headers, not pixels."""
    if not path.is_file():
        raise FileNotFoundError
    if path.suffix == ".npy":
        import numpy as np

        return np.load(path, mmap_mode="r", allow_pickle=False)
    try:
        value = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # a legacy (pre-zip) torch file cannot be mapped: read it whole
        value = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"holds a {type(value).__name__}, not one tensor")
    return value


def _layout(array, path: Path, channels: int) -> str:
    """'hwc' (raw uint8 pixels) or 'chw' (normalised floats); InputError otherwise."""
    shape, dtype = tuple(array.shape), str(array.dtype).replace("torch.", "")
    if dtype == "uint8" and len(shape) == 3 and shape[2] == channels and min(shape) > 0:
        if channels != len(IMAGENET_MEAN):
            raise InputError(f"image {path} holds raw uint8 pixels, which are normalised with the ImageNet mean/std "
                             f"of 3 channels; the vision tower takes {channels}. Give normalised float "
                             f"{channels}xHxW arrays.")
        return "hwc"
    if dtype.startswith(("float", "bfloat")) and len(shape) == 3 and shape[0] == channels and min(shape) > 0:
        return "chw"
    raise InputError(f"image {path} has shape {shape} and dtype {dtype}; an image must be uint8 HxWx{channels} "
                     f"(raw pixels) or float {channels}xHxW (normalised pixel values).")


def check_image(path: Path, channels: int) -> None:
    try:
        array = _raw_array(path)
    except FileNotFoundError:
        raise InputError(f"image {path} does not exist.") from None
    except Exception as exc:  # noqa: BLE001 - numpy and torch raise several kinds on a bad file
        text = str(exc).strip()
        reason = text.splitlines()[0] if text else type(exc).__name__
        if "Weights only load failed" in reason:  # torch's advice (weights_only=False) would run the file's code
            reason = ("not a tensor file written by torch.save (torch.load(weights_only=True) refuses it; image "
                      "files are data, never code)")
        raise InputError(f"cannot read image {path}: {reason}") from None
    _layout(array, path, channels)


def load_image(path: Path, spec) -> torch.Tensor:
    """The image as the model's pixel values: float32 [C, *spec.image_size]."""
    array = _raw_array(path)
    layout = _layout(array, path, spec.num_channels)
    x = array if isinstance(array, torch.Tensor) else torch.from_numpy(array.copy())
    size = tuple(spec.image_size)
    if layout == "hwc":
        x = x.permute(2, 0, 1).float() / 255.0
        if tuple(x.shape[1:]) != size:
            x = F.interpolate(x[None], size=size, mode="bicubic", align_corners=False, antialias=True)[0]
            x = x.clamp(0.0, 1.0)
        mean = torch.tensor(IMAGENET_MEAN).view(-1, 1, 1)
        std = torch.tensor(IMAGENET_STD).view(-1, 1, 1)
        return (x - mean) / std
    x = x.float()
    if tuple(x.shape[1:]) != size:
        x = F.interpolate(x[None], size=size, mode="bicubic", align_corners=False, antialias=True)[0]
    return x.contiguous()


def _paths(doc: dict, where: str, folder: Path, text_only: bool) -> tuple[Path, ...]:
    """The sample's image paths; () for a text-only sample (no `images` / `image`, or an empty
    list) when `text_only` samples are allowed (training.image_fraction < 1)."""
    if "images" in doc and "image" in doc:
        raise InputError(f"{where} has both `images` and `image`; give one.")
    value = doc["images"] if "images" in doc else [doc["image"]] if "image" in doc else None
    if text_only and (value is None or value == []):
        return ()
    if not isinstance(value, list) or not value or not all(isinstance(v, str) and v for v in value):
        hint = "" if text_only else (" Every sample carries images with training.image_fraction 1; set it below 1 "
                                     "(the share of samples with images) to allow text-only samples.")
        raise InputError(f"{where} must name its images: `images` (a list of file paths) or `image` (one path).{hint}")
    out = []
    for name in value:
        path = Path(name).expanduser()
        path = path if path.is_absolute() else folder / path
        if path.suffix not in IMAGE_SUFFIXES:
            raise InputError(f"{where}: image {name!r} must be a .npy or .pt array (PNG/JPEG are not read: decode "
                             "them to uint8 HxWxC .npy arrays first).")
        out.append(path)
    return tuple(out)


def read_samples(path: Path, spec, image_tokens: int, vocab_size: int,
                 image_fraction: float = 1.0) -> list[ImageSample]:
    """Every sample of the file, checked (line format, image count, token ids, image files); text-only
    samples are allowed with `image_fraction` < 1."""
    per_sample = image_tokens // spec.tokens_per_image
    text_only = image_fraction < 1
    samples: list[ImageSample] = []
    checked: set[Path] = set()
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            line = line.strip()
            if not line:
                continue
            where = f"{path}:{number}"
            try:
                doc = json.loads(line)
            except json.JSONDecodeError as exc:
                raise InputError(f"{where} is not valid JSON ({exc.msg}); each line must be an object with "
                                 "`images` (or `image`) and `input_ids`.") from None
            if not isinstance(doc, dict):
                raise InputError(f"{where} must be a JSON object with `images` (or `image`) and `input_ids`.")
            images = _paths(doc, where, path.parent, text_only)
            if len(images) not in ((0, per_sample) if text_only else (per_sample,)):
                allowed = " (or none: a text-only sample)" if text_only else ""
                raise InputError(f"{where} has {len(images)} image(s), but training.image_tokens {image_tokens} is "
                                 f"{per_sample} image(s) of {spec.tokens_per_image} tokens per sample; give every "
                                 f"sample that many images{allowed} or change training.image_tokens.")
            text = next((doc[k] for k in TEXT_KEYS if k in doc), None)
            if not isinstance(text, list) or not text or \
                    not all(isinstance(t, int) and not isinstance(t, bool) for t in text):
                raise InputError(f"{where} must hold its text as a non-empty list of integer token ids under "
                                 "`input_ids`.")
            bad = [t for t in text if t < 0 or t >= vocab_size]
            if bad:
                raise InputError(f"{where} holds token id {bad[0]}, outside the model's vocabulary [0, {vocab_size}).")
            if not images and len(text) < 2:
                raise InputError(f"{where} is a text-only sample of {len(text)} token; it needs at least 2 (its "
                                 "first token is predicted by nothing).")
            if spec.image_token_id in text:
                raise InputError(f"{where} holds the image token id {spec.image_token_id} in its text; leave the "
                                 "image placeholders out (the runtime puts them before the text).")
            for image in images:
                if image not in checked:
                    check_image(image, spec.num_channels)
                    checked.add(image)
            samples.append(ImageSample(images, tuple(text)))
    if not samples:
        raise InputError(f"{path} holds no samples.")
    return samples


class ImageJsonl(DataSource):
    """Image + text samples addressed by global sample index (see the module docstring)."""

    def __init__(self, samples: list[ImageSample], seq_len: int, image_tokens: int, spec, seed: int, source: str,
                 image_fraction: float = 1.0):
        self.samples, self.seq_len, self.image_tokens = samples, seq_len, image_tokens
        self.image_fraction = image_fraction  # the plan's share of image samples (what was priced)
        self.spec, self.seed, self.source = spec, seed, source
        self.pad_id = 1 if spec.image_token_id == 0 else 0  # never a label, never attended by real tokens
        self._perms: dict[int, torch.Tensor] = {}

    def _sample(self, index: int) -> ImageSample:
        epoch, k = divmod(index, len(self.samples))
        if epoch not in self._perms:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perms = {epoch: torch.randperm(len(self.samples), generator=gen)}
        return self.samples[int(self._perms[epoch][k])]

    def _start(self, sample: ImageSample) -> int:
        """Where the sample's text starts: after its image placeholders, at 0 when text only."""
        return self.image_tokens if sample.images else 0

    def _text(self, sample: ImageSample) -> tuple[int, ...]:
        return sample.text[: self.seq_len + 1 - self._start(sample)]

    def _labelled(self, sample: ImageSample) -> int:
        """Text tokens that are labels: all of an image sample's, all but the first of a text-only one's."""
        return len(self._text(sample)) - (0 if sample.images else 1)

    def windows(self, samples: range) -> torch.Tensor:
        rows = torch.full((len(samples), self.seq_len + 1), self.pad_id, dtype=torch.int64)
        for row, index in enumerate(samples):
            sample = self._sample(index)
            start, text = self._start(sample), self._text(sample)
            rows[row, :start] = self.spec.image_token_id
            rows[row, start: start + len(text)] = torch.tensor(text, dtype=torch.int64)
        return rows

    def label_tokens(self, samples: range) -> int:
        """Labelled tokens of these samples: their text tokens (each predicted once)."""
        return sum(self._labelled(self._sample(i)) for i in samples)

    def image_samples(self, samples: range) -> int:
        return sum(bool(self._sample(i).images) for i in samples)

    def image_share(self) -> float:
        """The share of the file's samples that carry images."""
        return sum(bool(s.images) for s in self.samples) / len(self.samples)

    def step_label_tokens(self, step: int, global_batch: int) -> int:
        return self.label_tokens(range(step * global_batch, (step + 1) * global_batch))

    def pixels(self, samples: range, share: slice = slice(None)) -> torch.Tensor:
        """The samples' images in order (only those of `share`: a Ulysses rank's, `data.image_share`)."""
        paths = [p for i in samples for p in self._sample(i).images][share]
        images = [load_image(p, self.spec) for p in paths]
        return torch.stack(images) if images else torch.empty(0, self.spec.num_channels, *self.spec.image_size)

    def rank_micro_batches(self, step: int, global_batch: int, micro_batch: int, dp_rank: int,
                           dp_size: int, sp_rank: int = 0, sp_size: int = 1) -> list[Batch]:
        """Data-parallel rank `dp_rank`'s micro-batches of step `step`; with sp > 1 Ulysses rank
        `sp_rank`'s chunk of each sequence and share of the micro-batch's images."""
        from .data import image_share
        from .loss import IGNORE_INDEX

        per_rank = global_batch // dp_size
        first = step * global_batch + dp_rank * per_rank
        chunk = self.seq_len // sp_size
        lo, hi = sp_rank * chunk, (sp_rank + 1) * chunk
        positions = torch.arange(lo, hi, dtype=torch.int64).unsqueeze(0)
        out = []
        for start in range(first, first + per_rank, micro_batch):
            samples = range(start, min(start + micro_batch, first + per_rank))
            rows = self.windows(samples)
            labels = rows[:, 1:].clone()
            images = 0
            for row, index in enumerate(samples):
                sample = self._sample(index)
                images += len(sample.images)
                first_label = max(self._start(sample) - 1, 0)
                labels[row, :first_label] = IGNORE_INDEX  # placeholders predicting placeholders
                labels[row, first_label + self._labelled(sample):] = IGNORE_INDEX  # padding predicts nothing
            share = image_share(images, sp_rank, sp_size)
            out.append(Batch(rows[:, lo:hi].contiguous(), labels[:, lo:hi].contiguous(), positions,
                             self.pixels(samples, share)))
        return out

    def describe(self) -> str:
        cut = sum(len(s.text) > len(self._text(s)) for s in self.samples)
        images = sum(len(s.images) for s in self.samples)
        text_only = sum(not s.images for s in self.samples)
        return (f"{self.source} ({len(self.samples)} samples, {images} images"
                + (f", {text_only} text-only samples: {self.image_share():.2f} carry images, the plan's "
                   f"image_fraction {self.image_fraction:g}" if text_only or self.image_fraction < 1 else "")
                + (f", {cut} texts truncated" if cut else "") + ")")


def build_image_data(path: Path, seq_len: int, image_tokens: int, spec, vocab_size: int, seed: int,
                     image_fraction: float = 1.0) -> ImageJsonl:
    return ImageJsonl(read_samples(path, spec, image_tokens, vocab_size, image_fraction), seq_len, image_tokens,
                      spec, seed, str(path), image_fraction)
