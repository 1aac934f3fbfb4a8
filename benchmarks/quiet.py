"""What every CPU benchmark shares: the one-minute load average, checked before timing (on a
shared machine other jobs slow PyTorch's thread pool more than XLA's, so ratios taken under load
are not facts), and one way of timing repeated calls."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable

QUIET = 1.0  # below this one-minute load average a CPU timing is taken as quiet


def check_load(allow_loaded: bool) -> float:
    """Print the load average; exit unless it is quiet or ``allow_loaded`` (then flag it)."""
    load = os.getloadavg()[0]
    if load < QUIET:
        print(f"one-minute load average {load:.2f} (quiet)", file=sys.stderr)
        return load
    if not allow_loaded:
        sys.exit(
            f"one-minute load average {load:.2f} >= {QUIET}: the machine is busy and the timings "
            "would not be comparable; rerun when it is quiet, or pass --allow-loaded to record "
            "a run flagged LOADED"
        )
    print(
        f"LOADED: one-minute load average {load:.2f}; timings are not comparable", file=sys.stderr
    )
    return load


def time_calls(fn: Callable[[], object], repeats: int) -> tuple[float, list[float], object]:
    """(first call's seconds, compilation included; each of the next ``repeats`` calls' seconds;
    the last output). ``fn`` must block until its result is ready (``jax.block_until_ready``)."""
    start = time.perf_counter()
    out = fn()
    first = time.perf_counter() - start
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        runs.append(time.perf_counter() - start)
    return first, runs, out


def run_child(script: str, argv: list[str]) -> dict:
    """Run ``script argv`` in a fresh interpreter and parse its last stdout line as JSON: each
    framework in its own process, so neither holds the other's memory or thread pools. A
    failed child gives ``{"error": ...}`` (its stderr tail is echoed) instead of a row."""
    done = subprocess.run([sys.executable, script, *argv], capture_output=True, text=True)
    if done.returncode:
        sys.stderr.write(done.stderr[-4000:])
        return {"error": f"exit {done.returncode}"}
    return json.loads(done.stdout.strip().splitlines()[-1])
