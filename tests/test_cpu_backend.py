"""The XLA:CPU setting the package makes at import: convolutions leave YNNPACK (whose gradient
kernels made the Mask2Former head 2.2x slower than PyTorch's on CPU), a user's choice is kept."""

import os
import re
import sys

import jax
import jax.numpy as jnp
from train_helpers import run_cli

import recyclelora_jax  # noqa: F401  (the import is what sets the flag)

_SHOW_FLAGS = "import os, recyclelora_jax; print(os.environ.get('XLA_FLAGS', ''))"


def _flags_after_import(xla_flags: str | None) -> str:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    if xla_flags is not None:
        env["XLA_FLAGS"] = xla_flags
    out = run_cli([sys.executable, "-c", _SHOW_FLAGS], env=env)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_import_appends_the_flag_and_keeps_the_users():
    flag = "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution"
    assert _flags_after_import(None) == flag
    assert _flags_after_import("--xla_force_host_platform_device_count=2").split() == [
        "--xla_force_host_platform_device_count=2",
        flag,
    ]
    own = "--xla_cpu_experimental_ynn_fusion_type=individual_convolution"
    assert _flags_after_import(own) == own


def test_convolution_gradients_compile_outside_ynnpack():
    """The head's stride-4 convolutions' weight gradient, as XLA:CPU compiles it in this process
    (the flag was set before JAX started its CPU backend)."""
    x = jnp.zeros((2, 16, 16, 128))  # large enough that YNNPACK would claim the convolutions
    w = jnp.zeros((3, 3, 128, 128))

    def loss(w, x):
        dims = ("NHWC", "HWIO", "NHWC")
        y = jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=dims)
        return jnp.sum(y**2)

    hlo = jax.jit(jax.grad(loss)).lower(w, x).compile().as_text()
    assert "convolution(" in hlo
    assert not _ynn_convolutions(hlo)


def _ynn_convolutions(hlo: str) -> list[str]:
    """Names of the YNNPACK fusions in compiled HLO text whose computation holds a convolution."""
    called = re.findall(r"calls=(%[\w.-]+).*__ynn_fusion", hlo)
    bodies = {
        m.group(1): m.group(2)
        for m in re.finditer(r"^(%[\w.-]+) .*?\{\n(.*?)^\}", hlo, re.M | re.S)
    }
    return [name for name in called if "convolution(" in bodies.get(name, "")]
