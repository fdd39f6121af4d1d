"""Who is alive and what they hold: the worker registry, heartbeats, the reaper, session records, recipes.

A worker registers (``registry``) and keeps a heartbeat key alive (``heartbeat``, and the
out-of-process ``pulse``); the ``reaper`` declares a worker dead and moves what it held;
``sessions`` keeps session records and bindings, ``recipes`` how a ref is rebuilt;
``gauges``, ``status`` and ``task_view`` are what operators see.

May import ``routing.broker`` and the contracts; never ``routing.producer``, ``tasks`` or ``dspy``.
"""
