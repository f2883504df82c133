"""VQ-VAE: quantization, straight-through gradients, EMA update by hand, dead codes, k-means, the code prior."""

import os
import warnings

import pytest
import torch
import torch.multiprocessing as mp
from helpers import rand_images

from vaekit.data import ImageSplit
from vaekit.errors import ConfigError, InputError
from vaekit.models import VQVAE, VQVAEConfig, load_model
from vaekit.models.vqvae_prior import encode_codes, train_code_prior
from vaekit.nn.code_prior import CodePrior
from vaekit.nn.quantizer import VectorQuantizer, kmeans, nearest_code, perplexity, usage_fraction

SMALL = {"hidden_channels": 16, "residual_channels": 8, "codebook_size": 16, "code_dim": 8, "prior_dim": 16,
         "prior_layers": 1, "prior_heads": 2}


pytestmark = pytest.mark.usefixtures("one_thread")


def _x(n=4):
    return rand_images(n)


def test_nearest_code_matches_a_loop():
    g = torch.Generator().manual_seed(0)
    z, cb = torch.randn(20, 3, generator=g), torch.randn(7, 3, generator=g)
    ref = [min(range(7), key=lambda k, i=i: float(((z[i] - cb[k]) ** 2).sum())) for i in range(20)]
    assert nearest_code(z, cb).tolist() == ref


def test_straight_through_gradient_reaches_the_encoder():
    torch.manual_seed(0)
    m = VQVAE(VQVAEConfig(**SMALL, commitment_beta=0.0))
    x = _x()
    z_e = m.encoder(x)
    z_e.retain_grad()
    _, z_q, codes, _ = m._quantize(z_e)
    z_q.retain_grad()
    recon = -m.decode(z_q).log_prob(x).sum()  # no commitment term: the only path to the encoder is straight-through
    recon.backward()
    assert torch.equal(z_e.grad, z_q.grad)  # the identity in the backward pass
    assert z_e.grad.abs().sum() > 0
    for name, p in m.encoder.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    # the forward value is the nearest code, not the encoder output
    assert torch.allclose(z_q, codes, atol=1e-6) and not torch.allclose(z_q, z_e, atol=1e-3)


def test_ema_update_matches_a_hand_computation():
    vq = VectorQuantizer(3, 2, update="ema", decay=0.9, eps=0.1, dead_code_steps=100)
    cb = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    vq.codebook.copy_(cb)
    vq.ema_sum.copy_(cb)
    vq.ema_count.fill_(1.0)
    z = torch.tensor([[1.0, 0.0], [0.0, 1.0], [9.0, 1.0]])  # codes 0, 0, 1; code 2 unused
    vq.train()
    q = vq(z)
    assert q.indices.tolist() == [0, 0, 1] and q.counts.tolist() == [2.0, 1.0, 0.0]
    # by hand: N = 0.9 * 1 + 0.1 * n;  m = 0.9 * e_old + 0.1 * sum of assigned z
    N = [0.9 + 0.2, 0.9 + 0.1, 0.9]  # 1.1, 1.0, 0.9
    m = [[0.1 * 1.0, 0.1 * 1.0], [9.0 + 0.9, 0.1], [0.0, 9.0]]
    total = sum(N)  # 3.0
    smoothed = [(n + 0.1) / (total + 3 * 0.1) * total for n in N]
    expected = torch.tensor([[mi / s for mi in row] for row, s in zip(m, smoothed, strict=True)])
    assert torch.allclose(vq.codebook, expected, atol=1e-6), (vq.codebook, expected)
    assert torch.allclose(vq.ema_count, torch.tensor(N)) and vq.steps_unused.tolist() == [0, 0, 1]
    # eval mode: quantize only
    vq.eval()
    before = vq.codebook.clone()
    vq(z)
    assert torch.equal(vq.codebook, before) and vq.steps_unused.tolist() == [0, 0, 1]


