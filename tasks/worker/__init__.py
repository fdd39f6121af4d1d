"""The worker runtime: start-up hooks, per-worker state, turn-taking, the operation allow-list, the ref store.

May import ``routing``, ``tasks.lm`` and ``tasks.sandbox``; never ``tasks.ops`` or
``tasks.local`` (operations register themselves with :mod:`tasks.worker.allowlist`).
"""
