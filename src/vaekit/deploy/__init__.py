"""The deployment loop: routing (canary, shadow), canary analysis (a pure ``decide``), latent comparison
of two versions, and (with the registry) the one module that applies decisions.

Layering: deploy sits above registry, monitoring and serving; it closes the loop through data (an alias in
the registry, records in the store), never by being imported from below.
"""

from vaekit.deploy.apply import apply_decision, start_canary
from vaekit.deploy.compare import compare_latents, linear_cka, procrustes_disparity
from vaekit.deploy.policy import CanaryPolicy, Decision, Window, decide
from vaekit.deploy.routing import RoutingPolicy, unit_hash

__all__ = ["CanaryPolicy", "Decision", "RoutingPolicy", "Window", "apply_decision", "compare_latents", "decide",
           "linear_cka", "procrustes_disparity", "start_canary", "unit_hash"]
