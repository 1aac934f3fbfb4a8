"""`torch_interpolate` / `resize_bilinear` against `torch.nn.functional.interpolate`.

Unit-variance inputs; tolerance 3e-5: both sides compute sampling positions in float32, and for
non-integer scale factors torch's own float32 result differs from its float64 one by ~1.5e-5.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from recyclelora_jax.models.resize import resize_bilinear, torch_interpolate

TOL = 3e-5
X = np.random.default_rng(0).standard_normal((2, 37, 37, 5)).astype(np.float32)


def _torch(x_nhwc: np.ndarray, **kwargs) -> np.ndarray:
    t = torch.from_numpy(x_nhwc).permute(0, 3, 1, 2)
    out = torch.nn.functional.interpolate(t, align_corners=False, **kwargs)
    return out.permute(0, 2, 3, 1).numpy()


FORMS = [
    {"size": (32, 32)},  # the reference's 37 -> 32 position-embedding conversion
    {"size": (5, 3)},  # strong, anisotropic downsampling
    {"size": (80, 50)},
    {"scale_factor": ((5 + 0.1) / 37, (3 + 0.1) / 37)},  # DINOv2's interpolate_offset rule
    {"scale_factor": ((40 + 0.1) / 37, (73 + 0.1) / 37)},
]


@pytest.mark.parametrize("antialias", [False, True])
@pytest.mark.parametrize("form", FORMS)
def test_bicubic_matches_torch(form, antialias):
    got = torch_interpolate(jnp.asarray(X), (1, 2), antialias=antialias, **form)
    want = _torch(X, mode="bicubic", antialias=antialias, **form)
    assert got.shape == want.shape
    np.testing.assert_allclose(np.asarray(got), want, atol=TOL, rtol=0)


@pytest.mark.parametrize("size", [(32, 32), (80, 50), (9, 74)])
def test_bilinear_matches_torch(size):
    np.testing.assert_allclose(
        np.asarray(resize_bilinear(jnp.asarray(X), size)),
        _torch(X, mode="bilinear", size=size),
        atol=TOL,
        rtol=0,
    )


def test_any_spatial_axes_and_dtype_kept():
    """A flax conv kernel (H, W, I, O) resized over axes (0, 1), as the 14 -> 16 conversion."""
    kernel = X[0, :14, :14, :4].reshape(14, 14, 2, 2)
    got = torch_interpolate(jnp.asarray(kernel), (0, 1), size=(16, 16))
    want = _torch(kernel.reshape(1, 14, 14, 4), mode="bicubic", size=(16, 16))
    np.testing.assert_allclose(np.asarray(got), want.reshape(16, 16, 2, 2), atol=TOL, rtol=0)
    low = torch_interpolate(jnp.asarray(kernel, jnp.bfloat16), (0, 1), size=(16, 16))
    assert low.dtype == jnp.bfloat16  # computed in float32, returned in the input dtype
    same = jnp.asarray(X)
    assert torch_interpolate(same, (1, 2), size=(37, 37)) is same


def test_bad_arguments():
    with pytest.raises(ValueError, match="exactly one of size or scale_factor"):
        torch_interpolate(jnp.asarray(X), (1, 2))
    with pytest.raises(ValueError, match="mode must be one of"):
        torch_interpolate(jnp.asarray(X), (1, 2), size=(4, 4), mode="nearest")
