"""In-memory image datasets and the batch loader used by the trainer.

Images are held as one tensor; an epoch is a permutation of indices, and a batch
is one ``index_select``. Every random draw (shuffle order, dynamic binarization)
is a pure function of ``(seed, epoch, batch, rank)``, which makes a resumed run
replay exactly the batches an uninterrupted run would have seen.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Literal

import torch

from vaekit.errors import InputError, check_choice

Binarize = Literal["none", "dynamic", "static"]
BINARIZE_MODES = ("none", "dynamic", "static")


@dataclass
class ImageSplit:
    """One split: ``images`` (N, C, H, W) uint8 in [0, 255] and ``labels`` (N,) int64."""

    images: torch.Tensor
    labels: torch.Tensor

    def __post_init__(self) -> None:
        if self.images.ndim != 4 or self.images.dtype != torch.uint8:
            shape = tuple(self.images.shape)
            raise InputError(f"images must be a uint8 tensor (N, C, H, W), got {self.images.dtype} {shape}")
        if self.labels.shape != (self.images.shape[0],):
            raise InputError(f"labels must have shape ({self.images.shape[0]},), got {tuple(self.labels.shape)}")

    def __len__(self) -> int:
        return self.images.shape[0]

    def subset(self, n: int | None) -> ImageSplit:
        """The first ``n`` examples (all when ``n`` is None)."""
        if n is None:
            return self
        if not isinstance(n, int) or n <= 0:
            raise InputError(f"subset size must be a positive integer, got {n!r}")
        return ImageSplit(self.images[:n], self.labels[:n])

    def split_off(self, n: int, seed: int = 0) -> tuple[ImageSplit, ImageSplit]:
        """(rest, held): ``n`` examples drawn uniformly at random (seeded), in the order drawn, so
        any prefix of ``held`` is a uniform sample too; ``rest`` keeps the original order. A uniform
        draw, not the last ``n``: MNIST's splits are ordered by writer group, so a tail is biased."""
        if not isinstance(n, int) or isinstance(n, bool) or not 0 < n < len(self):
            raise InputError(f"a held-out part must have 1 to {len(self) - 1} examples (the split has "
                             f"{len(self)}), got {n!r}")
        pick = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed))[:n]
        held = torch.zeros(len(self), dtype=torch.bool)
        held[pick] = True
        return (ImageSplit(self.images[~held], self.labels[~held]),
                ImageSplit(self.images[pick], self.labels[pick]))


@dataclass
class ImageDataset:
    """A dataset with train and test splits, class names and where its files came from."""

    name: str
    train: ImageSplit
    test: ImageSplit
    classes: tuple[str, ...]
    provenance: str = ""
    info: dict = field(default_factory=dict)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.train.images.shape[1:])  # type: ignore[return-value]


