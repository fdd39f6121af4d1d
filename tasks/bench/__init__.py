"""Every ``flagship bench NAME`` benchmark, each against its baseline in the same run.

One module a benchmark (``routing``, ``lm``, ``batch``, ``payload``, ``scale``, ``broker``,
``chaos``, ``sandbox``, ``run_all``); ``helpers`` holds what they share (the fake LM server,
the plain Celery baseline, the broker meter and report, CPU meters, the docs tables).
May import anything in the project; nothing but ``tasks.cli`` (and tests) imports it.
"""
