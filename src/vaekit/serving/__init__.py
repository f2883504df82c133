"""Serving: ModelService (transport-free), the FastAPI app, micro-batching, records, the client.

    from vaekit.serving import ModelService, create_app, Client
    service = ModelService("runs/mnist/model")          # or a registry reference (name@alias)
    app = create_app(service)                           # uvicorn.run(app) or `vaekit serve`

See docs/serving.md.
"""

from vaekit.serving.app import create_app
from vaekit.serving.client import Client, ClientError
from vaekit.serving.records import CountingSink, JsonlSink, RecordSink, RequestRecord
from vaekit.serving.service import ModelService, Result, Stats
from vaekit.serving.sources import FolderSource, Loaded, ModelSource

__all__ = ["Client", "ClientError", "CountingSink", "FolderSource", "JsonlSink", "Loaded", "ModelService",
           "ModelSource", "RecordSink", "RequestRecord", "Result", "Stats", "create_app"]
