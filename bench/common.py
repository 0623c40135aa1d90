"""What every benchmark script shares: run metadata (git sha, package versions) and its --help layout.

No JAX import: the driver of ``python -m bench`` uses it too.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import subprocess
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def git_sha() -> str | None:
    """HEAD of the repository, with ``+dirty`` for uncommitted changes; None outside a checkout."""
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT, capture_output=True, text=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return sha + ("+dirty" if dirty else "")


def package_version(dist: str) -> str | None:
    """The installed version of a distribution (e.g. ``"jaxlib"``), or None where it is missing."""
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def utc_now() -> str:
    """The current time, ISO 8601 in UTC, to the second."""
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


def add_git_sha_flag(parser: argparse.ArgumentParser) -> None:
    """``--git-sha``: what to record where the working tree is not a git checkout (a copied tree)."""
    parser.add_argument(
        "--git-sha", default=None, help="git sha recorded with the results (default: git rev-parse HEAD, +dirty)"
    )


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keeps the description's and epilog's line breaks; appends ``(default: X)`` to every flag's help
    unless the help already states its default (or the flag is required)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text or action.required or action.default is argparse.SUPPRESS:
            return text
        return super()._get_help_string(action)
