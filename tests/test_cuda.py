"""The CUDA path: every family trains on a GPU (fp32 and bf16 autocast), resumes, selects, and its
weights give the same outputs on CPU. Skipped where no GPU is present (CI); run on a GPU machine with
``python -m pytest tests/test_cuda.py``."""

import pytest
import torch
from helpers import Crash, callback, configured_trainer
from test_models import VARIANTS

from vaekit.data import ImageDataset
from vaekit.evaluation.nll import nll
from vaekit.models import AAEConfig, VAEConfig, build_model, load_model
from vaekit.training import Callback, DataConfig, TrainConfig, Trainer
from vaekit.training.monitors import MonitorConfig
from vaekit.training.selection import SelectConfig

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
TRAINABLE = [n for n, c in VARIANTS.items() if not (c.family == "cvae" and c.condition == "vector")]


@pytest.fixture(scope="module")
def mnist_gpu(mnist):
    return ImageDataset("mnist", mnist.train.subset(1024), mnist.test.subset(256), mnist.classes, mnist.provenance)


def _tc(**kw):
    base = dict(epochs=1, batch_size=64, device="auto", progress=False, tensorboard="off", checkpoint_every=5,
                eval_batch_size=256, seed=0)
    return TrainConfig(**{**base, **kw})


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("name", TRAINABLE)
def test_every_variant_trains_on_the_gpu_and_loads_on_cpu(name, precision, mnist_gpu, tmp_path):
    cfg = VARIANTS[name]
    torch.manual_seed(0)
    model = build_model(cfg)
    t = configured_trainer(model, mnist_gpu, _tc(max_steps=12, precision=precision), run_dir=tmp_path,
                           data_config=DataConfig(binarize="dynamic"), monitor=MonitorConfig(enabled=False))
    res = t.fit()
    assert t.device.type == "cuda" and next(model.parameters()).is_cuda
    assert res.steps == 12 and res.final_eval is not None
    assert all(v == v and abs(v) != float("inf") for v in res.final_eval.values() if isinstance(v, float)), \
        res.final_eval
    # the saved weights reproduce the GPU model's reconstructions on CPU
    x = mnist_gpu.test.images[:16].float() / 255.0
    y = mnist_gpu.test.labels[:16]
    cpu = load_model(res.model_dir)
    model.eval()
    with torch.no_grad():
        if cfg.family == "cvae":
            a, b = model.reconstruct(x.cuda(), y.cuda()).cpu(), cpu.reconstruct(x, y)
        else:
            a, b = model.reconstruct(x.cuda()).cpu(), cpu.reconstruct(x)
    torch.testing.assert_close(a, b, atol=2e-4, rtol=1e-3)


