"""Operator tools: the process manager (``Stack``), ``flagship status``, Prometheus metrics and the flagship demo.

Runs producers and starts worker processes; may import ``routing`` and the worker's exit
statuses, never the operations, the worker's Celery hooks or ``tasks.bench``.
"""
