"""Turning request bodies into arrays, and arrays into response bodies, with clear 4xx problems.

Inputs: JSON (nested lists, or ``{data, shape}``), base64 PNG per image, a raw PNG body, and
``.npy`` bytes (``application/x-npy``). 8-bit inputs (PNG, uint8 npy) are divided by 255. Every
fault raises :class:`Problem`, which the app answers as ``application/problem+json`` naming the
field, the value received and what is allowed.
"""

from __future__ import annotations

import base64
import binascii
import io
import math
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel, ValidationError

from vaekit.errors import describe

MAX_DIMS = 8
NPY_TYPES = ("application/x-npy", "application/npy", "application/octet-stream")


class Problem(Exception):  # noqa: N818 - an RFC 9457 "problem", raised to answer one
    """An HTTP problem (RFC 9457): ``status``, a short ``title``, a ``detail`` sentence and, where
    known, the ``field`` at fault, the value ``received`` and what is ``allowed``."""

    def __init__(self, status: int, title: str, detail: str, field: str | None = None, received: Any = None,
                 allowed: str | None = None, headers: dict[str, str] | None = None,
                 extra: dict[str, Any] | None = None):
        super().__init__(detail)
        self.status, self.title, self.detail = status, title, detail
        self.field, self.received, self.allowed, self.headers = field, received, allowed, headers or {}
        self.extra = extra or {}  # further members of the problem body (RFC 9457 extensions)

    def body(self) -> dict[str, Any]:
        out: dict[str, Any] = {"type": "about:blank", "title": self.title, "status": self.status,
                               "detail": self.detail}
        if self.field is not None:
            out["field"] = self.field
        if self.received is not None:
            out["received"] = _jsonable(self.received)
        if self.allowed is not None:
            out["allowed"] = self.allowed
        out.update(self.extra)
        return out


def invalid(field: str, detail: str, received: Any = None, allowed: str | None = None, status: int = 422) -> Problem:
    return Problem(status, "Invalid input", detail, field, received, allowed)


def _jsonable(v: Any) -> Any:
    if isinstance(v, str | int | bool) or v is None:
        return v if not isinstance(v, str) or len(v) <= 120 else v[:117] + "..."
    if isinstance(v, float):
        return v if math.isfinite(v) else str(v)
    return describe(v)


def parse_json(model: type[BaseModel], body: bytes) -> Any:
    """``body`` checked against ``model``; a 422 naming the first faulty field otherwise (400 for bytes
    that are not JSON at all)."""
    try:
        return model.model_validate_json(body)
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
        first = errors[0]
        if first["type"] in ("json_invalid", "json_type"):
            raise Problem(400, "Malformed JSON", f"the body is not valid JSON: {first['msg']}", "body",
                          body[:60].decode("utf-8", "replace"), "a JSON object") from None
        loc = ".".join(str(p) for p in first["loc"]) or "body"
        more = f" (and {len(errors) - 1} more problems)" if len(errors) > 1 else ""
        raise invalid(loc, f"{loc}: {first['msg']}{more}", first.get("input"), _allowed(model, first)) from None


def _allowed(model: type[BaseModel], err: dict[str, Any]) -> str:
    if err["type"] == "extra_forbidden":
        return f"fields {sorted(model.model_fields)}"
    return err["msg"].removeprefix("Input should be ")  # "greater than or equal to 1", "a valid integer", ...


def array_from_json(value: Any, field: str, integer: bool = False) -> np.ndarray:
    """A nested list, or a ``TensorData``-like object with ``data`` and ``shape``, as an array:
    float32 (or int64 when ``integer``)."""
    dtype = np.int64 if integer else np.float32
    if hasattr(value, "data") and hasattr(value, "shape"):
        shape, data = list(value.shape), value.data
        if any(d < 0 for d in shape) or len(shape) > MAX_DIMS:
            raise invalid(f"{field}.shape", f"{field}.shape must be up to {MAX_DIMS} non-negative sizes, "
                          f"got {shape}", shape, f"up to {MAX_DIMS} sizes >= 0")
        if math.prod(shape) != len(data):
            raise invalid(f"{field}.shape", f"{field}.shape {shape} holds {math.prod(shape)} values but "
                          f"{field}.data has {len(data)}", shape, f"a shape whose product is {len(data)}")
        try:
            arr = np.asarray(data, dtype=np.float64)
        except OverflowError:
            raise invalid(f"{field}.data", f"{field}.data holds numbers beyond float64", None, "numbers") from None
        return _cast(arr, field, integer).reshape(shape)
    try:
        arr = np.asarray(value)
    except OverflowError:
        raise invalid(field, f"{field} holds integers beyond 64 bits", None, "numbers") from None
    except ValueError:
        raise invalid(field, f"{field} must be a rectangular nested list of numbers (rows of equal length)",
                      value, "a nested list (B, ...) with rows of equal length") from None
    if arr.ndim > MAX_DIMS or arr.dtype.kind not in "biuf" or arr.dtype.kind == "b":
        raise invalid(field, f"{field} must be a rectangular nested list of numbers, got elements of type "
                      f"{arr.dtype} (ragged rows, strings or booleans)", value, "numbers in equal-length rows")
    return _cast(arr, field, integer).astype(dtype, copy=False)


