"""Facts about this process that the gateway reports or sizes itself by: the build it runs
(`git_commit`) and its limit on open files (`open_file_limit`)."""

from __future__ import annotations

import resource
import subprocess
from collections.abc import Mapping
from pathlib import Path


def open_file_limit() -> int | None:
    """This process's soft limit on open files; None when unlimited."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return None if soft == resource.RLIM_INFINITY else soft


def git_commit(environ: Mapping[str, str]) -> str:
    """The commit this build came from: CANVAS_GATEWAY_GIT_COMMIT (set in the image), else the
    checkout the code runs from, else `unknown`."""
    if environ.get("CANVAS_GATEWAY_GIT_COMMIT"):
        return environ["CANVAS_GATEWAY_GIT_COMMIT"]
    try:
        found = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"],  # noqa: S607 - git from PATH, no input
            cwd=Path(__file__).parent,
            capture_output=True,
            text=True,
            timeout=2,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return found.stdout.strip() or "unknown"
