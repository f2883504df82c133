"""Fuzzing every endpoint with generated requests (hypothesis): arbitrary JSON, near-valid tensors,
random bytes under every accepted content type. No answer may be a 5xx, every error is a problem
body, and the service keeps serving. The default run sends a few dozen requests per endpoint and
body kind; ``-m slow`` sends over 500 per endpoint."""

from __future__ import annotations

import json

import numpy as np
import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_serving import b64png, images, npy, save_model

from vaekit.models import CVAEConfig, VQVAEConfig
from vaekit.serving import ModelService, create_app

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.filterwarnings("ignore::DeprecationWarning"),
              pytest.mark.filterwarnings("ignore:the VQ-VAE's code prior has not been trained")]

ENDPOINTS = ["/v1/models/m/score", "/v1/models/m/encode", "/v1/models/m/reconstruct", "/v1/models/m/decode",
             "/v1/models/m/generate", "/v2/models/m/infer"]
KEYS = ["x", "png", "y", "z", "n", "seed", "data", "shape", "inputs", "outputs", "id", "name", "datatype"]
numbers = st.one_of(st.integers(-(2**70), 2**70), st.floats(allow_nan=True, allow_infinity=True),
                    st.floats(0, 1), st.sampled_from([0, 1, 255, -1, 0.5, 2**63, 1e308]))
scalars = st.one_of(st.none(), st.booleans(), numbers, st.text(max_size=20))
json_values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=6),
                                                            st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=5),
                                                                            inner, max_size=4)), max_leaves=30)


@st.composite
def tensors(draw):
    """Nested lists close to what the endpoints take: right or wrong rank and sizes, odd values."""
    shape = draw(st.sampled_from([(1, 1, 28, 28), (2, 1, 28, 28), (1, 28, 28), (1, 1, 28, 27), (1, 4), (2, 4),
                                  (1, 7, 7), (0, 1, 28, 28), (1, 3), (3,), ()]))
    fill = draw(st.sampled_from(["unit", "bytes", "nan", "neg", "int"]))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    a = {"unit": lambda: rng.random(shape), "bytes": lambda: rng.integers(0, 256, shape).astype(float),
         "nan": lambda: np.full(shape, np.nan), "neg": lambda: -rng.random(shape),
         "int": lambda: rng.integers(-3, 600, shape)}[fill]()
    return a.tolist()


@st.composite
def bodies(draw):
    """(content, content-type) pairs: JSON documents built from the fields the API knows, random
    JSON, random bytes, PNG and .npy bodies with wrong contents."""
    kind = draw(st.sampled_from(["fields", "fields", "json", "bytes", "npy", "png", "oip"]))
    if kind == "fields":
        doc = {}
        for k in draw(st.lists(st.sampled_from(KEYS), max_size=4, unique=True)):
            doc[k] = draw(st.one_of(tensors(), json_values, st.lists(st.integers(-5, 20), max_size=4),
                                    st.builds(lambda d, s: {"data": d, "shape": s}, st.lists(numbers, max_size=8),
                                              st.lists(st.integers(-2, 30), max_size=5))))
        return json.dumps(doc).encode(), "application/json"
    if kind == "json":
        return json.dumps(draw(json_values)).encode(), draw(st.sampled_from(["application/json", "text/plain"]))
    if kind == "bytes":
        return draw(st.binary(max_size=300)), draw(st.sampled_from(["application/json", "application/x-npy",
                                                                    "image/png", "application/octet-stream", ""]))
    if kind == "npy":
        arr = np.asarray(draw(tensors()))
        dtype = draw(st.sampled_from(["float32", "float64", "uint8", "int64", "float16", "bool"]))
        raw = npy(arr.astype(dtype, copy=False) if arr.size else arr)
        cut = draw(st.integers(0, len(raw)))
        return (raw if draw(st.booleans()) else raw[:cut]), "application/x-npy"
    if kind == "png":
        img = images(1)[0]
        raw = b64png(img)
        variant = draw(st.sampled_from(["ok", "cut", "junk"]))
        text = raw if variant == "ok" else raw[:draw(st.integers(0, len(raw)))] if variant == "cut" else "@@"
        return json.dumps({"png": [text] * draw(st.integers(0, 3))}).encode(), "application/json"
    inp = {"name": draw(st.sampled_from(["x", "y", "input0"])),
           "shape": draw(st.lists(st.integers(-1, 30), max_size=4)),
           "datatype": draw(st.sampled_from(["FP32", "UINT8", "INT64", "BOOL", "BYTES", "fp32"])),
           "data": draw(st.one_of(tensors(), st.lists(numbers, max_size=10)))}
    doc = {"inputs": draw(st.lists(st.just(inp), max_size=3))}
    if draw(st.booleans()):
        doc["outputs"] = [{"name": draw(st.sampled_from(["recon_nats", "codes", "reconstruction", "x"]))}]
    return json.dumps(doc).encode(), "application/json"


