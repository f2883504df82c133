"""What every router shares: the app state, service lookup, size-limited body reading, JSON output."""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request
from fastapi.responses import Response

from vaekit.serving.codecs import Problem
from vaekit.serving.metrics import Metrics
from vaekit.serving.service import ModelService

REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")


@dataclass
class ServingState:
    """Held on ``app.state.vaekit``: the services by name and the app's limits."""

    services: dict[str, ModelService]
    max_body_bytes: int
    metrics: Metrics
    admin_enabled: bool = False
    in_flight: int = 0  # model requests between entry and answer (event-loop thread only: no lock)
    extra: dict[str, Any] = field(default_factory=dict)


def state(request: Request) -> ServingState:
    return request.app.state.vaekit


def label(request: Request, endpoint: str) -> None:
    """Name the endpoint for the request metrics (a fixed set of labels, never the raw path)."""
    request.scope["vaekit.endpoint"] = endpoint


def get_service(request: Request, name: str) -> ModelService:
    services = state(request).services
    svc = services.get(name)
    if svc is None:
        raise Problem(404, "Unknown model", f"no model named {name[:64]!r} is served here", "name", name,
                      f"one of {sorted(services)}")
    if not svc.ready:
        raise Problem(503, "Model not ready", f"model {name!r} is still loading", "name", name, "retry later",
                      headers={"Retry-After": "1"})
    return svc


def request_id(request: Request) -> str | None:
    """The client's X-Request-Id when it is a sane token (else a fresh one is made)."""
    rid = request.headers.get("x-request-id")
    return rid if rid and REQUEST_ID_RE.match(rid) else None


def client_key(request: Request) -> str | None:
    """The ``X-Client-Key`` header (routes one client to one version while a canary is set), when sane."""
    key = request.headers.get("x-client-key")
    return key if key and len(key) <= 256 else None


async def read_body(request: Request) -> bytes:
    """The request body, refused with 413 as soon as it exceeds the app's limit (by its
    Content-Length when sent, else while it streams in)."""
    limit = state(request).max_body_bytes
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            size = int(declared)
        except ValueError:
            raise Problem(400, "Bad Content-Length", "Content-Length must be an integer", "Content-Length",
                          declared, "an integer") from None
        if size > limit:
            raise too_large(size, limit)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large(size, limit, streamed=True)
        chunks.append(chunk)
    return b"".join(chunks)


def too_large(size: int, limit: int, streamed: bool = False) -> Problem:
    what = f"more than {size} bytes" if streamed else f"{size} bytes"
    return Problem(413, "Body too large", f"the request body is {what}; the limit is {limit} bytes "
                   "(send fewer images per request)", "body", size, f"at most {limit} bytes")


def content_type(request: Request) -> str:
    return request.headers.get("content-type", "application/json").split(";")[0].strip().lower()


def _finite(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    return obj


def json_response(obj: Any, status: int = 200, headers: dict[str, str] | None = None,
                  media_type: str = "application/json") -> Response:
    """JSON without NaN/inf (a non-finite figure is null: JSON has no such numbers)."""
    try:
        text = json.dumps(obj, separators=(",", ":"), allow_nan=False)
    except ValueError:
        text = json.dumps(_finite(obj), separators=(",", ":"), allow_nan=False)
    return Response(text, status_code=status, headers=headers, media_type=media_type)


def problem_response(p: Problem) -> Response:
    return json_response(p.body(), p.status, p.headers, "application/problem+json")
