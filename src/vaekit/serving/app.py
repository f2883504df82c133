"""The HTTP app: ``create_app(service)`` -> FastAPI, with thin routers over :class:`ModelService`.

Routes: ``POST /v1/models/{name}/{encode,decode,reconstruct,generate,score}``, ``GET /v1/models``,
``GET /v1/models/{name}``, ``GET /healthz``, ``GET /readyz``, ``GET /metrics``, the Open Inference
Protocol under ``/v2`` (:mod:`vaekit.serving.oip`) and, only when an admin token is configured,
``POST /admin/models/{name}/reload`` and ``POST /admin/models/{name}/alias``. Every error is an
``application/problem+json`` body; see docs/serving.md.
"""

from __future__ import annotations

import asyncio
import gc
import hmac
import json
import logging
import os
import time
from collections.abc import Sequence
from contextlib import asynccontextmanager
from typing import Any

import numpy as np
from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import Response
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from vaekit import __version__
from vaekit.errors import ConfigError, InputError, VaekitError, check_positive
from vaekit.serving import codecs, oip, schemas
from vaekit.serving.codecs import Problem
from vaekit.serving.deps import (
    ServingState,
    client_key,
    content_type,
    get_service,
    json_response,
    label,
    problem_response,
    read_body,
    request_id,
    state,
)
from vaekit.serving.metrics import Metrics
from vaekit.serving.service import GateRejectedError, ModelService, Result

log = logging.getLogger("vaekit.serving")
DEFAULT_MAX_BODY = 8 * 1024 * 1024

_P = {"model": schemas.Problem, "content": {"application/problem+json": {}}}
ERRORS: dict[int | str, dict[str, Any]] = {400: _P, 404: _P, 413: _P, 415: _P, 422: _P, 503: _P}
_BIN = {"schema": {"type": "string", "format": "binary"}}


def _body(schema: str, binary: bool = True) -> dict[str, Any]:
    content: dict[str, Any] = {"application/json": {"schema": {"$ref": f"#/components/schemas/{schema}"}}}
    if binary:
        content["application/x-npy"] = {**_BIN, "description": "numpy.save bytes; y as ?y=3,1,4"}
        content["image/png"] = {**_BIN, "description": "one PNG image; y as ?y=3"}
    return {"requestBody": {"required": True, "content": content}}


# -- the vaekit API ------------------------------------------------------------------------------------
v1 = APIRouter(prefix="/v1", tags=["vaekit"])


@v1.post("/models/{name}/score", summary="Monitoring stats per image (recon error, KL, latent, verdicts)",
         response_model=schemas.ScoreResponse, responses=ERRORS, openapi_extra=_body("ImagesRequest"))
async def score(name: str, request: Request) -> Response:
    return await images_call(request, name, "score")


@v1.post("/models/{name}/encode", summary="Posterior mean and log-variance (VQ-VAE: codes), with stats",
         response_model=schemas.EncodeResponse, responses=ERRORS, openapi_extra=_body("ImagesRequest"))
async def encode(name: str, request: Request) -> Response:
    return await images_call(request, name, "encode")


@v1.post("/models/{name}/reconstruct", summary="Reconstructions, with stats; Accept: image/png for a PNG",
         response_model=schemas.ReconstructResponse, responses={**ERRORS, 200: {"content": {"image/png": {}}}},
         openapi_extra=_body("ImagesRequest"))
async def reconstruct(name: str, request: Request) -> Response:
    return await images_call(request, name, "reconstruct")


@v1.post("/models/{name}/decode", summary="Images from latents z (VQ-VAE: code indices)",
         response_model=schemas.ImagesResponse, responses={**ERRORS, 200: {"content": {"image/png": {}}}},
         openapi_extra=_body("DecodeRequest"))
async def decode(name: str, request: Request) -> Response:
    return await images_call(request, name, "decode")


@v1.post("/models/{name}/generate", summary="Samples, seeded per request; Accept: image/png for a PNG",
         response_model=schemas.ImagesResponse, responses={**ERRORS, 200: {"content": {"image/png": {}}}},
         openapi_extra=_body("GenerateRequest", binary=False))
async def generate(name: str, request: Request) -> Response:
    return await images_call(request, name, "generate")


@v1.get("/models", summary="The models served and their versions")
async def list_models(request: Request) -> dict[str, Any]:
    label(request, "models")
    return {"models": [s.describe() for s in state(request).services.values() if s.ready]}