def test_codebook_loss_mode_trains_the_codebook_by_gradient():
    torch.manual_seed(0)
    m = VQVAE(VQVAEConfig(**SMALL, codebook_update="loss"))
    x = _x()
    out = m(x)
    z_e = out.z_e.detach()
    codes = m.quantizer.codebook.detach()[out.indices]  # (B, h, w, D)
    manual = (z_e.permute(0, 2, 3, 1) - codes).pow(2).sum((1, 2, 3)).mean()
    assert torch.allclose(out.codebook, manual) and torch.allclose(out.commitment, manual)
    assert torch.allclose(out.loss, out.recon + 0.25 * out.commitment + out.codebook)
    out.loss.backward()
    g = m.quantizer.codebook.grad
    used = torch.bincount(out.indices.flatten(), minlength=16) > 0
    assert (g[used].abs().sum(1) > 0).all() and (g[~used] == 0).all()


def test_ema_mode_loss_and_terms():
    torch.manual_seed(0)
    m = VQVAE(VQVAEConfig(**SMALL))
    out = m(_x())
    assert not any(n.startswith("quantizer.") for n, _ in m.named_parameters())  # the codebook is a buffer
    assert float(out.codebook) == 0.0
    assert torch.allclose(out.loss, out.recon + 0.25 * out.commitment)
    assert set(out.terms()) == {"loss", "recon", "commitment", "codebook", "perplexity", "code_usage", "dead_codes"}


def test_dead_codes_are_counted_and_restarted_onto_encoder_outputs():
    z = torch.randn(50, 4, generator=torch.Generator().manual_seed(0))
    for restart in (False, True):
        torch.manual_seed(1)
        vq = VectorQuantizer(6, 4, dead_code_steps=3, restart_dead_codes=restart)
        far = torch.full((4,), 100.0)
        vq.codebook[4:] = far  # codes 4 and 5 never win
        vq.ema_sum[4:] = far
        vq.train()
        deads = [vq(z).dead_codes for _ in range(3)]
        assert deads[:2] == [0, 0] and deads[2] == 2  # unused for 3 steps -> dead
        if restart:
            for k in (4, 5):  # moved onto rows of this batch, statistics reset
                assert (vq.codebook[k] == z).all(1).any()
                assert vq.ema_count[k] == 1.0 and vq.steps_unused[k] == 0
        else:
            assert torch.allclose(vq.codebook[4], far, rtol=1e-3) and vq.steps_unused[4:].tolist() == [3, 3]
            assert vq(z).dead_codes == 2


def test_quantizer_runs_in_float32_under_bf16_autocast():
    """Found on an H100: under bf16 autocast the encoder output is bf16; k-means init and restarts
    could not be written into the float32 codebook, and bf16 counts round above 256."""
    z = torch.randn(600, 4, generator=torch.Generator().manual_seed(0))
    for kmeans_init in (True, False):
        torch.manual_seed(1)
        vq = VectorQuantizer(6, 4, dead_code_steps=1, kmeans_init=kmeans_init, kmeans_iters=2).train()
        vq.codebook[5] = 100.0  # never wins: restarted after one step
        vq.ema_sum[5] = 100.0
        with torch.autocast("cpu", dtype=torch.bfloat16):
            zb = torch.nn.functional.linear(z, torch.eye(4))  # a bf16 activation, as an encoder gives
            assert zb.dtype == torch.bfloat16
            q = vq(zb)
        assert vq.codebook.dtype == torch.float32 and q.z_q.dtype == torch.float32
        assert q.counts.sum().item() == 600 and q.counts.dtype == torch.float32  # exact counts
    vq64 = VectorQuantizer(6, 4).double().train()  # a model cast to float64 keeps its dtype
    assert vq64(z.double()).z_q.dtype == torch.float64
    torch.manual_seed(0)
    model = VQVAE(VQVAEConfig(**SMALL, kmeans_init=True, kmeans_iters=2, dead_code_steps=1)).train()
    x = _x(8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    out.loss.backward()
    assert torch.isfinite(out.loss) and all(p.grad is not None for p in model.encoder.parameters())


def test_kmeans_initialisation_finds_the_clusters():
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.0, 0.0], [5.0, 5.0], [-5.0, 5.0]])
    z = (centres[:, None] + 0.05 * torch.randn(3, 40, 2, generator=g)).reshape(-1, 2)
    got = kmeans(z, 3, 10, generator=torch.Generator().manual_seed(1))
    dist = torch.cdist(got, centres).min(1).values
    assert (dist < 0.1).all(), got
    torch.manual_seed(2)
    vq = VectorQuantizer(3, 2, kmeans_init=True, kmeans_iters=10)
    assert not bool(vq.initialized)
    vq.train()
    q = vq(z)
    assert bool(vq.initialized) and q.counts.tolist() == [40.0, 40.0, 40.0]


