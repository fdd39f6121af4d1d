"""Deno + Pyodide code sandboxes for ``dspy.RLM``.

``settings`` (environment), ``paths`` (Deno binary, DENO_DIR, import map),
``process`` (spawning and killing Deno), ``drain`` (reading stderr as it comes),
``errors`` (failures per DSPy's interpreter protocol, typed), ``interpreter`` (``SandboxInterpreter``),
``pool`` (``SandboxPool`` of pre-started interpreters), ``probe`` (the one
self-check), ``setup`` (filling the Pyodide cache; ``python -m tasks.sandbox.setup``)
and ``bench``. Modules here may import ``routing`` and ``dspy``, but nothing else
from ``tasks``.
"""