def _cast(arr: np.ndarray, field: str, integer: bool) -> np.ndarray:
    if not integer:
        with np.errstate(over="ignore"):  # beyond float32: inf, which the model's input check names
            return arr.astype(np.float32, copy=False)
    if arr.dtype.kind == "f" and not (np.all(np.isfinite(arr)) and np.all(arr == np.round(arr))):
        raise invalid(field, f"{field} must hold integers", None, "integers")
    if arr.size and np.abs(arr).max() >= 2**62:
        raise invalid(field, f"{field} holds integers too large for int64", None, "integers below 2**62")
    return arr.astype(np.int64)


def images_from_png(items: list[str], field: str = "png") -> np.ndarray:
    """Base64 PNG strings, one image each, as float32 (B, C, H, W) in [0, 1]."""
    if not items:
        raise invalid(field, f"{field} must hold at least one image", items, "a non-empty list of base64 PNGs")
    arrays = []
    for i, text in enumerate(items):
        try:
            raw = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            raise invalid(f"{field}[{i}]", f"{field}[{i}] is not valid base64", text, "base64 of a PNG file") from None
        arrays.append(image_from_png(raw, f"{field}[{i}]"))
    shapes = {a.shape for a in arrays}
    if len(shapes) > 1:
        raise invalid(field, f"{field} images differ in size: {sorted(shapes)}", None, "images of one size")
    return np.stack(arrays)


def image_from_png(raw: bytes, field: str) -> np.ndarray:
    """One PNG file as float32 (C, H, W) in [0, 1]: grey images give C = 1, colour C = 3."""
    try:
        with Image.open(io.BytesIO(raw)) as im:
            if im.format != "PNG":
                raise invalid(field, f"{field} must be a PNG file, got {im.format}", im.format, "PNG")
            w, h = im.size
            if w * h > 4096 * 4096:  # the body limit caps the file; this caps what it decompresses to
                raise invalid(field, f"{field} is {w}x{h} pixels, too large", f"{w}x{h}", "at most 4096x4096")
            grey = im.mode in ("1", "L", "LA", "I", "I;16", "P") and not (im.mode == "P" and _palette_rgb(im))
            arr = np.asarray(im.convert("L" if grey else "RGB"), dtype=np.float32) / 255.0
    except Problem:
        raise
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise invalid(field, f"{field} could not be decoded as a PNG: {exc}", None, "a PNG file") from None
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


def _palette_rgb(im: Image.Image) -> bool:
    pal = im.getpalette() or []
    return any(pal[i] != pal[i + 1] or pal[i] != pal[i + 2] for i in range(0, len(pal) - 2, 3))


_NPY_HEADERS: dict[bytes, tuple[tuple[int, ...], bool, np.dtype]] = {}  # header bytes -> parsed (bounded)
_NPY_HEADER_CACHE = 64