@v1.get("/models/{name}", summary="One model: version, family, shapes, profile, batching", responses=ERRORS)
async def model_info(name: str, request: Request) -> Response:
    label(request, "model")
    svc = get_service(request, name)
    return json_response(svc.describe(), headers={"X-Model-Version": svc.version})


async def images_call(request: Request, name: str, endpoint: str) -> Response:
    """Parse the body for ``endpoint``, run it on the service, answer JSON or PNG."""
    label(request, endpoint)
    svc = get_service(request, name)
    st = state(request)
    st.in_flight += 1
    try:
        body = await read_body(request)
        kwargs = parse_inputs(request, endpoint, body)
        # Let the other ready requests of this loop turn reach this point; if none did, this one is
        # alone and runs inline (no thread hand-off), else it joins a micro-batch on the worker.
        await asyncio.sleep(0)
        fut = svc.submit(endpoint, request_id=request_id(request), alone=st.in_flight == 1,
                         client_key=client_key(request), **kwargs)
        result = fut.result() if fut.done() else await asyncio.wrap_future(fut)
    finally:
        st.in_flight -= 1
    return render(request, svc, result)


def parse_inputs(request: Request, endpoint: str, body: bytes) -> dict[str, Any]:
    """The service arguments of a request body, by its Content-Type."""
    ctype = content_type(request)
    if ctype == "application/json" or ctype.endswith("+json"):
        if endpoint == "generate":
            req = codecs.parse_json(schemas.GenerateRequest, body)
            return {"n": req.n, "seed": req.seed, "y": _y(req.y)}
        if endpoint == "decode":
            req = codecs.parse_json(schemas.DecodeRequest, body)
            return {"x": codecs.array_from_json(req.z, "z", integer=_discrete(request, endpoint)), "y": _y(req.y)}
        req = codecs.parse_json(schemas.ImagesRequest, body)
        if (req.x is None) == (req.png is None):
            raise codecs.invalid("x", "give exactly one of x (arrays) and png (base64 PNG images)",
                                 "both" if req.x is not None else "neither", "one of x, png")
        x = codecs.array_from_json(req.x, "x") if req.x is not None else codecs.images_from_png(req.png)
        return {"x": x, "y": _y(req.y)}
    if endpoint == "generate":
        raise _unsupported(ctype, "application/json")
    y = codecs.labels_from_query(request.query_params.get("y"))
    if ctype in codecs.NPY_TYPES:
        return {"x": codecs.array_from_npy(body), "y": y}
    if ctype == "image/png" and endpoint != "decode":
        return {"x": codecs.image_from_png(body, "body")[None], "y": y}
    raise _unsupported(ctype, "application/json, application/x-npy" + ("" if endpoint == "decode" else ", image/png"))


def _discrete(request: Request, endpoint: str) -> bool:
    name = request.path_params.get("name", "")
    svc = state(request).services.get(name)
    return bool(svc is not None and svc.deployment.model.discrete_latent)


def _y(y: list[Any] | None) -> np.ndarray | None:
    if y is None:
        return None
    return codecs.array_from_json(y, "y", integer=bool(y) and all(isinstance(v, int) for v in y))


def _unsupported(ctype: str, allowed: str) -> Problem:
    return Problem(415, "Unsupported media type", f"Content-Type {ctype!r} is not accepted here", "Content-Type",
                   ctype, allowed)


def render(request: Request, svc: ModelService, r: Result) -> Response:
    """The response body of ``r``: PNG when asked for and the endpoint returns images, else JSON."""
    headers = {"X-Model-Version": r.version, "X-Request-Id": r.request_id, "X-Model-Route": r.route}
    images = r.outputs.get("reconstruction", r.outputs.get("images"))
    if images is not None and codecs.wants_png(request.headers.get("accept")):
        return Response(codecs.png_from_images(images.numpy()), media_type="image/png", headers=headers)
    if r.endpoint in ("generate", "decode"):
        doc: dict[str, Any] = {"model": r.model, "version": r.version, "route": r.route,
                               "request_id": r.request_id, "images": images.tolist()}
        if r.endpoint == "generate":
            doc["seed"] = r.seed
        elif r.stats is not None and r.stats.latent_norm is not None:
            doc["latent_norm"] = r.stats.latent_norm.tolist()
        return json_response(doc, headers=headers)
    dep = svc.deployment
    profile = {"available": r.profile_available, "latent_norm_limit": svc.latent_norm_limit}
    if r.profile_available and dep.version == r.version:
        profile.update(dep.thresholds)
    s = r.stats
    results = s.images()
    lists = {k: v.tolist() for k, v in r.outputs.items()}
    latent = s.latent.tolist() if s.latent is not None else None
    codes = s.codes.tolist() if s.codes is not None else None
    for i, item in enumerate(results):
        if r.endpoint == "score":
            item["latent"] = latent[i] if latent is not None else None
            if codes is not None:
                item["codes"] = codes[i]
        else:
            for k, v in lists.items():
                item[k] = v[i]
    return json_response({"model": r.model, "version": r.version, "route": r.route, "request_id": r.request_id,
                          "profile": profile, "results": results}, headers=headers)


