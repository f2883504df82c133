"""Monitoring: the data-quality gate, drift detectors (fit/score), alert rules and sinks."""
