"""`make bench`: every measure of the gateway's cost, in one run, written to BENCHMARKS.md.

Each measure is a module of this folder with `async def measure(smoke: bool) -> list[Figure]`;
they run one after another (never side by side: they would share the cores), each starting
its own fake Braze and gateway processes on 127.0.0.1. `--smoke` runs them all at tiny sizes
and asserts no figure: `make test` uses it so that the harness cannot rot.

    .venv/bin/python bench/suite.py                    # everything, writes BENCHMARKS.md
    .venv/bin/python bench/suite.py --only unary_overhead --out -
    .venv/bin/python bench/suite.py --smoke --out -
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import importlib
import os
import platform
import shlex
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

from canvas_gateway_server.process import git_commit
from harness import Figure

MEASURES = (
    "stream_throughput",
    "breakdown",
    "workers",
    "client_connections",
    "unary_overhead",
    "memory",
    "budget_use",
    "lanes",
    "peers",
    "observability_cost",
    "replicas",
    "redis_cost",
    "results_cost",
)


def machine() -> str:
    model = "unknown CPU"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    cores = len(os.sched_getaffinity(0))
    memory = int(Path("/proc/meminfo").read_text().split()[1]) / 1024 / 1024
    return f"{model}, {cores} cores, {memory:.0f} GiB, {platform.system()} {platform.release()}"


def commit() -> str:
    """The checkout measured, and whether it had changes not committed (figures of a dirty tree
    cannot be compared with a later run)."""
    status = ["git", "status", "--porcelain", "--untracked-files=no"]
    dirty = subprocess.run(status, capture_output=True, text=True, check=False)
    return git_commit(os.environ) + (" (with changes not committed)" if dirty.stdout.strip() else "")


def table(figures: Sequence[Figure], seconds: float, argv: Sequence[str]) -> str:
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        f"- machine: {machine()}",
        f"- Python {platform.python_version()}; date {now}; the whole suite took {seconds / 60:.1f} min",
        f"- commit: {commit()}",
        f"- command: `{shlex.join(['.venv/bin/python', 'bench/suite.py', *argv])}`",
        "",
        "| measure | figure | value | target |",
        "|---|---|---:|---|",
    ]
    lines += [f"| {f.measure} | {f.name} | {f.text()} | {f.target} |" for f in figures]
    return "\n".join(lines) + "\n"


START = "<!-- bench:start -->"
END = "<!-- bench:end -->"


def write(path: Path, text: str) -> None:
    """Replace the generated block of `path` (between the markers), keeping the prose around it."""
    old = path.read_text() if path.exists() else f"# Benchmarks\n\n{START}\n{END}\n"
    head, _, rest = old.partition(START)
    _, _, tail = rest.partition(END)
    path.write_text(f"{head}{START}\n{text}{END}{tail}")


async def main(argv: Sequence[str]) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--smoke", action="store_true", help="tiny sizes; check the harness runs")
    parser.add_argument("--only", action="append", choices=MEASURES, help="run just these (repeatable)")
    parser.add_argument("--out", default="BENCHMARKS.md", help="where the table goes; - for stdout")
    args = parser.parse_args(argv)

    figures: list[Figure] = []
    began = time.monotonic()
    for name in args.only or MEASURES:
        module = importlib.import_module(name)
        measure: Callable[[bool], Awaitable[list[Figure]]] = module.measure
        print(f"== {name}", file=sys.stderr, flush=True)
        found = await measure(args.smoke)
        for figure in found:
            print(f"   {figure.name:<60} {figure.text():>16}  {figure.target}", file=sys.stderr, flush=True)
        figures.extend(found)
    text = table(figures, time.monotonic() - began, argv)
    if args.out == "-":
        print(text)
    else:
        write(Path(args.out), text)
        print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1:]))
