"""Test-wide settings: 8 simulated CPU devices (set before JAX starts) and exact float32 matmuls;
fixtures shared by several test files."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax
import pytest

jax.config.update("jax_default_matmul_precision", "highest")


@pytest.fixture(scope="session")
def mesh8() -> jax.sharding.Mesh:
    """The 8 simulated CPU devices as one ``data`` axis (the sharded-batch tests)."""
    return jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