def test_resume_on_the_gpu_continues_the_uninterrupted_run(mnist_gpu, tmp_path):
    def make(run_dir, callbacks=()):
        torch.manual_seed(0)
        return Trainer(build_model(VAEConfig(latent_dim=8, hidden_sizes=(128,))), mnist_gpu, _tc(max_steps=14),
                       run_dir=run_dir, data_config=DataConfig(binarize="dynamic"), callbacks=callbacks)

    ref = make(tmp_path / "ref")
    ref.fit()
    with pytest.raises(KeyboardInterrupt):
        make(tmp_path / "run", [Crash(12)]).fit()  # last checkpoint at 10
    resumed = make(tmp_path / "run")
    assert resumed.fit().resumed_from
    for (k, a), (_, b) in zip(ref.model.state_dict().items(), resumed.model.state_dict().items(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0, msg=lambda m, k=k: f"{k}: {m}")


def test_prior_mmd_selection_on_the_gpu(mnist_gpu, tmp_path):
    torch.manual_seed(0)
    model = build_model(AAEConfig(latent_dim=2, prior="mixture", hidden_sizes=(128,), disc_hidden=(64,)))

    class Spoil(Callback):  # codes far off the prior from step 20 on: the weights of step 10 must come back
        name = "spoil"

        def on_step_end(self, trainer, record):
            if record["step"] == 20:
                with torch.no_grad():
                    trainer.model.to_mean.bias.fill_(50.0)

    t = configured_trainer(model, mnist_gpu, _tc(epochs=3, max_steps=30), run_dir=tmp_path, callbacks=[Spoil()],
                           data_config=DataConfig(validation=256), monitor=MonitorConfig(enabled=False),
                           select=SelectConfig(metric="prior_mmd", every_steps=10, samples=256))
    res = t.fit()
    assert [s for s, _ in res.summaries["select"]["checks"]] == [10, 20, 30]
    assert res.summaries["select"]["best_step"] == 10 and next(model.parameters()).is_cuda
    assert float(model.to_mean.bias.detach().abs().max()) < 10
    assert callback(t, "select").score(model) == pytest.approx(res.summaries["select"]["best_value"], abs=1e-9)


def test_importance_sampled_nll_on_the_gpu_agrees_with_cpu(mnist_gpu):
    torch.manual_seed(0)
    model = build_model(VAEConfig(latent_dim=8, hidden_sizes=(128,))).eval()
    x = (mnist_gpu.test.images[:64].float() / 255.0 > 0.5).float()
    cpu = nll(model, [x], k=500, seed=0)
    gpu = nll(model.cuda(), [x.cuda()], k=500, seed=0)
    # different random streams (CPU and CUDA generators): the estimates agree to Monte Carlo error
    assert abs(cpu["nll"] - gpu["nll"]) < 1e-3 * cpu["nll"], (cpu["nll"], gpu["nll"])


def test_serving_batch1_latency_on_the_gpu():
    """Batch-1 /score on the GPU (the brief: under 50 ms at batch size 1): through ModelService and over
    loopback HTTP (uvicorn in this process), for the 784-400-20 MLP VAE; the stats match the CPU's."""
    figures = serving_latency("cuda")
    print(f"\n{torch.cuda.get_device_name()}: batch-1 score, service p50 {figures['service_p50']:.3f} ms "
          f"p99 {figures['service_p99']:.3f} ms; HTTP p50 {figures['http_p50']:.3f} ms "
          f"p99 {figures['http_p99']:.3f} ms")
    assert figures["http_p99"] < 50.0


def serving_latency(device: str, runs: int = 300) -> dict[str, float]:
    import io
    import socket
    import tempfile
    import threading
    import time

    import httpx
    import numpy as np
    import uvicorn

    from vaekit.serving import ModelService, create_app

    def pct(ts, q):
        ts = sorted(ts)
        return ts[int(q * (len(ts) - 1))] * 1e3

    torch.manual_seed(0)
    cpu_model = build_model(VAEConfig(latent_dim=20, hidden_sizes=(400,)))
    x = np.random.default_rng(0).random((1, 1, 28, 28), dtype=np.float32)
    buf = io.BytesIO()
    np.save(buf, x)
    with tempfile.TemporaryDirectory() as tmp:
        cpu_model.save(f"{tmp}/mnist")
        svc = ModelService(f"{tmp}/mnist", device=device).start()
        assert svc.deployment.model.device.type == device
        ts = []
        for i in range(runs):
            t0 = time.perf_counter()
            r = svc.score(x)
            if i >= 50:
                ts.append(time.perf_counter() - t0)
        with torch.no_grad():
            want = cpu_model.inspect(torch.from_numpy(x))
        torch.testing.assert_close(r.stats.recon_nats, want.recon_nats, atol=1e-2, rtol=1e-4)
        torch.testing.assert_close(r.stats.latent, want.latent, atol=1e-4, rtol=1e-4)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        server = uvicorn.Server(uvicorn.Config(create_app(svc, manage=False), port=port, log_level="warning"))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        while not server.started:
            time.sleep(0.05)
        http = []
        with httpx.Client(base_url=f"http://127.0.0.1:{port}") as c:
            for i in range(runs):
                t0 = time.perf_counter()
                resp = c.post("/v1/models/mnist/score", content=buf.getvalue(),
                              headers={"content-type": "application/x-npy"})
                if i >= 50:
                    http.append(time.perf_counter() - t0)
                assert resp.status_code == 200
        server.should_exit = True
        thread.join(10)
        svc.close()
    return {"service_p50": pct(ts, .5), "service_p99": pct(ts, .99), "http_p50": pct(http, .5),
            "http_p99": pct(http, .99)}
