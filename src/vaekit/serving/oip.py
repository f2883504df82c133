"""The Open Inference Protocol (KServe V2 REST), so KServe, Triton and MLServer clients work unchanged.

    GET  /v2                                  server metadata
    GET  /v2/health/live, /v2/health/ready    200 when true (empty body, as the protocol says)
    GET  /v2/models/{name}[/versions/{v}]     model metadata: versions, inputs, outputs
    GET  /v2/models/{name}[/versions/{v}]/ready
    POST /v2/models/{name}[/versions/{v}]/infer

Inputs: ``x`` (or the single input), FP32/FP64 values in [0, 1] or UINT8 pixels (divided by 255),
shape [B, C, H, W]; ``y``, INT32/INT64 class labels [B] (or FP32 vectors [B, K]) for a conditional
model. ``data`` is flat row-major or nested. Outputs (all by default, or those named in
``outputs``): recon_mse, recon_nats, kl, latent_norm, latent_mean (VQ-VAE: codes),
recon_above_p99 and latent_norm_above_limit (BOOL), and on request ``reconstruction``.
Errors answer ``{"error": "..."}`` (the protocol's shape) with the problem+json fields beside it.
"""

from __future__ import annotations

import asyncio
import math
from typing import Any

import numpy as np
import torch
from fastapi import APIRouter, Request
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field

from vaekit import __version__
from vaekit.serving import codecs
from vaekit.serving.codecs import Problem
from vaekit.serving.deps import get_service, json_response, label, read_body, request_id

router = APIRouter(prefix="/v2", tags=["open inference protocol"])

DATATYPES = {"BOOL": np.bool_, "UINT8": np.uint8, "UINT16": np.uint16, "UINT32": np.uint32, "UINT64": np.uint64,
             "INT8": np.int8, "INT16": np.int16, "INT32": np.int32, "INT64": np.int64, "FP16": np.float16,
             "FP32": np.float32, "FP64": np.float64}
X_TYPES = ("FP32", "FP64", "FP16", "UINT8")
Y_TYPES = ("INT32", "INT64", "UINT8", "INT8", "INT16", "FP32", "FP64")
SCORE_OUTPUTS = ("recon_mse", "recon_nats", "kl", "latent_norm", "latent_mean", "logvar", "codes",
                 "recon_above_p99", "latent_norm_above_limit")
ALL_OUTPUTS = SCORE_OUTPUTS + ("reconstruction",)