def mix_seed(*parts: int) -> int:
    """Combine integers into one 63-bit seed (deterministic, order-sensitive)."""
    h = 0x9E3779B97F4A7C15
    for p in parts:
        h = (h ^ (int(p) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 31
    return h & 0x7FFFFFFFFFFFFFFF


def to_unit_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 (N, C, H, W) in [0, 255] -> float32 in [0, 1]."""
    return images.to(torch.float32).div_(255.0)


def binarize_static(x: torch.Tensor, seed: int) -> torch.Tensor:
    """One Bernoulli draw per pixel with probability equal to its grey level, reproducible from ``seed``."""
    g = torch.Generator(device=x.device).manual_seed(seed)
    return torch.bernoulli(x, generator=g)


class BatchLoader:
    """Serves (x, y) batches from tensors held in memory.

    Args:
        split: the data.
        batch_size: examples per batch, summed over all ranks (the global batch).
        shuffle: draw a fresh permutation each epoch from ``(seed, epoch)``.
        binarize: ``none`` (grey levels in [0, 1]), ``dynamic`` (a fresh Bernoulli draw per
            served batch) or ``static`` (one draw, made here from ``seed``).
        seed: base seed for order and binarization.
        drop_last: drop a final batch smaller than ``batch_size``.
        rank, world_size: this process's shard under data parallelism; each rank gets a
            contiguous slice of every global batch.
        device: where batches are placed (the whole split is moved there once).
    """

    def __init__(
        self,
        split: ImageSplit,
        batch_size: int,
        *,
        shuffle: bool = True,
        binarize: Binarize = "none",
        seed: int = 0,
        drop_last: bool = False,
        rank: int = 0,
        world_size: int = 1,
        device: torch.device | str = "cpu",
    ):
        check_choice("binarize", binarize, BINARIZE_MODES)
        if not isinstance(batch_size, int) or batch_size <= 0:
            raise InputError(f"batch_size must be a positive integer, got {batch_size!r}")
        if not (isinstance(world_size, int) and world_size >= 1 and 0 <= rank < world_size):
            raise InputError(f"rank must be in [0, world_size), got rank={rank!r}, world_size={world_size!r}")
        if batch_size < world_size:
            raise InputError(f"batch_size ({batch_size}) must be >= world_size ({world_size})")
        self.batch_size, self.shuffle, self.binarize, self.seed = batch_size, shuffle, binarize, seed
        self.drop_last, self.rank, self.world_size = drop_last, rank, world_size
        self.device = torch.device(device)
        x = to_unit_float(split.images).to(self.device)
        if binarize == "static":
            x = binarize_static(x, mix_seed(seed, 0x57A71C))
        self.x = x  # (N, C, H, W) float32
        self.y = split.labels.to(self.device)
        self.n = len(split)
        full, rest = divmod(self.n, batch_size)
        # Under data parallelism a final batch smaller than the world would leave a rank empty.
        keep_rest = rest > 0 and not drop_last and rest >= world_size
        self.num_batches = full + int(keep_rest)
        if self.num_batches == 0:
            raise InputError(f"split of {self.n} examples yields no batch of size {batch_size} (drop_last={drop_last})")

    def __len__(self) -> int:
        return self.num_batches

    def order(self, epoch: int) -> torch.Tensor:
        """Index permutation of ``epoch`` (identity when not shuffling), (N,) int64."""
        if not self.shuffle:
            return torch.arange(self.n, device=self.device)
        g = torch.Generator().manual_seed(mix_seed(self.seed, epoch))
        return torch.randperm(self.n, generator=g).to(self.device)

    def epoch(self, epoch: int, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield this rank's (x (b, C, H, W), y (b,)) for batches ``start..`` of ``epoch``."""
        if not 0 <= start <= self.num_batches:
            raise InputError(f"start batch must be in [0, {self.num_batches}], got {start}")
        perm = self.order(epoch)
        B, W = self.batch_size, self.world_size
        for b in range(start, self.num_batches):
            lo, hi = b * B, min((b + 1) * B, self.n)
            size = hi - lo
            r_lo = lo + (size * self.rank) // W
            r_hi = lo + (size * (self.rank + 1)) // W
            idx = perm[r_lo:r_hi]
            x = self.x.index_select(0, idx)
            if self.binarize == "dynamic":
                g = torch.Generator(device=self.device).manual_seed(mix_seed(self.seed, epoch, b, self.rank, 0xB1))
                x = torch.bernoulli(x, generator=g)
            yield x, self.y.index_select(0, idx)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self.epoch(0)


def eval_loader(
    split: ImageSplit, batch_size: int, binarize: Binarize, seed: int, device: torch.device | str
) -> BatchLoader:
    """Loader for evaluation: fixed order, and one fixed binarization so epochs are comparable."""
    mode: Binarize = "static" if binarize != "none" else "none"
    return BatchLoader(split, batch_size, shuffle=False, binarize=mode, seed=mix_seed(seed, 0xE7A1), device=device)
