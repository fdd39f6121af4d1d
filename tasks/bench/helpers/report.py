"""Benchmark tables in ``docs/benchmarks.md``: each benchmark owns the text between its two markers.

``<!-- bench:NAME -->`` ... ``<!-- /bench:NAME -->``; ``flagship bench NAME --write-docs``
(and ``flagship bench all``) replace what is between them with the latest run.
"""

from __future__ import annotations

import re
from pathlib import Path

DOC = Path(__file__).resolve().parents[3] / "docs" / "benchmarks.md"


def markdown_table(header: list[str], rows: list[list[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def update_section(name: str, markdown: str, doc: Path = DOC) -> None:
    """Replace the section ``name`` (appended at the end when the markers are missing)."""
    start, end = f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->"
    block = f"{start}\n{markdown.strip()}\n{end}"
    text = doc.read_text() if doc.exists() else "# Benchmarks\n"
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"
    doc.write_text(text)
