"""Request and response bodies of the HTTP API (pydantic), and their OpenAPI schemas.

Request bodies are parsed and checked with ``Model.model_validate_json`` (one pass over the
bytes); unknown fields are refused, so a misspelt field is a 422 naming it, never ignored.
Responses are built as plain dicts for speed; the response models here document them.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TensorData(Strict):
    """A tensor as flat row-major values plus its shape: ``{"data": [...], "shape": [B, C, H, W]}``."""

    data: list[float] = Field(description="values in row-major (C) order")
    shape: list[int] = Field(description="dimensions; their product must equal len(data)", max_length=8)


NestedOrFlat = list[Any] | TensorData


class ImagesRequest(Strict):
    """Images for encode, reconstruct and score: exactly one of ``x`` (a nested list (B, C, H, W) or
    ``{data, shape}``) and ``png`` (one base64 PNG per image). ``y``: the condition of a conditional
    model: class labels (B,) or condition vectors (B, K)."""

    x: NestedOrFlat | None = Field(None, description="images (B, C, H, W), floats in [0, 1]")
    png: list[str] | None = Field(None, description="base64-encoded PNG files, one image each (8-bit, /255)")
    y: list[Any] | None = Field(None, description="condition: class labels (B,) or vectors (B, K)")


class DecodeRequest(Strict):
    """Latents to decode: ``z`` (B, D) floats (VQ-VAE: code indices (B, h, w) integers)."""

    z: NestedOrFlat = Field(description="latents (B, D); VQ-VAE: code indices (B, h, w)")
    y: list[Any] | None = Field(None, description="condition of a conditional model")


class GenerateRequest(Strict):
    """``n`` samples; the same ``seed`` gives the same images (a seed is drawn and returned when omitted)."""

    n: int = Field(1, ge=1, description="number of images")
    seed: int | None = Field(None, ge=0, lt=2**63, description="seed of this request's random stream")
    y: list[Any] | None = Field(None, description="condition of a conditional model (class labels (n,) or vectors)")


class Verdicts(BaseModel):
    recon_above_p99: bool | None = Field(description="recon_nats above the reference profile's p99; "
                                                     "null when the model has no profile")
    latent_norm_above_limit: bool | None = Field(description="latent_norm above the configured limit")


class ImageStats(BaseModel):
    recon_mse: float | None = Field(description="per-pixel MSE of the reconstruction (squared intensity)")
    recon_nats: float | None = Field(description="-log p(x | z = posterior mean), nats per image")
    kl: float | None = Field(description="KL(q(z|x) || p(z)) nats; null for families without an ELBO (VQ-VAE, AAE)")
    latent_norm: float | None = Field(description="norm of the posterior mean (VQ-VAE: mean over cells of ||z_e||)")
    verdicts: Verdicts


class ScoreItem(ImageStats):
    latent: list[float] | None = Field(description="posterior mean (D,); null for VQ-VAE")
    codes: list[list[int]] | None = Field(None, description="VQ-VAE code indices (h, w)")


class EncodeItem(ImageStats):
    mean: list[float] | None = Field(None, description="posterior mean (D,)")
    logvar: list[float] | None = Field(None, description="posterior log-variance (D,), Gaussian posteriors")
    codes: list[list[int]] | None = Field(None, description="VQ-VAE code indices (h, w)")


class ReconstructItem(ImageStats):
    reconstruction: list[Any] = Field(description="decoder mean at the posterior mean, (C, H, W)")


class ProfileInfo(BaseModel):
    available: bool = Field(description="false: the model has no reference profile, recon verdicts are null")
    recon_nats_p99: float | None = None
    latent_norm_limit: float


class Envelope(BaseModel):
    model: str
    version: str = Field(description="the model version that served this request")
    request_id: str
    profile: ProfileInfo


class ScoreResponse(Envelope):
    results: list[ScoreItem]


class EncodeResponse(Envelope):
    results: list[EncodeItem]


class ReconstructResponse(Envelope):
    results: list[ReconstructItem]


class ImagesResponse(BaseModel):
    model: str
    version: str
    request_id: str
    seed: int | None = Field(None, description="generate: the seed used")
    images: list[Any] = Field(description="images (B, C, H, W), floats in [0, 1]")
    latent_norm: list[float | None] | None = Field(None, description="decode: norm of each z")


class Problem(BaseModel):
    """RFC 9457 problem details (``application/problem+json``)."""

    type: str = "about:blank"
    title: str
    status: int
    detail: str
    field: str | None = Field(None, description="the request field at fault")
    received: Any = Field(None, description="what was received (cut when long)")
    allowed: str | None = Field(None, description="what is allowed")


def component_schemas(*models: type[BaseModel]) -> dict[str, Any]:
    """JSON schemas of ``models`` (and the models they use) as OpenAPI components."""
    out: dict[str, Any] = {}
    for m in models:
        schema = m.model_json_schema(ref_template="#/components/schemas/{model}")
        out.update(schema.pop("$defs", {}))
        out[m.__name__] = schema
    return out
