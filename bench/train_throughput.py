"""Training throughput: vaekit's Trainer vs a minimal hand-written PyTorch loop.

Same architecture (784-512-16 MLP, ReLU, Bernoulli on grey MNIST), batch 128,
Adam 1e-3, 2 epochs over the 60,000 real MNIST training images, in one process,
alternating the two so machine noise hits both alike. vaekit runs with its
defaults that cost time in a real run: per-step JSONL metrics, the NaN guard,
input checks and an atomic checkpoint at each epoch end; the progress bar and
TensorBoard are off (terminal and optional add-on) and evaluation is off (the
hand loop has none).

The figure is the median over reps of the ratio within each back-to-back pair (the two loops
run in ABBA order), so that the machine's drift in speed over minutes cancels.

    python bench/train_throughput.py [--reps 5] [--epochs 2]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import print_table, write_results  # noqa: E402

from vaekit import VAE, DataConfig, TrainConfig, Trainer, VAEConfig, load_dataset  # noqa: E402
from vaekit.training.standard import standard_callbacks  # noqa: E402

BATCH, LR, HIDDEN, LATENT = 128, 1e-3, 512, 16


class HandVAE(nn.Module):
    """The PyTorch-examples VAE, written out."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(784, HIDDEN)
        self.fc21 = nn.Linear(HIDDEN, LATENT)
        self.fc22 = nn.Linear(HIDDEN, LATENT)
        self.fc3 = nn.Linear(LATENT, HIDDEN)
        self.fc4 = nn.Linear(HIDDEN, 784)

    def forward(self, x):
        h = F.relu(self.fc1(x))
        mu, logvar = self.fc21(h), self.fc22(h)
        z = mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)
        return self.fc4(F.relu(self.fc3(z))), mu, logvar


def hand_loop(images: torch.Tensor, epochs: int) -> float:
    """Seconds to train the hand-written VAE for ``epochs`` epochs on uint8 images (N, 1, 28, 28)."""
    torch.manual_seed(0)
    model = HandVAE()
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    t = time.perf_counter()
    x_train = images.flatten(1).float().div(255.0)  # both timings include turning bytes into floats
    n = x_train.shape[0]
    for _ in range(epochs):
        perm = torch.randperm(n)
        total = 0.0
        for i in range(0, n, BATCH):
            x = x_train[perm[i : i + BATCH]]
            logits, mu, logvar = model(x)
            bce = F.binary_cross_entropy_with_logits(logits, x, reduction="sum")
            kld = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp())
            loss = (bce + kld) / x.shape[0]
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item()
    return time.perf_counter() - t


def vaekit_loop(data, epochs: int, run_dir: Path) -> float:
    """Seconds for vaekit's Trainer.fit on the same model and budget."""
    torch.manual_seed(0)
    model = VAE(VAEConfig(hidden_sizes=(HIDDEN,), latent_dim=LATENT))
    cfg = TrainConfig(epochs=epochs, batch_size=BATCH, lr=LR, progress=False, tensorboard="off", eval_every=0,
                      device="cpu")
    t = time.perf_counter()
    callbacks = standard_callbacks(model, data)  # KL control and collapse monitors, as vaekit.train runs
    Trainer(model, data, cfg, data_config=DataConfig(), run_dir=run_dir, callbacks=callbacks).fit(resume=False)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--epochs", type=int, default=2)
    args = ap.parse_args()
    data = load_dataset("mnist")
    n = len(data.train) * args.epochs
    hand, ours = [], []
    with tempfile.TemporaryDirectory() as tmp:
        hand_loop(data.train.images[:2048], 1)  # warm-up of both paths (allocator, kernels)
        vaekit_loop(type(data)(data.name, data.train.subset(2048), data.test.subset(100), data.classes),
                    1, Path(tmp) / "warm")
        for r in range(args.reps):
            # ABBA order: a drift in machine speed over the run hits both loops alike
            first_hand = r % 2 == 0
            if first_hand:
                hand.append(n / hand_loop(data.train.images, args.epochs))
            ours.append(n / vaekit_loop(data, args.epochs, Path(tmp) / f"run{r}"))
            if not first_hand:
                hand.append(n / hand_loop(data.train.images, args.epochs))
            print(f"rep {r + 1}: hand {hand[-1]:.0f} samples/s, vaekit {ours[-1]:.0f} samples/s", flush=True)
    ratios = [o / h for h, o in zip(hand, ours, strict=True)]  # each pair ran back to back
    rows = [[f"rep {i + 1}", h, o, q] for i, (h, o, q) in enumerate(zip(hand, ours, ratios, strict=True))]
    med_h, med_o = statistics.median(hand), statistics.median(ours)
    rows.append(["median", med_h, med_o, statistics.median(ratios)])
    print_table(["run", "hand samples/s", "vaekit samples/s", "ratio"], rows)
    write_results("train_throughput", {
        "setup": {"architecture": "784-512-16 MLP, ReLU, Bernoulli", "data": "MNIST train (60000), grey",
                  "batch_size": BATCH, "optimizer": f"Adam lr={LR}", "epochs": args.epochs, "reps": args.reps},
        "hand_samples_per_s": hand, "vaekit_samples_per_s": ours,
        "median_hand": med_h, "median_vaekit": med_o, "ratio_median": statistics.median(ratios),
        "ratios": ratios, "ratio_of_medians": med_o / med_h,
    })


if __name__ == "__main__":
    main()