def test_perplexity_and_usage():
    assert torch.isclose(perplexity(torch.tensor([5.0, 5.0, 5.0, 5.0])), torch.tensor(4.0))
    assert torch.isclose(perplexity(torch.tensor([7.0, 0.0, 0.0])), torch.tensor(1.0))
    assert usage_fraction(torch.tensor([1.0, 0.0, 2.0, 0.0])) == 0.5


def test_decode_accepts_indices_or_vectors_and_validates():
    torch.manual_seed(0)
    m = VQVAE(VQVAEConfig(**SMALL)).eval()
    idx = m.encode(_x())
    assert idx.shape == (4, 7, 7) and idx.dtype == torch.int64
    vectors = m.quantizer.codebook[idx].permute(0, 3, 1, 2)
    assert torch.allclose(m.decode(idx).mean, m.decode(vectors).mean)
    assert torch.allclose(m.reconstruct(_x()), m.decode(idx).mean)
    with pytest.raises(InputError, match="lie in"):
        m.decode(torch.full((1, 7, 7), 16))
    with pytest.raises(InputError, match="shape"):
        m.decode(torch.zeros(1, 6, 6, dtype=torch.int64))
    with pytest.raises(ConfigError, match="divisible"):
        VQVAEConfig(input_shape=(1, 28, 28), downsample=3)
    with pytest.raises(ConfigError, match="codebook_update"):
        VQVAEConfig(codebook_update="sgd")


def test_code_prior_is_causal_and_its_log_prob_is_the_chain_rule():
    torch.manual_seed(0)
    p = CodePrior(12, 9, dim=16, layers=1, heads=2, dropout=0.0).eval()
    c = torch.randint(12, (3, 9))
    c2 = c.clone()
    c2[:, 4] = (c2[:, 4] + 1) % 12
    a, b = p.logits(c), p.logits(c2)
    assert torch.equal(a[:, :5], b[:, :5]) and not torch.equal(a[:, 5:], b[:, 5:])  # row j sees codes < j only
    chain = sum(p.logits(c[:, : j + 1])[:, j].log_softmax(-1).gather(1, c[:, j : j + 1]).squeeze(1)
                for j in range(9))
    assert torch.allclose(p.log_prob(c), chain, atol=1e-5)
    s = p.sample(5, generator=torch.Generator().manual_seed(0))
    assert s.shape == (5, 9) and s.min() >= 0 and s.max() < 12
    with pytest.raises(InputError, match="lie in"):
        p.log_prob(torch.full((1, 9), 12))


