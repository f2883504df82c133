"""The base class of an evaluation report part (see :mod:`vaekit.evaluation.parts`).

Kept apart from the parts themselves so that parts living elsewhere (the OOD part in
:mod:`vaekit.anomaly.report_part`) subclass it without importing the module that lists them all.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    from vaekit.evaluation.report import EvalContext


class SkippedError(Exception):
    """A part does not apply to this model or dataset; the message says why."""


def fmt(v: Any, digits: int = 3) -> str:
    return f"{v:.{digits}f}" if isinstance(v, float) else str(v)


class ReportPart:
    """One section of the report (see the module docstring)."""

    name: ClassVar[str] = ""
    title: ClassVar[str] = ""
    better: ClassVar[dict[str, str]] = {}  # headline key -> "lower" | "higher"

    def applies(self, ctx: EvalContext) -> str | None:
        """None when the part can run on ``ctx``; else the reason it cannot (recorded as skipped)."""
        return None

    def run(self, ctx: EvalContext) -> dict[str, Any]:
        raise NotImplementedError

    def render(self, r: dict[str, Any], report: dict[str, Any]) -> list[str]:
        """The Markdown lines of the section's body (the title is added by the report)."""
        return [f"{k}: {fmt(v)}" for k, v in self.headline(r).items()] + [""]

    def summary(self, r: dict[str, Any]) -> list[tuple[str, Any]]:
        """Rows for the terminal (label, value)."""
        return list(self.headline(r).items())

    def headline(self, r: dict[str, Any]) -> dict[str, float]:
        """The figures named in ``better``, those present in a result."""
        return {k: r[k] for k in self.better if k in r}
