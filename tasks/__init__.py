"""The worker side and local tooling; may import ``routing``, never the other way round.

Rooms, each importing only the ones below it:

- ``app``, ``cli``: the Celery app (``celery -A tasks.app``) and the ``flagship`` command;
- ``bench``: every ``flagship bench`` benchmark and its helpers (nothing but the CLI imports it);
- ``local``: process manager, status view, metrics, the demo;
- ``ops``: the allow-listed operations (sessions, DSPy modules, RLM, refs, analytics);
- ``worker``: start-up hooks, per-worker state, turns, the allow-list, the ref store;
- ``lm`` and ``sandbox``: LM providers and the offline LM; Deno + Pyodide sandboxes.
"""
