"""The sections of bench/families.py, one module each: ``run(args) -> dict`` and ``report(section)``."""
