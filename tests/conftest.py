"""Test-wide settings: 8 simulated CPU devices (set before JAX starts), the package's XLA:CPU
convolution flag (imported before any backend starts, so this process and its ``train.py`` /
``eval.py`` subprocesses compile alike), exact float32 matmuls and one on-disk compilation cache
for the whole session; fixtures shared by several test files.

The tiny model is the package's: ``ARCHS["tiny"]`` and ``config.TINY_MASK2FORMER`` (the smoke
config's and the demo's); a test that needs another shape derives it with ``dataclasses.replace``
and says why."""

import os
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# Most of the suite's time is XLA compiling the same tiny programs again: in other tests, and in
# the train.py / eval.py subprocesses, which inherit these variables. One cache for the session
# (a fresh directory, removed at exit, unless JAX_COMPILATION_CACHE_DIR names one) compiles each
# program once; every program is cached, however fast it compiled.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _CACHE = tempfile.TemporaryDirectory(prefix="jax-cache-")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _CACHE.name
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

# The package appends its XLA:CPU convolution flag to XLA_FLAGS on import (it owns the value);
# imported first, before anything can start a JAX backend that would miss it.
import recyclelora_jax  # noqa: F401, I001

import jax
import numpy as np
import pytest
from train_helpers import make_data

from recyclelora_jax.models.dinov2 import ARCHS, DinoV2

jax.config.update("jax_default_matmul_precision", "highest")


@pytest.fixture(scope="session")
def mesh8() -> jax.sharding.Mesh:
    """The 8 simulated CPU devices as one ``data`` axis (the sharded-batch tests)."""
    return jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))


@pytest.fixture(scope="session")
def data(tmp_path_factory) -> dict:
    """The training tests' synthetic datasets (``train_helpers.make_data``), written once; tests
    read them, never write into them."""
    return make_data(tmp_path_factory.mktemp("synthetic"))


@pytest.fixture(scope="session")
def tiny_backbone() -> tuple[dict, np.ndarray]:
    """(params, images): the tiny backbone with random weights and LayerScale 1 (so that every
    block matters), and two random 32-px images; tests read them, never write into them."""
    images = np.random.default_rng(0).standard_normal((2, 32, 32, 3)).astype(np.float32)
    model = DinoV2(ARCHS["tiny"], out_indices=(), layerscale_init=1.0)
    params = jax.jit(model.init)(jax.random.key(0), images)["params"]  # jit: faster than eager
    return params, images
