"""Local tooling: the process manager (``Stack``), ``flagship status``, benchmarks and the flagship demo.

Runs producers and starts worker processes; may import ``routing`` and the
worker's exit statuses, never the operations or the worker's Celery hooks.
"""
