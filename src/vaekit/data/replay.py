"""Mixing a replay sample into the training batches.

Fine-tuning on new data alone forgets the old; a replay share keeps some of it in every batch.
:class:`ReplayLoader` wraps the training :class:`BatchLoader`: each example of each served
batch is, with probability ``share``, replaced by an example drawn uniformly (with
replacement) from the replay split. The choices are a pure function of ``(seed, epoch, batch,
rank)``, like everything else the loader serves, so a resumed run replays exactly the batches an
uninterrupted one saw. The replay images get the loader's binarization (a static draw of their
own, or a fresh dynamic draw per batch).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from vaekit.data.dataset import BatchLoader, ImageSplit, binarize_static, mix_seed, to_unit_float
from vaekit.errors import InputError


class ReplayLoader:
    """Serves ``loader``'s batches with a ``share`` of their examples taken from ``replay``.

    ``last_replayed`` is how many examples of the batch just served came from the replay split.
    """

    def __init__(self, loader: BatchLoader, replay: ImageSplit, share: float, seed: int = 0):
        if not isinstance(share, int | float) or not 0 < share < 1:
            raise InputError(f"the replay share must be in (0, 1), got {share!r}")
        if tuple(replay.images.shape[1:]) != tuple(loader.x.shape[1:]):
            raise InputError(f"replay images have shape {tuple(replay.images.shape[1:])}, the training images "
                             f"{tuple(loader.x.shape[1:])}")
        self.loader, self.share, self.seed = loader, float(share), seed
        x = to_unit_float(replay.images).to(loader.device)
        if loader.binarize == "static":
            x = binarize_static(x, mix_seed(seed, 0x57A71C, 0x8E))
        self.x, self.y = x, replay.labels.to(loader.device)
        self.last_replayed = 0

    def __len__(self) -> int:
        return len(self.loader)

    def picks(self, epoch: int, batch: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(mask (n,) bool: which examples are replaced, indices into the replay split of those) for
        this rank's ``n`` examples of ``batch`` of ``epoch``; on the CPU."""
        g = torch.Generator().manual_seed(mix_seed(self.seed, epoch, batch, self.loader.rank, 0x8E))
        mask = torch.rand(n, generator=g) < self.share
        idx = torch.randint(self.x.shape[0], (int(mask.sum()),), generator=g)
        return mask, idx

    def epoch(self, epoch: int, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield this rank's mixed (x (b, C, H, W), y (b,)) for batches ``start..`` of ``epoch``."""
        device = self.loader.device
        for b, (x, y) in enumerate(self.loader.epoch(epoch, start), start):
            mask, idx = self.picks(epoch, b, x.shape[0])
            self.last_replayed = len(idx)
            if len(idx):
                rx = self.x.index_select(0, idx.to(device))
                if self.loader.binarize == "dynamic":
                    seed = mix_seed(self.seed, epoch, b, self.loader.rank, 0xB2)
                    rx = torch.bernoulli(rx, generator=torch.Generator(device=device).manual_seed(seed))
                m = mask.to(device)
                x[m] = rx  # x and y are the loader's fresh copies (index_select), never its data
                y[m] = self.y.index_select(0, idx.to(device))
            yield x, y

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self.epoch(0)
