"""``GET /dashboard``: the monitoring dashboard (vaekit.monitoring.dashboard) of the models served.

Mounted by :func:`mount` only when at least one service writes its request records to a
:class:`~vaekit.monitoring.store.RecordStore` (the dashboard reads that store; without one there
is nothing to show). ``?model=NAME`` picks the model (default: the first with a store),
``?hours=H`` the period (default 24). Alias moves are drawn when the service follows a registry
reference. The page is rendered on a worker thread: its queries never block the event loop that
carries the inference traffic.
"""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import HTMLResponse, Response

from vaekit.serving.codecs import Problem
from vaekit.serving.deps import label


def mount(app: FastAPI, services: dict[str, Any]) -> bool:
    """Include the /dashboard route in ``app`` when a service of ``services`` (name -> ModelService)
    has a RecordStore sink; returns whether it did."""
    from vaekit.monitoring.store import RecordStore

    stores = {name: s.sink for name, s in services.items() if isinstance(s.sink, RecordStore)}
    if not stores:
        return False
    router = APIRouter(tags=["monitoring"])

    @router.get("/dashboard", summary="The monitoring dashboard (HTML, charts as inline SVG)",
                response_class=HTMLResponse)
    async def dashboard(request: Request, model: str | None = None, hours: float = 24.0) -> Response:
        from vaekit.monitoring.dashboard import render_dashboard

        label(request, "dashboard")
        name = model if model is not None else next(iter(stores))
        if name not in stores:
            raise Problem(404, "No dashboard", f"model {name[:64]!r} has no record store here", "model", name,
                          f"one of {sorted(stores)}")
        if not 0 < hours <= 24 * 366:
            raise Problem(422, "Invalid input", f"hours must be in (0, 8784], got {hours}", "hours", hours,
                          "(0, 8784]")
        source = services[name].source
        registry = getattr(source, "registry", None)  # a registry reference: its alias moves
        page = await asyncio.to_thread(render_dashboard, stores[name], name, registry, hours=hours)
        return HTMLResponse(page, headers={"Cache-Control": "no-store"})

    app.include_router(router)
    return True
