"""The flagship producer: two triage sessions, an RLM session and an analytics session.

Run it with ``python examples/flagship.py`` (same options as ``flagship demo``).
It starts an embedded server and two workers per pool when none are running,
and stops what it started when it ends.
"""

from __future__ import annotations

import sys

from tasks.local.demo.main import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
