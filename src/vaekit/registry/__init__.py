"""The model registry: immutable numbered versions with lineage, aliases with an append-only history, rollback.

    from vaekit.registry import ModelRegistry
    reg = ModelRegistry("sqlite:///registry/registry.db")      # or "postgresql://user@host/db", artifact_root=...
    v = reg.register("runs/vae", "mnist-vae", alias="production", reason="first model")
    model = reg.load("mnist-vae@production")
    reg.rollback("mnist-vae", "production", reason="canary regressed")

See docs/registry.md.
"""

from vaekit.registry.core import DEFAULT_URI, AliasEvent, ModelRegistry, ModelSummary, Version
from vaekit.registry.refs import Ref, parse_ref

__all__ = ["DEFAULT_URI", "AliasEvent", "ModelRegistry", "ModelSummary", "Ref", "Version", "parse_ref"]