@pytest.fixture(scope="module", params=["vae", "cvae", "vqvae"])
def client(request, tmp_path_factory):
    cfg = {"vae": None, "cvae": CVAEConfig(latent_dim=4, hidden_sizes=(16,)),
           "vqvae": VQVAEConfig(hidden_channels=8, residual_channels=4, codebook_size=8, code_dim=4, prior_dim=8,
                                prior_layers=1, prior_heads=2)}[request.param]
    path = save_model(tmp_path_factory.mktemp("fuzz") / "m", cfg)
    svc = ModelService(path, max_images=8)
    with TestClient(create_app(svc, max_body_bytes=100_000), raise_server_exceptions=False) as c:
        c.counts = {}
        yield c


def check(client, endpoint: str, body: bytes, ctype: str) -> None:
    headers = {"content-type": ctype} if ctype else {}
    r = client.post(endpoint, content=body, headers=headers)
    client.counts[endpoint] = client.counts.get(endpoint, 0) + 1
    assert r.status_code < 500, (endpoint, body[:300], r.status_code, r.text[:500])
    if r.status_code >= 400:
        doc = r.json()
        assert doc["status"] == r.status_code and doc["detail"], doc
        if endpoint.startswith("/v2/"):
            assert doc["error"]
    else:
        assert r.headers["x-model-version"]


def _fuzz(n: int):
    @settings(max_examples=n, deadline=None, derandomize=True,
              suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                     HealthCheck.data_too_large, HealthCheck.filter_too_much])
    @given(body=bodies())
    def run(client, endpoint, body):
        check(client, endpoint, *body)

    return run


@pytest.mark.parametrize("endpoint", ENDPOINTS)
def test_fuzz_short(client, endpoint):
    _fuzz(25)(client, endpoint)
    assert client.get("/readyz").status_code == 200  # still serving


@pytest.mark.slow
@pytest.mark.parametrize("endpoint", ENDPOINTS)
def test_fuzz_long(client, endpoint):
    before = client.counts.get(endpoint, 0)
    _fuzz(520)(client, endpoint)
    assert client.counts[endpoint] - before >= 500
    assert client.get("/readyz").status_code == 200


def test_handwritten_malformed_requests(client):
    cases = [
        (b"", "application/json"), (b"null", "application/json"), (b"[]", "application/json"),
        (b'{"x": null}', "application/json"), (b'{"x": {}}', "application/json"),
        (b'{"x": {"data": [], "shape": [-1]}}', "application/json"),
        (b'{"x": {"data": [1], "shape": [1,1,1,1,1,1,1,1,1,1]}}', "application/json"),
        (b'{"x": ' + b"[" * 5000 + b"]" * 5000 + b"}", "application/json"),  # deep nesting
        (b'{"n": 1e400}', "application/json"), (b'{"n": 99999999999999999999999}', "application/json"),
        (b'{"seed": -1}', "application/json"), (b'{"z": [[1e39, 0, 0, 0]]}', "application/json"),
        (b"\xff\xfe\x00", "application/json"), (b'{"x": "\\ud800"}', "application/json"),
        (b"\x93NUMPY\x01\x00\xff\xff{'descr': '<f4', 'fortran_order': False, 'shape': (99999999999,), }",
         "application/x-npy"),
    ]
    for ep in ENDPOINTS:
        for body, ctype in cases:
            check(client, ep, body, ctype)
