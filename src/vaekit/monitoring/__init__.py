"""Monitoring: the data-quality gate, drift detectors (fit/score), alert rules and sinks.

    gate = QualityGate(model.input_shape).fit(reference_images, held_out_images)
    reference = reference_from_profile(read_profile(model_dir))       # or reference_from_arrays(...)
    detectors = {k: d.fit(reference) for k, d in default_detectors().items()}
    results = [d.score(window) for d in detectors.values()]          # window: a Window of served requests
    events = evaluate_rules(default_rules(), results, state, version="3", window=(start, end))
    state = state.apply(events); LogSink().emit(events)

docs/monitoring.md lists every rule, its default and its measured false-alarm rate.
"""

from vaekit.monitoring.alerts import Alert, AlertState, Rule, default_rules, evaluate_rules
from vaekit.monitoring.detectors import (
    Detector,
    DetectorResult,
    ExceedanceDetector,
    GateCounts,
    GateRejectionDetector,
    InputStatsDetector,
    KSDetector,
    MMDDetector,
    MomentsDetector,
    RollingMeanDetector,
    default_detectors,
    latent_norm_detector,
    recon_error_detector,
)
from vaekit.monitoring.gate import GateResult, QualityGate, Verdict, check_batch
from vaekit.monitoring.reference import (
    Reference,
    Window,
    reference_from_arrays,
    reference_from_profile,
    window_from_inspection,
)

__all__ = [
    "Alert", "AlertState", "Detector", "DetectorResult", "ExceedanceDetector", "GateCounts", "GateRejectionDetector",
    "GateResult", "InputStatsDetector", "KSDetector", "MMDDetector", "MomentsDetector", "QualityGate", "Reference",
    "RollingMeanDetector", "Rule", "Verdict", "Window", "check_batch", "default_detectors", "default_rules",
    "evaluate_rules", "latent_norm_detector", "recon_error_detector", "reference_from_arrays", "reference_from_profile",
    "window_from_inspection",
]
