"""The docs site builds strictly and its home page renders in headless Chromium (screenshot: docs/site-home.png).

CI builds the site first (``.ci/run``: ``python3 bootstrap.py docs``); this test builds it again into a
temporary folder, so the suite alone catches a broken page, and looks at what a reader sees.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from chromium import chromium_binary, run_chromium

ROOT = Path(__file__).resolve().parents[1]
SCREENSHOT = ROOT / "docs" / "site-home.png"


@pytest.mark.timeout(1200)
def test_docs_site_builds_strictly_and_its_home_page_renders(tmp_path: Path) -> None:
    site = tmp_path / "site"
    built = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)], cwd=ROOT,
                           capture_output=True, text=True, timeout=300,
                           env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert built.returncode == 0, built.stderr[-3000:]
    api = (site / "api" / "index.html").read_text()
    assert "Session" in api and "SessionWorkerUnavailable" in api and "acall" in api  # from the docstrings
    home_html = (site / "index.html").read_text()
    for page in ("Getting started", "Bring your own program", "Operations", "API reference"):
        assert page in home_html, f"the home page's navigation lacks {page!r}"
    binary = chromium_binary()
    home = (site / "index.html").as_uri()
    shot = tmp_path / "site-home.png"
    done = run_chromium(binary, "--allow-file-access-from-files", "--virtual-time-budget=3000", f"--screenshot={shot}",
                        home, window=(1280, 860))
    assert shot.exists() and shot.stat().st_size > 20_000, f"no screenshot, or a blank one: {done.stderr[-1000:]}"
    # The README's copy is refreshed on request (or when missing), so a test run leaves the tree clean.
    if os.environ.get("FLAGSHIP_UPDATE_DOCS") == "1" or not SCREENSHOT.exists():
        shutil.copyfile(shot, SCREENSHOT)
