"""prefixkit.benchmarks: measurements too long for the tests, also as `pt-bench`."""

from __future__ import annotations

import subprocess
from pathlib import Path


def commit() -> str | None:
    """The checkout's commit, which a report records beside its command; '+' after it where
    tracked files have changes; None outside a git checkout."""
    root = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head + ("+" if dirty else "")
