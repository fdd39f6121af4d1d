"""Every Python block of README.md and docs/*.md runs, in page order, against the suite's real stack.

A short test of our own rather than pytest-examples or pytest-markdown-docs, because:

- a page's blocks are one story (the asyncio block goes on with the tour's ``client`` and ``tickets``), so
  they share one namespace, in order; pytest-markdown-docs runs each fence alone unless every one is chained
  by hand, pytest-examples runs each alone too;
- the blocks use top-level ``await`` as ``python -m asyncio`` and Jupyter allow (compiled here with
  ``PyCF_ALLOW_TOP_LEVEL_AWAIT``), which neither plugin supports;
- they need the session-scoped ``stack`` fixture (a real Valkey, real workers), shared with the other tests;
- fences are read with markdown-it-py, already installed with rich: no new dependency, and no formatter
  (pytest-examples also lints and reformats the blocks with ruff/black, which the docs do not want).

Every fence names its language: ``python`` blocks run; ``bash``, ``text``, ``json`` ... are never run. A
Python block that must not run says so on the line before it: ``<!-- not run: <reason> -->``.
"""

from __future__ import annotations

import ast
import asyncio
import inspect
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from markdown_it import MarkdownIt

from routing import Client, Session
from tasks.local.stack import Stack

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
#: Languages a fence may name; only ``python`` runs.
LANGUAGES = {"python", "bash", "sh", "text", "json", "yaml", "toml", "ini", "dockerfile"}
NOT_RUN = re.compile(r"<!--\s*not run:[^>]*-->\s*$")


@dataclass(frozen=True)
class Block:
    page: Path
    line: int  # 1-based, the fence's first line
    language: str
    code: str
    runs: bool

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def blocks(page: Path) -> list[Block]:
    text = page.read_text()
    lines = text.splitlines()
    found = []
    for token in MarkdownIt().parse(text):
        if token.type != "fence" or token.map is None:
            continue
        start = token.map[0]
        language = token.info.split()[0] if token.info.strip() else ""
        before = next((line for line in reversed(lines[:start]) if line.strip()), "")
        runs = language == "python" and not NOT_RUN.search(before)
        found.append(Block(page, start + 1, language, token.content, runs))
    return found


def test_every_fence_names_its_language_so_what_does_not_run_is_marked() -> None:
    unmarked = [block.where for page in PAGES for block in blocks(page) if block.language not in LANGUAGES]
    assert not unmarked, f"fences without a known language (python runs; mark others bash/text/...): {unmarked}"
    assert any(block.runs for block in blocks(ROOT / "README.md")), "the README's example no longer runs"


def run_block(block: Block, namespace: dict[str, Any]) -> None:
    code = compile(block.code, block.where, "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT, dont_inherit=True)
    if code.co_flags & inspect.CO_COROUTINE:  # top-level await: run it as `python -m asyncio` would
        asyncio.run(eval(code, namespace))
    else:
        exec(code, namespace)


def close_what_it_opened(namespace: dict[str, Any]) -> None:
    """Sessions first (frees their objects on the shared workers), then clients."""
    for kind in (Session, Client):
        for value in namespace.values():
            if isinstance(value, kind):
                value.close()


@pytest.mark.parametrize("page", [p for p in PAGES if any(b.runs for b in blocks(p))],
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_python_blocks_run_as_written_in_page_order(page: Path, stack: Stack, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)  # as a reader runs them: from the repository, where examples/ is
    namespace: dict[str, Any] = {"__name__": "__main__"}
    ran = 0
    try:
        for block in blocks(page):
            if block.runs:
                run_block(block, namespace)
                ran += 1
    finally:
        close_what_it_opened(namespace)
    assert ran and "client" in namespace  # every runnable page opens its own client, as a reader would
