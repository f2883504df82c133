"""Which version serves a request: production or canary, and whether a shadow sees it.

The choice is a pure function of a request key (the request id, or a client key so one client
always lands on one version) and a salt, through a keyed BLAKE2b hash: every service process,
on any machine, routes a key the same way without talking to the others, and changing the salt
(e.g. per canary) reshuffles who is in the canary.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Literal

from vaekit.errors import ConfigError, InputError, check_share, describe

Route = Literal["production", "canary"]
_SCALE = float(2**64)


def unit_hash(key: str, salt: str = "") -> float:
    """A uniform number in [0, 1) determined by ``key`` and ``salt`` (the same in every process)."""
    if not isinstance(key, str) or not key:
        raise InputError(f"the routing key must be a non-empty string, got {describe(key)}")
    digest = hashlib.blake2b(key.encode(), digest_size=8, key=salt.encode()[:64]).digest()
    return int.from_bytes(digest, "big") / _SCALE


@dataclass(frozen=True)
class RoutingPolicy:
    """Canary share (the brief's 5% by default), shadow share (every request by default), and the salt."""

    canary_share: float = 0.05  # fraction of keys served by the canary while one is set
    shadow_share: float = 1.0  # fraction of requests mirrored to the shadow while one is set
    salt: str = "vaekit"  # change it to reshuffle which keys fall in the canary

    def __post_init__(self) -> None:
        check_share("canary_share", self.canary_share)
        check_share("shadow_share", self.shadow_share)
        if not isinstance(self.salt, str):
            raise ConfigError(f"salt must be a string, got {describe(self.salt)}")

    def route(self, key: str, has_canary: bool = True) -> Route:
        """``canary`` for the ``canary_share`` of keys (when a canary is set), else ``production``."""
        if has_canary and unit_hash(key, self.salt) < self.canary_share:
            return "canary"
        return "production"

    def mirror(self, key: str) -> bool:
        """True when the request with this key is also sent to the shadow (an independent draw)."""
        return unit_hash(key, self.salt + "/shadow") < self.shadow_share
