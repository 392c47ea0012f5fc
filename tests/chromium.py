"""Debian's headless Chromium, as the page and report tests start it."""

from __future__ import annotations

from pathlib import Path

CHROMIUM = Path("/usr/bin/chromium")
"""Debian's ``chromium`` package; ``.ci/run`` installs it."""
ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
"""No sandbox (CI runs as root), no GPU, nothing fetched from the network."""
