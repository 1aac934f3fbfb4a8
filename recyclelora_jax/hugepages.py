"""Transparent huge pages for glibc's large allocations, set by re-executing the entry script.

XLA:CPU mallocs each program's temporary buffer (GiBs in the training step) and its outputs from
its worker threads. glibc serves requests above its mmap threshold (at most 32 MiB) with a
fresh mmap and unmaps it on free, so every call faults in and zeroes every 4 KiB page again:
the ViT-S step's parts at 512 px spent 13 of their 23 s in the kernel (``docs/BENCHMARKS.md``).
Turning mmap off (``M_MMAP_MAX=0``) does not help: a thread's arena still maps what its 64 MiB
heaps cannot hold. glibc's ``glibc.malloc.hugetlb=1`` tunable madvises those maps as
transparent huge pages, 512x fewer faults; glibc reads it only from ``GLIBC_TUNABLES`` at
process start (there is no ``mallopt`` for it), hence one re-exec of the interpreter with the
same command line.

Nothing happens off Linux/glibc >= 2.35, unless the kernel's THP mode is ``madvise`` (with
``always`` every map gets huge pages anyway, with ``never`` none can), where ``GLIBC_TUNABLES``
already names the tunable (the user's value is kept), or with ``RECYCLELORA_HUGEPAGES=0``.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping

TUNABLE = "glibc.malloc.hugetlb"
OPT_OUT = "RECYCLELORA_HUGEPAGES"
_THP = "/sys/kernel/mm/transparent_hugepage/enabled"


def _glibc_version() -> tuple[int, ...]:
    """glibc's (major, minor), or () for another C library."""
    try:
        name, version = (os.confstr("CS_GNU_LIBC_VERSION") or "").split()
    except (ValueError, OSError):
        return ()
    return tuple(int(part) for part in version.split(".")[:2]) if name == "glibc" else ()


def _thp_on_madvise() -> bool:
    try:
        with open(_THP) as f:
            return "[madvise]" in f.read()
    except OSError:
        return False


def huge_pages_env(environ: Mapping[str, str]) -> dict[str, str] | None:
    """``environ`` with the tunable added to ``GLIBC_TUNABLES``, or None when nothing changes."""
    tunables = environ.get("GLIBC_TUNABLES", "")
    if (
        environ.get(OPT_OUT) == "0"
        or TUNABLE in tunables
        or not sys.platform.startswith("linux")
        or _glibc_version() < (2, 35)
        or not _thp_on_madvise()
    ):
        return None
    return {**environ, "GLIBC_TUNABLES": ":".join(filter(None, (tunables, f"{TUNABLE}=1")))}


def reexec_with_huge_pages() -> None:
    """Replace this process (same pid, same command line) by one with the tunable set, if it is
    to change. Call it first thing in an entry script, before JAX has allocated anything."""
    env = huge_pages_env(os.environ)
    if env is None:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
