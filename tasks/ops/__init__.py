"""The operations a producer may call (the allow-list's entries): sessions, DSPy modules, RLM, refs, analytics.

Each module registers its operations with :func:`tasks.worker.allowlist.operation`
on import. May import ``routing``, ``tasks.worker``, ``tasks.lm`` and
``tasks.sandbox``; never ``tasks.local``.
"""