# -- health and metrics --------------------------------------------------------------------------------
ops = APIRouter(tags=["operations"])


@ops.get("/healthz", summary="Alive (the process answers)")
async def healthz(request: Request) -> dict[str, str]:
    label(request, "healthz")
    return {"status": "alive"}


@ops.get("/readyz", summary="Every model loaded and warmed up (503 otherwise)")
async def readyz(request: Request) -> Response:
    label(request, "readyz")
    services = state(request).services
    ready = all(s.ready for s in services.values())
    doc = {"ready": ready, "models": {n: (s.version if s.ready else None) for n, s in services.items()}}
    return json_response(doc, 200 if ready else 503)


@ops.get("/metrics", summary="Prometheus metrics (text exposition format)")
async def metrics(request: Request) -> Response:
    label(request, "metrics")
    m = state(request).metrics
    return Response(m.render(), media_type=m.content_type)


# -- admin (mounted only with a token) -------------------------------------------------------------------
class AliasMove(BaseModel):
    alias: str = Field(description="the alias to move, e.g. production")
    version: int = Field(ge=1, description="the version it should point to")
    reason: str = Field("", max_length=500, description="kept in the alias history")


def require_admin(token: str):
    want = token.encode()

    def check(request: Request) -> None:
        header = request.headers.get("authorization")
        if not header:
            raise Problem(401, "Unauthorized", "admin endpoints need 'Authorization: Bearer <token>'",
                          "Authorization", None, "Bearer <VAEKIT_ADMIN_TOKEN>", headers={"WWW-Authenticate": "Bearer"})
        scheme, _, given = header.partition(" ")
        # compare in constant time: the time taken must not tell how much of the token was right
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), want):
            raise Problem(403, "Forbidden", "the admin token is not valid", "Authorization", "Bearer <redacted>",
                          "the configured VAEKIT_ADMIN_TOKEN")

    return check


def admin_router(token: str) -> APIRouter:
    from fastapi import Depends

    router = APIRouter(prefix="/admin", tags=["admin"], dependencies=[Depends(require_admin(token))])

    @router.post("/models/{name}/reload", summary="Check the model's source now; swap when it moved",
                 responses={401: _P, 403: _P, 404: _P})
    async def reload(name: str, request: Request) -> Response:
        label(request, "admin_reload")
        svc = get_service(request, name)
        try:
            out = await asyncio.to_thread(svc.reload, True)
        except Exception as exc:  # the old version keeps serving; say why
            svc.last_reload_error = f"{type(exc).__name__}: {exc}"
            raise Problem(409, "Reload failed", f"could not load the new version: {exc}", "source",
                          svc.source.reference, "a loadable model") from None
        return json_response(out, headers={"X-Model-Version": svc.version})

    @router.post("/models/{name}/alias", summary="Move an alias in the registry (then reload)",
                 responses={401: _P, 403: _P, 404: _P, 409: _P}, openapi_extra=_body("AliasMove", binary=False))
    async def move_alias(name: str, request: Request) -> Response:
        label(request, "admin_alias")
        svc = get_service(request, name)
        move = codecs.parse_json(AliasMove, await read_body(request))
        mover = getattr(svc.source, "move_alias", None)
        if mover is None:
            raise Problem(409, "Not a registry model", f"model {name!r} is served from {svc.source.reference!r}, "
                          "not a registry reference; aliases live in the registry", "source",
                          svc.source.reference, "a registry reference such as name@alias")
        try:
            await asyncio.to_thread(mover, move.alias, move.version, move.reason)
        except LookupError as exc:  # RegistryLookupError: no such version
            raise Problem(404, "Unknown version", str(exc), "version", move.version,
                          "a registered, live version of this model") from None
        except VaekitError as exc:
            raise Problem(409, "Alias not moved", str(exc), "alias", move.alias, "a valid alias move") from None
        out = await asyncio.to_thread(svc.reload, True)
        return json_response(out, headers={"X-Model-Version": svc.version})

    return router


