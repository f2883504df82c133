"""The Open Inference Protocol (KServe V2 REST) with requests shaped as the protocol's documentation
shows them (kserve.github.io, "Open Inference Protocol (V2 Inference Protocol)": health, metadata,
inference request/response JSON objects, error object)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from test_serving import images, save_model

from vaekit.models import CVAEConfig, load_model
from vaekit.serving import ModelService, create_app

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.filterwarnings("ignore::DeprecationWarning")]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    path = save_model(tmp_path_factory.mktemp("oip") / "mnist")
    svc = ModelService(path)
    with TestClient(create_app(svc)) as c:
        yield c, svc, load_model(path)


def test_health_and_server_metadata(served):
    c, svc, _ = served
    # "GET v2/health/live", "GET v2/health/ready": 200 means true
    assert c.get("/v2/health/live").status_code == 200
    assert c.get("/v2/health/ready").status_code == 200
    assert c.get("/v2/models/mnist/ready").status_code == 200
    assert c.get(f"/v2/models/mnist/versions/{svc.version}/ready").status_code == 200
    assert c.get("/v2/models/mnist/versions/nope/ready").status_code == 404
    # "$metadata_server_response": name, version, extensions
    meta = c.get("/v2").json()
    assert set(meta) == {"name", "version", "extensions"} and meta["name"] == "vaekit"


def test_model_metadata_lists_versions_inputs_and_outputs(served):
    c, svc, _ = served
    meta = c.get("/v2/models/mnist").json()
    # "$metadata_model_response": name, versions, platform, inputs, outputs ($metadata_tensor: name, datatype, shape)
    assert meta["name"] == "mnist" and meta["versions"] == [svc.version] and meta["platform"]
    assert meta["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, 1, 28, 28]}]
    names = {o["name"] for o in meta["outputs"]}
    assert {"recon_mse", "recon_nats", "kl", "latent_norm", "latent_mean", "reconstruction"} <= names
    for t in meta["inputs"] + meta["outputs"]:
        assert set(t) == {"name", "datatype", "shape"}
    assert c.get(f"/v2/models/mnist/versions/{svc.version}").json() == meta
    r = c.get("/v2/models/other")
    assert r.status_code == 404 and "error" in r.json()


def test_infer_request_and_response_objects(served):
    c, svc, model = served
    x = images(2)
    # the documented "$inference_request": id, inputs [{name, shape, datatype, data}], outputs [{name}]
    req = {"id": "42",
           "inputs": [{"name": "x", "shape": [2, 1, 28, 28], "datatype": "FP32", "data": x.ravel().tolist()}],
           "outputs": [{"name": "recon_nats"}, {"name": "latent_mean"}, {"name": "reconstruction"}]}
    r = c.post("/v2/models/mnist/infer", json=req)
    assert r.status_code == 200, r.text
    doc = r.json()
    # "$inference_response": model_name, model_version, id, outputs [{name, shape, datatype, data}]
    assert doc["model_name"] == "mnist" and doc["model_version"] == svc.version and doc["id"] == "42"
    assert [o["name"] for o in doc["outputs"]] == ["recon_nats", "latent_mean", "reconstruction"]
    out = {o["name"]: o for o in doc["outputs"]}
    for o in doc["outputs"]:
        assert set(o) == {"name", "shape", "datatype", "data"} and o["datatype"] == "FP32"
        assert len(o["data"]) == int(np.prod(o["shape"]))  # flat, row-major
    xt = torch.from_numpy(x)
    with torch.no_grad():
        q = model.encode(xt)
        want_nats = -model.decode(q.mean).log_prob(xt)
    assert out["latent_mean"]["shape"] == [2, 4]
    np.testing.assert_allclose(np.reshape(out["latent_mean"]["data"], (2, 4)), q.mean.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out["recon_nats"]["data"], want_nats.numpy(), rtol=1e-5)
    assert out["reconstruction"]["shape"] == [2, 1, 28, 28]


def test_infer_with_the_documented_nested_data_and_defaults(served):
    c, svc, _ = served
    x = images(1)
    # one input with any name, nested data (as in the protocol's examples), no outputs: all score outputs
    r = c.post(f"/v2/models/mnist/versions/{svc.version}/infer",
               json={"inputs": [{"name": "input-0", "shape": [1, 1, 28, 28], "datatype": "FP32", "data": x.tolist()}]})
    assert r.status_code == 200, r.text
    names = [o["name"] for o in r.json()["outputs"]]
    assert names == ["recon_mse", "recon_nats", "kl", "latent_norm", "latent_mean", "logvar",
                     "latent_norm_above_limit"]
    assert r.json()["outputs"][-1]["datatype"] == "BOOL" and "id" not in r.json()
    # 8-bit pixels as UINT8 are divided by 255
    q = np.round(x * 255).astype(np.uint8)
    a = c.post("/v2/models/mnist/infer", json={"inputs": [{"name": "x", "shape": [1, 1, 28, 28], "datatype": "UINT8",
                                                          "data": q.ravel().tolist()}]}).json()
    b = c.post("/v2/models/mnist/infer", json={"inputs": [{"name": "x", "shape": [1, 1, 28, 28], "datatype": "FP32",
                                                          "data": (q / 255.0).ravel().tolist()}]}).json()
    assert a["outputs"][1]["data"] == pytest.approx(b["outputs"][1]["data"], rel=1e-6)


def test_the_documented_example_request_gets_the_protocol_error_object(served):
    c, _, _ = served
    # the protocol documentation's own example request, verbatim: not this model's inputs, so an error
    example = {"id": "42",
               "inputs": [{"name": "input0", "shape": [2, 2], "datatype": "UINT32", "data": [1, 2, 3, 4]},
                          {"name": "input1", "shape": [3], "datatype": "BOOL", "data": [True]}],
               "outputs": [{"name": "output0"}]}
    r = c.post("/v2/models/mnist/infer", json=example)
    assert r.status_code == 400
    # "$inference_error_response": { "error": <error message string> }
    assert isinstance(r.json()["error"], str) and r.json()["error"]
    pixels = images(1).ravel().tolist()
    cases = [
        ({"inputs": [{"name": "x", "shape": [2, 2], "datatype": "UINT32", "data": [1, 2, 3, 4]}]}, 400, "datatype"),
        ({"inputs": [{"name": "x", "shape": [1, 1, 28, 28], "datatype": "FP32", "data": [0.5] * 10}]}, 400, "shape"),
        ({"inputs": [{"name": "x", "shape": [1, 1, 28, 27], "datatype": "FP32", "data": [0.5] * 756}]}, 422, "shape"),
        ({"inputs": [{"name": "x", "shape": [1, 1, 28, 28], "datatype": "FP32", "data": [2.0] * 784}]}, 422, "[0, 1]"),
        ({"inputs": [{"name": "x", "shape": [1, 1, 28, 28], "datatype": "FP32", "data": ["a"] * 784}]}, 400, "numbers"),
        ({"inputs": [{"name": "x", "shape": [1, 1, 28, 28], "datatype": "FP32", "data": pixels}],
          "outputs": [{"name": "nope"}]}, 400, "unknown outputs"),
        ({"inputs": [{"name": "x", "shape": [1, 1, 28, 28], "datatype": "FP32", "data": pixels}],
          "outputs": [{"name": "codes"}]}, 400, "does not apply"),  # a constant image would meet the gate first
        ({"inputs": [{"name": "x", "shape": [1, 1, 28, 28], "datatype": "FP32", "data": [0.5] * 784}]}, 422,
         "data-quality gate"),
        ({"inputs": []}, 422, "inputs"),
        ({"inputs": [{"name": "x", "shape": [1], "datatype": "FP32"}]}, 422, "data"),
    ]
    for body, status, word in cases:
        r = c.post("/v2/models/mnist/infer", json=body)
        assert r.status_code == status, (body, r.text)
        assert word in r.json()["error"], (word, r.json())


def test_conditional_model_takes_y_as_a_second_input(tmp_path):
    path = save_model(tmp_path / "c", CVAEConfig(latent_dim=4, hidden_sizes=(32,)))
    with ModelService(path) as svc, TestClient(create_app(svc)) as c:
        meta = c.get("/v2/models/c").json()
        assert meta["inputs"][1] == {"name": "y", "datatype": "INT64", "shape": [-1]}
        x = images(2)
        body = {"inputs": [{"name": "x", "shape": [2, 1, 28, 28], "datatype": "FP32", "data": x.ravel().tolist()},
                           {"name": "y", "shape": [2], "datatype": "INT64", "data": [3, 7]}]}
        r = c.post("/v2/models/c/infer", json=body)
        assert r.status_code == 200, r.text
        want = svc.score(x, np.array([3, 7])).stats.recon_nats.tolist()
        assert r.json()["outputs"][1]["data"] == pytest.approx(want, rel=1e-6)
        body["inputs"][1]["data"] = [3, 70]
        assert c.post("/v2/models/c/infer", json=body).status_code == 422
