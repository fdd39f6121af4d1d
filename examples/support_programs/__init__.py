"""An example program package: what a team ships to its workers and lists in ``FLAGSHIP_PROGRAMS``.

Plain DSPy: modules with ``forward``, tools as functions with docstrings, a metric.
Workers import it at start (``FLAGSHIP_PROGRAMS=support_programs``, with this folder's
parent on ``PYTHONPATH`` or the package installed in the workers' environment);
producers name what is in it, e.g. ``session.program("support_programs.triage:SupportTriage")``.
"""
