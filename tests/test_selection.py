"""Model selection on a validation split: the held-out draw, the scores, the restored weights, resume."""

import pytest
import torch
from helpers import Crash, callback, configured_trainer

from vaekit.data import ImageSplit
from vaekit.errors import ConfigError, InputError
from vaekit.evaluation.elbo import evaluate_elbo
from vaekit.models import AAE, VAE, AAEConfig, VAEConfig
from vaekit.models.base import load_model, read_model_doc
from vaekit.objectives.mmd import mmd_rbf
from vaekit.training import Callback, DataConfig, TrainConfig, Trainer, read_metrics
from vaekit.training.config import load_run_config
from vaekit.training.monitors import MonitorConfig
from vaekit.training.selection import BestModelSelector, SelectConfig

pytestmark = pytest.mark.usefixtures("one_thread")


def _split(n=100):
    return ImageSplit(torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).clone(), torch.arange(n))


def test_split_off_is_a_seeded_uniform_draw_disjoint_from_the_rest():
    rest, held = _split().split_off(20, seed=4)
    assert len(rest) == 80 and len(held) == 20
    a, b = set(rest.labels.tolist()), set(held.labels.tolist())
    assert not a & b and a | b == set(range(100))
    assert any(i < 50 for i in b) and any(i >= 50 for i in b), "a uniform draw, not a tail"
    draw = torch.randperm(100, generator=torch.Generator().manual_seed(4))[:20]
    assert held.labels.tolist() == draw.tolist(), "held out in the order drawn: every prefix is uniform"
    assert rest.labels.tolist() == sorted(rest.labels.tolist()), "the rest keeps its order"
    assert torch.equal(held.images.flatten().long(), held.labels)
    assert _split().split_off(20, seed=4)[1].labels.tolist() == held.labels.tolist()
    assert _split().split_off(20, seed=5)[1].labels.tolist() != held.labels.tolist()
    for bad in (0, 100, -1, 2.5, True):
        with pytest.raises(InputError, match="held-out part"):
            _split().split_off(bad)


def test_config_errors_name_the_setting():
    with pytest.raises(ConfigError, match="select.metric"):
        SelectConfig(metric="best")
    with pytest.raises(ConfigError, match="select.samples"):
        SelectConfig(samples=1)
    with pytest.raises(ConfigError, match="select.bandwidths"):
        SelectConfig(bandwidths=(1.0, -2.0))
    with pytest.raises(ConfigError, match=r"data.validation \(50\).*\(50 examples after data.train_subset"):
        DataConfig(train_subset=50, validation=50).train_splits(_split())
    with pytest.raises(ConfigError, match="data.validation"):
        DataConfig(validation=-1)
    with pytest.raises(ConfigError, match="data.validation"):
        DataConfig(validation=70000).train_splits(_split())
    cfg = load_run_config(None, ["select.metric=prior_mmd", "select.every_steps=10", "data.validation=500"])
    assert cfg.select.metric == "prior_mmd" and cfg.data.validation == 500


def test_trainer_refuses_selection_without_validation_or_a_prior(mnist_small, tmp_path):
    vae = VAE(VAEConfig(latent_dim=2, hidden_sizes=(16,)))
    with pytest.raises(ConfigError, match="data.validation .2000. must be smaller than the training split"):
        Trainer(vae, mnist_small, TrainConfig(progress=False), data_config=DataConfig(validation=2000),
                run_dir=tmp_path / "never")
    assert not (tmp_path / "never").exists(), "refused before anything is written"
    with pytest.raises(ConfigError, match="data.validation"):
        configured_trainer(vae, mnist_small, TrainConfig(progress=False), run_dir=tmp_path,
                           select=SelectConfig(metric="val_loss"))
    with pytest.raises(ConfigError, match="val_loss"):
        configured_trainer(vae, mnist_small, TrainConfig(progress=False), data_config=DataConfig(validation=100),
                           run_dir=tmp_path, select=SelectConfig(metric="prior_mmd"))