class InferInput(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: str
    shape: list[int]
    datatype: str
    parameters: dict[str, Any] | None = None
    data: list[Any]


class RequestedOutput(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: str
    parameters: dict[str, Any] | None = None


class InferRequest(BaseModel):
    """The protocol's inference request (extra fields are allowed, as the protocol allows them)."""

    model_config = ConfigDict(extra="allow")
    id: str | None = None
    parameters: dict[str, Any] | None = None
    inputs: list[InferInput] = Field(min_length=1)
    outputs: list[RequestedOutput] | None = None


def error_response(p: Problem) -> Response:
    """The protocol's error body ``{"error": ...}`` with the problem details beside it."""
    return json_response({"error": p.detail, **p.body()}, p.status, p.headers)


@router.get("", summary="Server metadata")
async def server_metadata(request: Request) -> dict[str, Any]:
    label(request, "v2_server")
    return {"name": "vaekit", "version": __version__, "extensions": []}


@router.get("/health/live", summary="Live: 200")
async def live(request: Request) -> Response:
    label(request, "v2_health")
    return Response(status_code=200)


@router.get("/health/ready", summary="Ready: 200 when every model is loaded and warm, 503 otherwise")
async def ready(request: Request) -> Response:
    label(request, "v2_health")
    ok = all(s.ready for s in request.app.state.vaekit.services.values())
    return Response(status_code=200 if ok else 503)


def _service(request: Request, name: str, version: str | None):
    svc = get_service(request, name)
    if version is not None and version != svc.version:
        raise Problem(404, "Unknown model version", f"model {name!r} serves version {svc.version!r}, not "
                      f"{version[:64]!r}", "version", version, f"{svc.version!r}")
    return svc


@router.get("/models/{name}/ready", summary="Model ready")
@router.get("/models/{name}/versions/{version}/ready", summary="Model version ready")
async def model_ready(name: str, request: Request, version: str | None = None) -> Response:
    label(request, "v2_health")
    _service(request, name, version)
    return Response(status_code=200)


@router.get("/models/{name}", summary="Model metadata")
@router.get("/models/{name}/versions/{version}", summary="Model version metadata")
async def model_metadata(name: str, request: Request, version: str | None = None) -> Response:
    label(request, "v2_metadata")
    svc = _service(request, name, version)
    return json_response(metadata(svc), headers={"X-Model-Version": svc.version})


def metadata(svc: Any) -> dict[str, Any]:
    m = svc.deployment.model
    c = m.config
    B = -1
    inputs = [{"name": "x", "datatype": "FP32", "shape": [B, *m.input_shape]}]
    if m.conditional:
        inputs.append({"name": "y", "datatype": "INT64" if c.condition == "class" else "FP32",
                       "shape": [B] if c.condition == "class" else [B, c.cond_size]})
    outs = [{"name": n, "datatype": "FP32", "shape": [B]} for n in ("recon_mse", "recon_nats", "latent_norm")]
    if m.defines_elbo:
        outs.append({"name": "kl", "datatype": "FP32", "shape": [B]})
    if m.discrete_latent:
        outs.append({"name": "codes", "datatype": "INT64", "shape": [B, *c.grid]})
    else:
        outs.append({"name": "latent_mean", "datatype": "FP32", "shape": [B, c.latent_dim]})
    if m.gaussian_posterior:
        outs.append({"name": "logvar", "datatype": "FP32", "shape": [B, c.latent_dim]})
    if svc.deployment.profile is not None:
        outs.append({"name": "recon_above_p99", "datatype": "BOOL", "shape": [B]})
    outs.append({"name": "latent_norm_above_limit", "datatype": "BOOL", "shape": [B]})
    outs.append({"name": "reconstruction", "datatype": "FP32", "shape": [B, *m.input_shape]})
    return {"name": svc.name, "versions": [svc.version], "platform": "vaekit_pytorch", "inputs": inputs,
            "outputs": outs}


def tensor_from_input(inp: InferInput, i: int, allowed: tuple[str, ...], pixels: bool = False) -> np.ndarray:
    """One protocol input tensor as an array of its declared datatype and shape (400 otherwise);
    ``pixels``: UINT8 values are 8-bit intensities, divided by 255."""
    field = f"inputs[{i}]"
    if inp.datatype not in allowed:
        raise Problem(400, "Invalid input", f"{field} ({inp.name!r}) has datatype {inp.datatype!r}; "
                      f"allowed: {list(allowed)}", f"{field}.datatype", inp.datatype, ", ".join(allowed))
    if len(inp.shape) > codecs.MAX_DIMS or any(d < 0 for d in inp.shape):
        raise Problem(400, "Invalid input", f"{field}.shape must be at most {codecs.MAX_DIMS} sizes >= 0",
                      f"{field}.shape", inp.shape, "sizes >= 0")
    try:
        arr = np.asarray(inp.data, dtype=np.float64 if inp.datatype.startswith("FP") or "INT" in inp.datatype
                         else None)
    except (ValueError, TypeError):
        raise Problem(400, "Invalid input", f"{field}.data must be numbers (flat, or nested in row-major order)",
                      f"{field}.data", None, f"{inp.datatype} values") from None
    if arr.dtype.kind not in "biuf":
        raise Problem(400, "Invalid input", f"{field}.data must hold {inp.datatype} numbers", f"{field}.data",
                      None, f"{inp.datatype} values")
    if arr.size != math.prod(inp.shape):
        raise Problem(400, "Invalid input", f"{field}.shape {inp.shape} holds {math.prod(inp.shape)} values but "
                      f"{field}.data has {arr.size}", f"{field}.shape", inp.shape,
                      f"a shape whose product is {arr.size}")
    if "INT" in inp.datatype and not np.all(arr == np.round(arr)):
        raise Problem(400, "Invalid input", f"{field}.data must hold integers for datatype {inp.datatype}",
                      f"{field}.data", None, "integers")
    arr = arr.reshape(inp.shape)
    if inp.datatype == "UINT8":
        if arr.min(initial=0) < 0 or arr.max(initial=0) > 255:
            raise Problem(400, "Invalid input", f"{field}.data must lie in [0, 255] for UINT8", f"{field}.data",
                          None, "[0, 255]")
        return (arr / 255.0).astype(np.float32) if pixels else arr.astype(np.int64)
    if "INT" in inp.datatype:
        if arr.size and np.abs(arr).max() >= 2**62:
            raise Problem(400, "Invalid input", f"{field}.data holds integers too large for int64", f"{field}.data",
                          None, "integers below 2**62")
        return arr.astype(np.int64)
    with np.errstate(over="ignore"):  # beyond float32 becomes inf, which the model's input check names
        return arr.astype(np.float32)


@router.post("/models/{name}/infer", summary="Inference (KServe V2 / Open Inference Protocol)")
@router.post("/models/{name}/versions/{version}/infer", summary="Inference on a given version")
async def infer(name: str, request: Request, version: str | None = None) -> Response:
    label(request, "v2_infer")
    svc = _service(request, name, version)
    req = codecs.parse_json(InferRequest, await read_body(request))
    by_name = {inp.name: (i, inp) for i, inp in enumerate(req.inputs)}
    if len(by_name) != len(req.inputs):
        raise Problem(400, "Invalid input", "input names must be unique", "inputs", [i.name for i in req.inputs],
                      "distinct names")
    conditional = svc.deployment.model.conditional
    if "x" in by_name:
        xi, xin = by_name.pop("x")
    elif len(req.inputs) == 1:
        xi, xin = 0, req.inputs[0]
        by_name = {}
    else:
        raise Problem(400, "Invalid input", "name the image input 'x' (and the condition 'y')", "inputs",
                      sorted(by_name), "inputs named x and y")
    y = None
    if "y" in by_name:
        yi, yin = by_name.pop("y")
        y = tensor_from_input(yin, yi, Y_TYPES)
    if by_name:
        raise Problem(400, "Invalid input", f"unknown inputs {sorted(by_name)}", "inputs", sorted(by_name),
                      "x" + (", y" if conditional else ""))
    x = tensor_from_input(xin, xi, X_TYPES, pixels=True)
    wanted = [o.name for o in req.outputs] if req.outputs else None
    if wanted is not None:
        unknown = [n for n in wanted if n not in ALL_OUTPUTS]
        if unknown:
            raise Problem(400, "Invalid output", f"unknown outputs {unknown}", "outputs", unknown,
                          f"any of {list(ALL_OUTPUTS)}")
    endpoint = "reconstruct" if wanted and "reconstruction" in wanted else "score"
    result = await asyncio.wrap_future(svc.submit(endpoint, x=x, y=y, request_id=req.id or request_id(request)))
    outputs = _outputs(result, wanted)
    doc: dict[str, Any] = {"model_name": result.model, "model_version": result.version, "outputs": outputs,
                           "parameters": {"profile_available": result.profile_available}}
    if req.id is not None:
        doc["id"] = req.id
    return json_response(doc, headers={"X-Model-Version": result.version, "X-Request-Id": result.request_id,
                                       "X-Model-Route": result.route})


def _outputs(result: Any, wanted: list[str] | None) -> list[dict[str, Any]]:
    s = result.stats
    named: dict[str, torch.Tensor | None] = {
        "recon_mse": s.recon_mse, "recon_nats": s.recon_nats, "kl": s.kl, "latent_norm": s.latent_norm,
        "latent_mean": s.latent, "logvar": s.logvar, "codes": s.codes, "recon_above_p99": s.recon_above_p99,
        "latent_norm_above_limit": s.latent_norm_above_limit, "reconstruction": result.outputs.get("reconstruction"),
    }
    names = wanted if wanted is not None else [n for n in SCORE_OUTPUTS if named[n] is not None]
    out = []
    for n in names:
        t = named.get(n)
        if t is None:
            raise Problem(400, "Invalid output", f"output {n!r} does not apply to this model ({result.model})",
                          "outputs", n, "the outputs listed by GET /v2/models/{name}")
        dt = "BOOL" if t.dtype == torch.bool else "INT64" if not t.is_floating_point() else "FP32"
        out.append({"name": n, "shape": list(t.shape), "datatype": dt, "data": t.flatten().tolist()})
    return out
