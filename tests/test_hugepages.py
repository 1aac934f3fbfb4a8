"""The entry scripts' re-exec with glibc's huge-page tunable: the XLA:CPU program's large
temporary buffer faults in per 2 MiB page instead of per 4 KiB page, and the opt-out and a
user's own ``GLIBC_TUNABLES`` value are kept."""

import os
import sys

from train_helpers import run_cli

from recyclelora_jax import hugepages

# A jitted function whose 64 MiB temporary buffer XLA:CPU mallocs (and glibc maps) per call.
_CHILD = """
import os, resource
from recyclelora_jax import hugepages
hugepages.reexec_with_huge_pages()
import jax, jax.numpy as jnp
f = jax.jit(lambda x: jnp.sum(jnp.cos(jnp.sin(x) * 2.0) * x))
x = jnp.ones((64, 1024, 256))
f(x).block_until_ready()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(3):
    f(x).block_until_ready()
faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 3
print(os.environ.get("GLIBC_TUNABLES", "") or "-", faults)
"""


def _child(**env: str) -> tuple[str, float]:
    base = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", hugepages.OPT_OUT)}
    out = run_cli([sys.executable, "-c", _CHILD], env={**base, **env})
    assert out.returncode == 0, out.stderr
    tunables, faults = out.stdout.split()
    return tunables.strip("-"), float(faults)


def test_reexec_sets_the_tunable_and_cuts_the_page_faults():
    applied, huge = _child()
    opted_out, small = _child(**{hugepages.OPT_OUT: "0"})
    assert opted_out == ""
    if hugepages.huge_pages_env({}) is None:  # no glibc >= 2.35, or THP not on madvise
        assert applied == ""
        return
    assert applied == "glibc.malloc.hugetlb=1"
    assert small > 64 * 2**20 / 4096 / 2  # half the 4 KiB pages of the buffer, at least
    assert huge < small / 8


def test_users_tunables_are_kept():
    kept, _ = _child(GLIBC_TUNABLES="glibc.malloc.hugetlb=0")
    assert kept == "glibc.malloc.hugetlb=0"
    env = hugepages.huge_pages_env({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"})
    if env is not None:
        assert env["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"