def test_prior_training_fits_the_code_grids_and_enables_sampling(tmp_path):
    torch.manual_seed(0)
    m = VQVAE(VQVAEConfig(**SMALL, prior_dropout=0.0))
    # two kinds of image, so the index grids carry structure the prior can learn
    imgs = torch.zeros(64, 1, 28, 28, dtype=torch.uint8)
    imgs[::2, :, :14] = 255
    imgs[1::2, :, :, :14] = 255
    split = ImageSplit(imgs, torch.zeros(64, dtype=torch.int64))
    codes = encode_codes(m, split)
    assert codes.shape == (64, 49)
    with pytest.warns(UserWarning, match="not been trained"):
        m.sample(2)
    hist = train_code_prior(m, split, test=split, epochs=15, batch_size=16, lr=3e-3)
    assert hist["test_nll"][-1] < 0.5 * hist["test_nll"][0] and bool(m.prior_trained)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert m.sample(3).shape == (3, 1, 28, 28)
    m.save(tmp_path / "m")
    assert bool(load_model(tmp_path / "m").prior_trained)


def test_code_statistics_over_a_dataset():
    torch.manual_seed(0)
    m = VQVAE(VQVAEConfig(**SMALL)).eval()
    x = _x(6)
    stats = m.code_statistics([(x[:3], None), (x[3:], None)])
    counts = torch.bincount(m.encode(x).flatten(), minlength=16)
    assert stats["n"] == 6 and stats["unused_codes"] == int((counts == 0).sum())
    assert stats["code_usage"] == pytest.approx(float((counts > 0).float().mean()))


def _ddp_worker(rank, world, init_file, z_all, out_dir):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.manual_seed(0)
    vq = VectorQuantizer(4, 2, decay=0.8, dead_code_steps=100)
    vq.train()
    vq(z_all[rank::world])  # each rank quantizes its own half of the batch
    torch.save(vq.state_dict(), os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def test_ddp_all_reduces_the_ema_statistics(tmp_path):
    """Two gloo processes with different halves of a batch end with the codebook a single process
    computes from the whole batch."""
    z = torch.randn(40, 2, generator=torch.Generator().manual_seed(5)) * 2
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), z, str(tmp_path)), nprocs=2, join=True)
    torch.manual_seed(0)
    single = VectorQuantizer(4, 2, decay=0.8, dead_code_steps=100)
    single.train()
    single(z)
    for r in range(2):
        state = torch.load(tmp_path / f"rank{r}.pt")
        assert torch.allclose(state["codebook"], single.codebook, atol=1e-6), r
        assert torch.allclose(state["ema_count"], single.ema_count, atol=1e-6)
        assert torch.equal(state["steps_unused"], single.steps_unused)


def test_cli_train_then_train_prior_then_sample(tmp_path, capsys, mnist):
    from PIL import Image

    from vaekit.cli.main import main

    sets = [f"out_dir={tmp_path}", "name=vq", "model=vqvae", "data.train_subset=512", "data.test_subset=128",
            "train.max_steps=6", "train.batch_size=64", "train.progress=false", "train.tensorboard=off",
            "model.hidden_channels=16", "model.residual_channels=8", "model.codebook_size=32", "model.code_dim=8",
            "model.prior_dim=16", "model.prior_layers=1", "model.prior_heads=2", "model.dead_code_steps=2"]
    assert main(["train"] + [a for s in sets for a in ("--set", s)]) == 0
    assert "perplexity" in capsys.readouterr().out
    run = tmp_path / "vq"
    with pytest.warns(UserWarning, match="not been trained"):
        assert main(["sample", str(run), "-n", "4", "-o", str(tmp_path / "early.png")]) == 0
    assert main(["train-prior", str(run), "--epochs", "1", "--max-steps", "3"]) == 0
    assert "test bits per index" in capsys.readouterr().out
    assert bool(load_model(run / "model").prior_trained)
    metrics = __import__("json").loads((run / "model" / "metrics.json").read_text())
    assert metrics["prior"]["steps"] == 3
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert main(["sample", str(run), "-n", "4", "-o", str(tmp_path / "s.png")]) == 0
    assert Image.open(tmp_path / "s.png").size[0] > 0
    assert main(["evaluate", str(run)]) == 0
    assert "code_usage" in capsys.readouterr().out
    assert main(["train-prior", str(tmp_path)]) == 2  # not a model folder: a clear error, exit code 2
