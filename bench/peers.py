"""Peers: the same job, N recipients to one Canvas, through the gateway and through the two
clients a team would otherwise reach for, each used as its README shows.

  gateway     one SendStream of N recipients in pre-encoded chunks of 500 (`harness.stream`);
              the gateway's CPU is its process tree's, read from /proc; the caller's own CPU
              (this process, pre-encoded chunks) is given beside it.
  braze-api   the npm package (bench/peers/node/send.js): `new Braze(url, key)`, then
              `await braze.canvas.trigger.send(body)` per call of 50, one after another: its
              README awaits each call and says nothing of running calls side by side.
  requests    a loop as edx-braze-client sends (bench/peers/requests_loop.py): one
              `requests.Session`, `data=json.dumps(body)`, one call of 50 after another.

Every peer posts to the same fake Braze (no latency, no real budget) as its own process, timed
from spawn to exit, its CPU the child's rusage (ru_utime + ru_stime, every thread). The same
script run with N = 0 (start the runtime, import the client, send nothing) is subtracted from
both, so that a peer is charged for the job and not for starting Node or Python, as neither
the gateway's start-up nor its caller's counts; that start-up is shown beside. Each peer
prints how many recipients got 201 (braze-api: a 2xx with a dispatch_id; it throws on
anything else), and that must be N. The gateway gets a warm-up stream first, as a running
service is warm. Machines here are noisy: the gateway and the peers take turns for
ROUNDS rounds, each figure is the median over them, and each ratio is peer/gateway of those
medians. With the fake answering at once a sequential loop loses little; against Braze's real
latency the calls in flight decide.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from importlib.metadata import version as installed_version
from pathlib import Path
from statistics import median

import harness
from harness import Figure

HERE = Path(__file__).resolve().parent / "peers"
NODE = HERE / "node"
MEASURE = "peers"
CHUNK = 500
ROUNDS = 3
LATENCY_MS = 20.0


@dataclass(frozen=True)
class PeerRun:
    seconds: float
    cpu_seconds: float
    sent: int


def node_deps() -> None:
    """`npm ci` from the lockfile when node_modules is missing or older than package*.json,
    as clients/node's `make deps` does (npm's own cache, ~/.npm)."""
    npm = shutil.which("npm")
    if npm is None or shutil.which("node") is None:
        raise RuntimeError("the peers benchmark needs node and npm on PATH")
    stamp = NODE / "node_modules" / ".package-lock.json"
    sources = (NODE / "package.json", NODE / "package-lock.json")
    if stamp.exists() and all(stamp.stat().st_mtime >= each.stat().st_mtime for each in sources):
        return
    subprocess.run([npm, "ci", "--ignore-scripts", "--no-audit", "--no-fund"], cwd=NODE, check=True)
    stamp.touch()


def braze_api_version() -> str:
    lock = json.loads((NODE / "package-lock.json").read_text())
    version: str = lock["packages"]["node_modules/braze-api"]["version"]
    return version


def run_peer(command: list[str], cwd: Path) -> PeerRun:
    """Run one peer to its end; wall time from spawn to exit, CPU from the child's rusage."""
    env = {**os.environ, "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"}
    began = time.perf_counter()
    process = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE)
    assert process.stdout is not None
    out = process.stdout.read()
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - began
    process.returncode = os.waitstatus_to_exitcode(status)
    process.stdout.close()
    if process.returncode != 0:
        raise RuntimeError(f"{command[:2]} exited {process.returncode}")
    sent = int(json.loads(out.decode().strip().splitlines()[-1])["sent"])
    return PeerRun(seconds, usage.ru_utime + usage.ru_stime, sent)


def peer_args(url: str, n: int) -> list[str]:
    return [url, harness.KEY, str(n), harness.CANVAS, json.dumps(harness.CONTEXT)]


Commands = dict[str, tuple[list[str], Path]]


