"""A small Python client of the serving API (httpx), used by the tests and the benchmark.

    with Client("http://127.0.0.1:8000") as c:
        out = c.score("mnist", x)                 # x: (B, C, H, W) array in [0, 1]
        out["version"], out["results"][0]["recon_nats"]
        png = c.reconstruct("mnist", x, png=True)

Arrays go as ``.npy`` bytes by default (``fmt="json"`` sends ``{data, shape}``). An error answer
raises :class:`ClientError` holding the status and the problem+json body.
"""

from __future__ import annotations

import io
from typing import Any

import httpx
import numpy as np

from vaekit.errors import VaekitError


class ClientError(VaekitError, RuntimeError):
    """The server answered an error: ``status`` and ``problem`` (the problem+json body, or the text)."""

    def __init__(self, status: int, problem: Any):
        self.status, self.problem = status, problem
        detail = problem.get("detail", problem) if isinstance(problem, dict) else problem
        super().__init__(f"HTTP {status}: {detail}")


def _array(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch tensor
        x = x.detach().cpu().numpy()
    return np.asarray(x)


class Client:
    """Calls one vaekit server. ``base_url`` like ``http://127.0.0.1:8000``; ``transport`` lets a test
    pass ``httpx.ASGITransport``/``MockTransport``; ``timeout`` seconds per call."""

    def __init__(self, base_url: str = "http://127.0.0.1:8000", *, timeout: float = 30.0,
                 transport: httpx.BaseTransport | None = None, headers: dict[str, str] | None = None):
        self.http = httpx.Client(base_url=base_url, timeout=timeout, transport=transport, headers=headers)

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- plumbing ------------------------------------------------------------------------------------
    def _check(self, r: httpx.Response) -> httpx.Response:
        if r.status_code >= 400:
            try:
                body = r.json()
            except ValueError:
                body = r.text
            raise ClientError(r.status_code, body)
        return r

    def _post_array(self, path: str, arr: Any, y: Any, fmt: str, field: str, png: bool) -> httpx.Response:
        a = _array(arr)
        headers = {"Accept": "image/png"} if png else {}
        if fmt == "npy":
            buf = io.BytesIO()
            np.save(buf, a, allow_pickle=False)
            params = {"y": ",".join(str(int(v)) for v in _array(y).ravel())} if y is not None else None
            headers["Content-Type"] = "application/x-npy"
            return self.http.post(path, content=buf.getvalue(), params=params, headers=headers)
        if fmt != "json":
            raise ValueError(f"fmt must be 'npy' or 'json', got {fmt!r}")
        body: dict[str, Any] = {field: {"data": a.ravel().tolist(), "shape": list(a.shape)}}
        if y is not None:
            body["y"] = _array(y).tolist()
        return self.http.post(path, json=body, headers=headers)

    # -- the vaekit API ------------------------------------------------------------------------------
    def score(self, model: str, x: Any, y: Any = None, fmt: str = "npy") -> dict[str, Any]:
        """Per-image stats: ``results[i]`` holds recon_mse, recon_nats, kl, latent_norm, latent, verdicts."""
        return self._check(self._post_array(f"/v1/models/{model}/score", x, y, fmt, "x", False)).json()

    def encode(self, model: str, x: Any, y: Any = None, fmt: str = "npy") -> dict[str, Any]:
        return self._check(self._post_array(f"/v1/models/{model}/encode", x, y, fmt, "x", False)).json()

    def reconstruct(self, model: str, x: Any, y: Any = None, fmt: str = "npy", png: bool = False) -> Any:
        """JSON (dict) or, with ``png``, the PNG bytes of the reconstructions side by side."""
        r = self._check(self._post_array(f"/v1/models/{model}/reconstruct", x, y, fmt, "x", png))
        return r.content if png else r.json()

    def decode(self, model: str, z: Any, y: Any = None, fmt: str = "json", png: bool = False) -> Any:
        r = self._check(self._post_array(f"/v1/models/{model}/decode", z, y, fmt, "z", png))
        return r.content if png else r.json()

    def generate(self, model: str, n: int = 1, seed: int | None = None, y: Any = None, png: bool = False) -> Any:
        body: dict[str, Any] = {"n": n}
        if seed is not None:
            body["seed"] = seed
        if y is not None:
            body["y"] = _array(y).tolist()
        r = self._check(self.http.post(f"/v1/models/{model}/generate", json=body,
                                       headers={"Accept": "image/png"} if png else None))
        return r.content if png else r.json()

    def models(self) -> list[dict[str, Any]]:
        return self._check(self.http.get("/v1/models")).json()["models"]

    def healthz(self) -> bool:
        return self.http.get("/healthz").status_code == 200

    def readyz(self) -> bool:
        return self.http.get("/readyz").status_code == 200

    def metrics(self) -> str:
        return self._check(self.http.get("/metrics")).text

    # -- Open Inference Protocol ---------------------------------------------------------------------
    def infer(self, model: str, inputs: list[dict[str, Any]], outputs: list[str] | None = None,
              id: str | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {"inputs": inputs}
        if outputs is not None:
            body["outputs"] = [{"name": n} for n in outputs]
        if id is not None:
            body["id"] = id
        return self._check(self.http.post(f"/v2/models/{model}/infer", json=body)).json()

    # -- admin ---------------------------------------------------------------------------------------
    def reload(self, model: str, token: str) -> dict[str, Any]:
        return self._check(self.http.post(f"/admin/models/{model}/reload",
                                          headers={"Authorization": f"Bearer {token}"})).json()
