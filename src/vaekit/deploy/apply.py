"""The one place that acts on a canary :class:`~vaekit.deploy.policy.Decision`: it moves aliases in
the registry, with the decision's reasons and evidence in the alias history.

* ``rollback``: the canary alias is removed, so the canary stops serving at once (the services
  following ``name@canary`` see no canary and route everything to production);
* ``promote``: ``production`` moves to the canary's version, then the canary alias is removed;
* ``hold``: nothing is written.

Every move is one registry transaction whose history entry carries ``reason`` (the decision's
reasons, joined) and ``evidence`` (the decision's figures). Services that follow an alias reload
from the registry; nothing here talks to a service.
"""

from __future__ import annotations

from typing import Any

from vaekit.deploy.policy import Decision
from vaekit.errors import InputError, describe

PRODUCTION, CANARY, SHADOW = "production", "canary", "shadow"


def start_canary(registry: Any, name: str, version: int, reason: str, *, actor: str | None = None,
                 alias: str = CANARY) -> Any:
    """Point ``name@canary`` at ``version`` (recorded with ``reason``); returns the history entry."""
    return registry.set_alias(name, alias, version, reason, actor=actor)


def apply_decision(registry: Any, name: str, decision: Decision, *, actor: str | None = None,
                   canary: str = CANARY, production: str = PRODUCTION) -> list[Any]:
    """Carry out ``decision`` for ``name``'s canary; returns the alias-history entries written (none for hold)."""
    if not isinstance(decision, Decision):
        raise InputError(f"decision must be a vaekit.deploy.Decision, got {describe(decision)}")
    if decision.action == "hold":
        return []
    evidence = {"decision": decision.action, **decision.evidence}
    reason = f"canary {decision.action}: " + "; ".join(decision.reasons)
    aliases = registry.aliases(name)
    if canary not in aliases:
        raise InputError(f"{name} has no {canary!r} alias to {decision.action} (aliases: {sorted(aliases)})")
    events = []
    if decision.action == "promote":
        moved = registry.set_alias(name, production, aliases[canary], reason, actor=actor, evidence=evidence)
        if moved is not None:
            events.append(moved)
    events.append(registry.remove_alias(name, canary, reason, actor=actor, evidence=evidence))
    return events
