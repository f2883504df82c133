"""The app freezes the start-up heap out of the cyclic collector's reach, and again after a swap."""

from __future__ import annotations

import gc

import torch
from fastapi.testclient import TestClient
from test_serving import SwitchSource, images

from vaekit.models import VAEConfig, build_model
from vaekit.serving import ModelService, create_app


def _models():
    torch.manual_seed(0)
    return [build_model(VAEConfig(latent_dim=4, hidden_sizes=(16,))) for _ in range(2)]


def test_the_app_freezes_the_heap_at_start_and_after_each_swap():
    gc.unfreeze()
    src = SwitchSource(_models())
    svc = ModelService(src, max_batch_size=1)
    with TestClient(create_app(svc)) as client:
        frozen = gc.get_freeze_count()
        assert frozen > 1000  # torch, FastAPI and the model's objects
        assert client.post("/v1/models/sw/score", json={"x": images(1).tolist()}).status_code == 200
        gc.unfreeze()  # what a swap must redo
        src.point(1)
        assert svc.reload() == {"previous": "v1", "current": "v2", "changed": True}
        assert gc.get_freeze_count() > 1000
        response = client.post("/v1/models/sw/score", json={"x": images(1).tolist()})
        assert response.status_code == 200 and response.headers["x-model-version"] == "v2"
    assert all(fn.__name__ != "_refreeze" for fn in svc.swap_listeners)  # the app's listener leaves with it
    gc.unfreeze()


def test_freeze_gc_off_leaves_the_collector_alone():
    gc.unfreeze()
    with TestClient(create_app(ModelService(SwitchSource(_models()), max_batch_size=1), freeze_gc=False)) as client:
        assert client.get("/readyz").status_code == 200
        assert gc.get_freeze_count() == 0
