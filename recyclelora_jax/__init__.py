"""RecycleLoRA in JAX/Flax. ``load_mmseg_checkpoint`` reads a checkpoint of the official code.

Importing the package tells XLA:CPU to run convolutions with its own (Eigen) kernels instead of
YNNPACK's: jaxlib 0.10's YNNPACK convolution gradients run the Mask2Former head's stride-4
convolutions at 1-5 GFLOP/s on a 2-core CPU, which made the head 2.2x slower than PyTorch's
(``docs/BENCHMARKS.md``, training step). Only convolutions change (YNNPACK keeps the dots); TPU and
GPU programs are unaffected. XLA reads the flag when JAX starts its CPU backend, so it takes effect
in every process that imports the package before its first computation (``train.py``, ``eval.py``,
the tests' ``conftest.py``), and it never overrides a ``--xla_cpu_experimental_ynn_fusion_type``
the user set in ``XLA_FLAGS``.
"""

import os
from typing import Any

CPU_CONVOLUTION_FLAG = "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution"
if CPU_CONVOLUTION_FLAG.split("=")[0] not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {CPU_CONVOLUTION_FLAG}".strip()


def __getattr__(name: str) -> Any:
    # Lazy, so that importing a light submodule (``recyclelora_jax.pth``) does not load JAX.
    if name == "load_mmseg_checkpoint":
        from recyclelora_jax.official import load_mmseg_checkpoint

        return load_mmseg_checkpoint
    raise AttributeError(f"module 'recyclelora_jax' has no attribute {name!r}")