@dataclass
class Round:
    """One job's figures over its rounds: the gateway's, and each peer's (seconds, us/recipient)."""

    gateway_seconds: list[float] = field(default_factory=list)
    gateway_cpu_us: list[float] = field(default_factory=list)
    caller_us: list[float] = field(default_factory=list)
    start_ups: dict[str, list[float]] = field(default_factory=dict)
    jobs: dict[str, list[tuple[float, float]]] = field(default_factory=dict)


async def job(commands: Commands, n: int, rounds: int, latency_ms: float = 0.0) -> Round:
    """The same job through the gateway and through each peer, `rounds` times, against one fake."""
    done = Round(start_ups={name: [] for name in commands}, jobs={name: [] for name in commands})
    async with harness.stack(latency_ms=latency_ms) as running:
        pid = running.gateway.pid
        await harness.stream(running.target, 100 if n < 10_000 else 1_000, CHUNK, pid)  # warm up
        chunks = harness.encoded_chunks(n, CHUNK)
        for _ in range(rounds):
            caller = time.process_time()
            gateway = await harness.stream(running.target, n, CHUNK, pid, chunks=chunks)
            done.caller_us.append((time.process_time() - caller) / n * 1e6)
            done.gateway_seconds.append(n / gateway.rate)
            done.gateway_cpu_us.append(gateway.gateway_cpu_us)
            for name, (command, cwd) in commands.items():
                start_up = await asyncio.to_thread(run_peer, [*command, *peer_args(running.url, 0)], cwd)
                run = await asyncio.to_thread(run_peer, [*command, *peer_args(running.url, n)], cwd)
                assert run.sent == n, (name, run.sent, n)
                done.start_ups[name].append(start_up.seconds)
                done.jobs[name].append(
                    (run.seconds - start_up.seconds, (run.cpu_seconds - start_up.cpu_seconds) / n * 1e6)
                )
    return done


async def measure(smoke: bool) -> list[Figure]:
    n = 1_000 if smoke else 100_000
    rounds = 1 if smoke else ROUNDS
    node_deps()
    commands: Commands = {
        f"braze-api {braze_api_version()} (Node, sequential await)": (["node", "send.js"], NODE),
        f"requests {installed_version('requests')} loop (sequential)": (
            [sys.executable, "requests_loop.py"],
            HERE,
        ),
    }
    instant = await job(commands, n, rounds)
    seconds, cpu_us = median(instant.gateway_seconds), median(instant.gateway_cpu_us)
    figures = [
        Figure(MEASURE, f"gateway SendStream, {n:,} recipients: time", seconds, "s"),
        Figure(MEASURE, "gateway CPU per recipient (its processes)", cpu_us, "us"),
        Figure(
            MEASURE,
            "gateway's caller CPU per recipient (pre-encoded chunks)",
            median(instant.caller_us),
            "us",
        ),
    ]
    for name in commands:
        peer_seconds = median(each[0] for each in instant.jobs[name])
        peer_us = median(each[1] for each in instant.jobs[name])
        figures += [
            Figure(MEASURE, f"{name}: start-up (N = 0), subtracted", median(instant.start_ups[name]), "s"),
            Figure(MEASURE, f"{name}: time", peer_seconds, "s"),
            Figure(MEASURE, f"{name}: CPU per recipient", peer_us, "us"),
            Figure(MEASURE, f"{name}: time / gateway's", peer_seconds / seconds, "x"),
            Figure(MEASURE, f"{name}: CPU / gateway's", peer_us / cpu_us, "x"),
        ]
    # With Braze's latency a sequential loop waits on every call; the gateway keeps 8 in flight.
    slow_n = 200 if smoke else 10_000
    slow = await job(commands, slow_n, 1, latency_ms=LATENCY_MS)
    slow_seconds = median(slow.gateway_seconds)
    figures.append(
        Figure(MEASURE, f"gateway, {slow_n:,} recipients, {LATENCY_MS:g} ms a call: time", slow_seconds, "s")
    )
    for name in commands:
        peer_seconds = median(each[0] for each in slow.jobs[name])
        figures.append(
            Figure(
                MEASURE,
                f"{name}, {LATENCY_MS:g} ms a call: time / gateway's",
                peer_seconds / slow_seconds,
                "x",
            )
        )
    return figures