# -- the app ---------------------------------------------------------------------------------------------
class RequestMetrics:
    """Pure ASGI middleware: counts and times every HTTP request by endpoint, status and version."""

    def __init__(self, app: Any, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        done = False

        async def send_wrapper(message: dict) -> None:
            nonlocal done
            if message["type"] == "http.response.start" and not done:
                done = True
                version = ""
                for k, v in message.get("headers", ()):
                    if k == b"x-model-version":
                        version = v.decode("latin-1")
                self.metrics.observe_request(scope.get("vaekit.endpoint", "other"), message["status"], version,
                                             started)
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        except Exception:
            if not done:
                self.metrics.observe_request(scope.get("vaekit.endpoint", "other"), 500, "", started)
            raise


def _field_of(message: str) -> str:
    head = message.split(" ", 1)[0].strip(":,")
    return head if head in ("x", "y", "z", "n", "seed", "endpoint") else "body"


def freeze_heap() -> None:
    """Collect once, then move every live object into the collector's permanent generation
    (``gc.freeze``): the models, torch, FastAPI and pydantic objects loaded at start-up are never
    scanned again. A full collection of that heap stalls every thread for tens of milliseconds;
    with a request's allocations triggering one every few seconds, it was the p99 at 32 clients
    (MLP VAE, batching on: 157 ms -> 26 ms, 1,190 -> 1,760 req/s; docs/serving.md). Called again
    after a model swap (unfrozen first, so the old version's cycles are collected)."""
    gc.unfreeze()
    gc.collect()
    gc.freeze()


def _refreeze(previous: str | None, current: str) -> None:
    freeze_heap()


def create_app(services: ModelService | Sequence[ModelService], *, max_body_bytes: int = DEFAULT_MAX_BODY,
               admin_token: str | None = None, manage: bool = True, freeze_gc: bool = True) -> FastAPI:
    """The FastAPI app serving ``services`` (one ModelService or several, by name).

    ``max_body_bytes``: larger bodies get 413. ``admin_token``: the bearer token of the admin routes;
    None reads ``VAEKIT_ADMIN_TOKEN``; empty (or unset) leaves the admin routes unmounted.
    ``manage``: start the services when the app starts and close them when it stops.
    ``freeze_gc``: once the services are started, and after each model swap, :func:`freeze_heap`
    (a process-wide setting: turn it off when the app shares its process with other work).
    """
    if isinstance(services, ModelService):
        services = [services]
    by_name: dict[str, ModelService] = {}
    for s in services:
        if s.name in by_name:
            raise ConfigError(f"two services are named {s.name!r}; model names must be unique")
        by_name[s.name] = s
    if not by_name:
        raise ConfigError("create_app needs at least one ModelService")
    check_positive("max_body_bytes", max_body_bytes, integer=True)
    token = os.environ.get("VAEKIT_ADMIN_TOKEN", "") if admin_token is None else admin_token
    metrics_obj = Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if manage:
            for s in by_name.values():
                await asyncio.to_thread(s.start)
        for s in by_name.values():
            if s.ready:
                metrics_obj.watch(s)
        if freeze_gc:
            freeze_heap()
            for s in by_name.values():
                s.swap_listeners.append(_refreeze)
        yield
        if freeze_gc:
            for s in by_name.values():
                if _refreeze in s.swap_listeners:
                    s.swap_listeners.remove(_refreeze)
        if manage:
            for s in by_name.values():
                await asyncio.to_thread(s.close)

    app = FastAPI(title="vaekit serving", version=__version__, lifespan=lifespan,
                  description="VAE inference with per-request monitoring stats. Errors are "
                              "application/problem+json (RFC 9457). See docs/serving.md.")
    app.state.vaekit = ServingState(by_name, max_body_bytes, metrics_obj, admin_enabled=bool(token))
    for s in by_name.values():  # services started before the app (tests, the CLI) are watched at once
        if s.ready:
            metrics_obj.watch(s)
    app.include_router(v1)  # first: routes are matched in order, and these carry the traffic
    app.include_router(oip.router)
    app.include_router(ops)
    if token:
        app.include_router(admin_router(token))
    from vaekit.serving import dashboard  # /dashboard, only when a service writes to a record store
    dashboard.mount(app, by_name)
    app.add_middleware(RequestMetrics, metrics=metrics_obj)

    @app.exception_handler(Problem)
    async def on_problem(request: Request, exc: Problem) -> Response:
        svc = by_name.get(request.path_params.get("name", ""))
        if svc is not None and svc.ready:  # errors name the version that refused them, too
            exc.headers.setdefault("X-Model-Version", svc.version)
        return oip.error_response(exc) if request.url.path.startswith("/v2/") else problem_response(exc)

    @app.exception_handler(InputError)
    async def on_input_error(request: Request, exc: InputError) -> Response:
        if isinstance(exc, GateRejectedError):  # the gate's verdict per image, so a client can drop the bad ones
            bad = sorted({r for r in exc.reasons if r is not None})
            p = Problem(422, "Rejected by the data-quality gate", str(exc), "x", None,
                        "images that pass the gate (docs/monitoring.md)",
                        extra={"reason": bad[0] if len(bad) == 1 else ",".join(bad), "reasons": exc.reasons})
        else:
            p = Problem(422, "Invalid input", str(exc), _field_of(str(exc)), None, None)
        return await on_problem(request, p)

    @app.exception_handler(RequestValidationError)
    async def on_validation(request: Request, exc: RequestValidationError) -> Response:
        err = exc.errors()[0] if exc.errors() else {"loc": ("body",), "msg": "invalid request"}
        loc = ".".join(str(p) for p in err.get("loc", ())) or "body"
        return await on_problem(request, codecs.invalid(loc, f"{loc}: {err.get('msg')}", err.get("input")))

    @app.exception_handler(StarletteHTTPException)
    async def on_http(request: Request, exc: StarletteHTTPException) -> Response:
        titles = {404: "Not found", 405: "Method not allowed"}
        p = Problem(exc.status_code, titles.get(exc.status_code, "HTTP error"), str(exc.detail), "path",
                    request.url.path, "see /docs for the routes", headers=dict(exc.headers or {}))
        return await on_problem(request, p)

    @app.exception_handler(Exception)
    async def on_error(request: Request, exc: Exception) -> Response:
        log.exception("unhandled error on %s", request.url.path)
        return problem_response(Problem(500, "Internal error", f"{type(exc).__name__}: the server failed to "
                                        "handle this request; it has been logged", None))

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            doc = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
            comps = doc.setdefault("components", {}).setdefault("schemas", {})
            comps.update(schemas.component_schemas(schemas.ImagesRequest, schemas.DecodeRequest,
                                                   schemas.GenerateRequest, AliasMove, oip.InferRequest))
            app.openapi_schema = doc
        return app.openapi_schema

    app.openapi = openapi
    return app


def app_from_env() -> FastAPI:
    """An app built from ``VAEKIT_SERVE_CONFIG`` (JSON written by ``vaekit serve``): the factory
    each uvicorn worker process calls when ``--workers`` > 1."""
    cfg = json.loads(os.environ["VAEKIT_SERVE_CONFIG"])
    svc = ModelService(cfg["reference"], name=cfg.get("name"), registry=cfg.get("registry"),
                       device=cfg.get("device", "auto"),
                       max_batch_size=cfg.get("max_batch_size", 16), max_wait_ms=cfg.get("max_wait_ms", 2.0),
                       latent_norm_limit=cfg.get("latent_norm_limit", 5.0), max_images=cfg.get("max_images", 256),
                       poll_interval_s=cfg.get("poll_interval_s"), threads=cfg.get("threads"),
                       sink=_sink(cfg.get("records")), store=cfg.get("store"), gate=cfg.get("gate", True),
                       min_variance=cfg.get("min_variance", 0.01), hist_threshold=cfg.get("hist_threshold"),
                       routing=_routing(cfg), capture=cfg.get("capture_dir"),
                       capture_share=cfg.get("capture_share", 0.1), capture_options=cfg.get("capture_options"),
                       shadow_process=cfg.get("shadow_process", False))
    return create_app(svc, max_body_bytes=cfg.get("max_body_bytes", DEFAULT_MAX_BODY))


def _routing(cfg: dict[str, Any]):
    from vaekit.deploy.routing import RoutingPolicy

    return RoutingPolicy(canary_share=cfg.get("canary_share", 0.05), shadow_share=cfg.get("shadow_share", 1.0))


def _sink(path: str | None):
    if not path:
        return None
    from vaekit.serving.records import JsonlSink

    return JsonlSink(path)