def _aae():
    torch.manual_seed(0)
    return AAE(AAEConfig(latent_dim=2, prior="mixture", hidden_sizes=(64,), disc_hidden=(32,),
                         diversity_samples=2, ae_lr=1e-3))


def _aae_trainer(data, run_dir, callbacks=(), **kw):
    cfg = TrainConfig(epochs=2, batch_size=64, checkpoint_every=7, progress=False, tensorboard="off", seed=1,
                      eval_batch_size=500, **kw)
    return configured_trainer(_aae(), data, cfg, run_dir=run_dir, callbacks=callbacks,
                              data_config=DataConfig(validation=300, validation_seed=2),
                              monitor=MonitorConfig(enabled=False),
                              select=SelectConfig(metric="prior_mmd", every_steps=5, samples=300))


class Spoil(Callback):
    """Blows the codes far off the prior at a checked step (50), so the best weights are earlier
    ones: the selector scores after the user's callbacks and must not keep these."""

    name = "spoil"

    def on_step_end(self, trainer, record):
        if record["step"] == 50:
            with torch.no_grad():
                trainer.model.to_mean.weight.zero_()  # every code at (50, 50): as far from the prior as it gets
                trainer.model.to_mean.bias.fill_(50.0)


def test_prior_mmd_selection_restores_saves_and_evaluates_the_best_weights(mnist_small, tmp_path):
    t = _aae_trainer(mnist_small, tmp_path / "r", [Spoil()])
    res = t.fit()
    assert res.steps == 54 and res.summaries["select"]["best_step"] < 50
    assert dict(map(tuple, res.summaries["select"]["checks"]))[50] > 1.0  # the spoiled codes were scored
    sel = callback(t, "select")
    assert res.summaries["select"] == sel.summary()
    checks = res.summaries["select"]["checks"]
    steps = [s for s, _ in checks]
    assert steps == list(range(5, res.steps + 1, 5)) + ([res.steps] if res.steps % 5 else [])
    best_step, best = min(checks, key=lambda c: c[1])
    assert (res.summaries["select"]["best_step"], res.summaries["select"]["best_value"]) == (best_step, best)
    # the in-memory model and the saved one hold the best weights
    for k, v in t.model.state_dict().items():
        assert torch.equal(v.cpu(), sel.best_weights[k]), k
    saved = load_model(res.model_dir)
    assert read_model_doc(res.model_dir)["metadata"]["selected"]["best_step"] == best_step
    assert sel.score(saved) == pytest.approx(best, abs=1e-12)
    # the score is the MMD between validation codes and prior samples, recomputed independently
    rest, val = mnist_small.train.split_off(300, 2)
    x = val.images.float() / 255.0
    with torch.no_grad():
        codes = saved.encode(x).mean
    prior = saved.sample_prior(300, torch.Generator().manual_seed(0))
    med = float(torch.pdist(prior.double()).median())
    assert mmd_rbf(codes, prior, [med * f for f in (1 / 16, 1 / 8, 1 / 4, 1 / 2, 1)]) == pytest.approx(best, rel=1e-6)
    # the final test evaluation is of the selected weights
    test_x = mnist_small.test.images.float() / 255.0
    ev = evaluate_elbo(saved, [(test_x, mnist_small.test.labels)], seed=0)
    assert res.final_eval["recon"] == pytest.approx(ev["recon"], rel=1e-5)
    # the validation images were never trained on: the loader served len(rest) examples per epoch
    assert res.steps == 2 * -(-len(rest) // 64)
    recs = [r for r in read_metrics(tmp_path / "r" / "metrics.jsonl", "train") if "select_prior_mmd" in r]
    assert [r["step"] for r in recs] == list(range(5, res.steps + 1, 5))


def test_selection_resumes_exactly(mnist_small, tmp_path):
    ref = _aae_trainer(mnist_small, tmp_path / "ref")
    ref_res = ref.fit()
    crashing = _aae_trainer(mnist_small, tmp_path / "run", [Crash(31)])  # last checkpoint at 28
    with pytest.raises(KeyboardInterrupt):
        crashing.fit()
    resumed = _aae_trainer(mnist_small, tmp_path / "run")
    res = resumed.fit()
    assert res.resumed_from and res.summaries["select"] == ref_res.summaries["select"]
    for (k, a), (_, b) in zip(ref.model.state_dict().items(), resumed.model.state_dict().items(), strict=True):
        assert torch.equal(a, b), k


def test_scoring_leaves_the_training_rng_alone_and_val_loss_is_the_mean_loss(mnist_small):
    torch.manual_seed(0)
    vae = VAE(VAEConfig(latent_dim=4, hidden_sizes=(32,)))
    x = mnist_small.train.images[:250].float() / 255.0
    y = mnist_small.train.labels[:250]
    sel = BestModelSelector(SelectConfig(metric="val_loss", samples=250), x, y)
    before = torch.get_rng_state()
    value = sel.score(vae)
    assert torch.equal(torch.get_rng_state(), before)
    # independently: per-example loss of one reparameterized draw under the same seed, averaged
    with torch.random.fork_rng():
        torch.manual_seed(0)
        with torch.no_grad():
            parts = [vae.eval()(x[i: i + 1000]).loss * x[i: i + 1000].shape[0] for i in range(0, 250, 1000)]
    assert value == pytest.approx(float(sum(parts) / 250), rel=1e-5)
    assert sel.score(vae) == value, "each check sees the same draws"


def test_a_non_finite_score_is_never_the_best(mnist_small, tmp_path):
    model = _aae()
    x = mnist_small.train.images[:200].float() / 255.0
    t = configured_trainer(model, mnist_small, TrainConfig(progress=False), run_dir=tmp_path,
                           data_config=DataConfig(validation=200), monitor=MonitorConfig(enabled=False))
    sel = BestModelSelector(SelectConfig(metric="prior_mmd", samples=200), x, mnist_small.train.labels[:200])
    good = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model.to_mean.bias.fill_(float("nan"))
    t.state.step = 5
    assert sel.check(t) != sel.check(t)  # NaN, first check
    model.load_state_dict(good)
    t.state.step = 10
    finite = sel.check(t)
    assert sel.best_step == 10 and sel.best_value == finite
    with torch.no_grad():
        model.to_mean.bias.fill_(float("inf"))
    t.state.step = 15
    sel.check(t)
    assert sel.best_step == 10
    assert sel.finish(t) and torch.equal(model.to_mean.bias, good["to_mean.bias"])


def test_resume_refuses_another_split_and_the_code_prior_skips_validation(mnist_small, tmp_path):
    from vaekit.cli.common import train_examples
    from vaekit.errors import CheckpointError
    from vaekit.training.run import train

    base = [f"out_dir={tmp_path}", "name=x", "train.max_steps=2", "train.progress=false", "model.hidden_sizes=[16]",
            "train.tensorboard=off", "data.validation=300"]
    train(load_run_config(None, base), dataset=mnist_small)
    with pytest.raises(CheckpointError, match="data.validation"):
        train(load_run_config(None, [*base, "data.validation=200"]), dataset=mnist_small)
    with pytest.warns(UserWarning, match="afresh"):  # afresh: fine
        train(load_run_config(None, [*base, "data.validation=200"]), dataset=mnist_small, resume=False)
    rest, held = mnist_small.train.split_off(200, 0)
    seen = train_examples(mnist_small, {"validation": 200, "validation_seed": 0})
    assert torch.equal(seen.images, rest.images) and len(seen) == 1800
    assert len(train_examples(mnist_small, {"train_subset": 500})) == 500
