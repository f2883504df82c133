"""The ``vaekit`` command line: one module per verb."""