def _npy_header(body: bytes) -> tuple[tuple[int, ...], bool, np.dtype, int] | None:
    """(shape, fortran_order, dtype, data offset) of a .npy body, None where it is not plainly one.

    numpy parses every header with ``ast.literal_eval``: a tenth of a batch-1 request's CPU in the
    service. Clients send the same few headers over and over, so a parsed header is kept by its bytes."""
    if body[:6] != np.lib.format.MAGIC_PREFIX or len(body) < 10 or body[6] not in (1, 2):  # version 3 (utf-8): np.load
        return None
    size = 2 if body[6] == 1 else 4
    start = 8 + size
    end = start + int.from_bytes(body[8:start], "little")
    header = body[start:end]
    info = _NPY_HEADERS.get(header)
    if info is None:
        fp = io.BytesIO(body)
        fp.seek(8)  # past the magic and the version read above
        read = np.lib.format.read_array_header_1_0 if size == 2 else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read(fp)  # numpy's own checks (size limit, keys, dtype)
        info = (tuple(shape), bool(fortran), dtype)
        if len(header) <= 1024 and len(_NPY_HEADERS) < _NPY_HEADER_CACHE:
            _NPY_HEADERS[header] = info
    return (*info, end)


def _load_npy(body: bytes) -> np.ndarray:
    head = _npy_header(body)
    if head is None:
        return np.load(io.BytesIO(body), allow_pickle=False)
    shape, fortran, dtype, offset = head
    if dtype.hasobject:
        raise ValueError("Object arrays cannot be loaded when allow_pickle=False")
    count = math.prod(shape)
    if len(body) - offset < count * dtype.itemsize:
        raise ValueError(f"the array data holds {len(body) - offset} bytes, its header says "
                         f"{count} x {dtype.itemsize}")
    flat = np.frombuffer(body, dtype=dtype, count=count, offset=offset)
    # a copy, as np.load makes: a view would keep the request body alive and be read-only
    return flat.reshape(shape[::-1]).transpose().copy() if fortran else flat.reshape(shape).copy()


def array_from_npy(body: bytes, field: str = "body") -> np.ndarray:
    """``.npy`` bytes (``numpy.save``) as an array: float32/float64 kept as float32, uint8 divided by
    255, integers kept (codes, labels). Object arrays are refused (no pickle)."""
    try:
        arr = _load_npy(body)
    except ValueError as exc:
        raise invalid(field, f"the {field} is not a readable .npy array: {exc}", None,
                      "numpy.save output, numeric dtype, no pickled objects") from None
    except (OSError, EOFError, TypeError, SyntaxError) as exc:
        raise invalid(field, f"the {field} is not a readable .npy array: {exc}", None, "numpy.save output") from None
    if not isinstance(arr, np.ndarray) or arr.dtype.kind not in "fiu" or arr.ndim > MAX_DIMS:
        kind = getattr(arr, "dtype", type(arr).__name__)
        raise invalid(field, f"the .npy array must be numeric with at most {MAX_DIMS} dims, got {kind}",
                      str(kind), "float32, float64, uint8 or integers")
    if arr.dtype == np.uint8:
        return arr.astype(np.float32) / 255.0
    if arr.dtype.kind == "f":
        return arr.astype(np.float32, copy=False)
    return arr.astype(np.int64)


def labels_from_query(text: str | None, field: str = "y") -> list[Any] | None:
    """``?y=3,1,4``: comma-separated class labels (for bodies that carry only the images)."""
    if text is None:
        return None
    try:
        return [int(v) for v in text.split(",")]
    except ValueError:
        raise invalid(field, f"query parameter {field} must be comma-separated integers", text,
                      "e.g. y=3,1,4") from None


def png_from_images(images: np.ndarray) -> bytes:
    """Images (B, C, H, W) in [0, 1] as one PNG, side by side (8-bit, rounded)."""
    b, c, h, w = images.shape
    strip = np.clip(images, 0.0, 1.0).transpose(2, 0, 3, 1).reshape(h, b * w, c)  # (H, B*W, C)
    arr = np.round(strip * 255.0).astype(np.uint8)
    im = Image.fromarray(arr[..., 0] if c == 1 else arr, mode="L" if c == 1 else "RGB")
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def wants_png(accept: str | None) -> bool:
    """True when the Accept header prefers image/png over JSON."""
    if not accept:
        return False
    best = None
    for part in accept.split(","):
        kind, _, params = part.strip().partition(";")
        q = 1.0
        for p in params.split(";"):
            k, _, v = p.strip().partition("=")
            if k == "q":
                try:
                    q = float(v)
                except ValueError:
                    q = 0.0
        kind = kind.strip().lower()
        if kind in ("image/png", "application/json", "*/*", "image/*", "application/*"):
            score = (q, kind == "image/png")
            if best is None or score > best[0]:
                best = (score, kind)
    return best is not None and best[1] in ("image/png", "image/*") and best[0][0] > 0
