"""`build.load_backbone_weights` from a weights file: the reference's 14 → 16 px patch and
37 → 32 position-grid conversion, the config's dtypes and output blocks; and the random backbone's
LayerScale start value (``model.backbone.layerscale_init``), which a weights file overrides."""

import jax.numpy as jnp
import numpy as np
import torch
from _torch_dinov2 import official_vit_14px

from recyclelora_jax import build
from recyclelora_jax.config import base_config, smoke


def _bicubic(x: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    t = torch.nn.functional.interpolate(torch.from_numpy(x), size=size, mode="bicubic")
    return t.numpy()


def _config(weights, **backbone):
    cfg = base_config()
    cfg.model.backbone.update(weights=str(weights), out_indices=(0,), **backbone)
    return cfg


def test_weights_file_is_converted_to_16_px_and_a_32_grid(tmp_path):
    sd = official_vit_14px()
    torch.save(sd, tmp_path / "vit.pth")
    model, params = build.load_backbone_weights(_config(tmp_path / "vit.pth"), 0)
    arch = model.arch
    assert (arch.embed_dim, arch.depth, arch.patch_size, arch.pos_grid) == (64, 1, 16, 32)
    assert model.out_indices == (0,)
    kernel = sd["patch_embed.proj.weight"].numpy()
    want = _bicubic(kernel, (16, 16)).transpose(2, 3, 1, 0)  # torch OIHW -> flax HWIO
    np.testing.assert_allclose(params["patch_embed"]["kernel"], want, atol=1e-5, rtol=0)
    pos = sd["pos_embed"].numpy()
    grid = pos[:, 1:].reshape(1, 37, 37, 64).transpose(0, 3, 1, 2)
    want = _bicubic(grid, (32, 32)).transpose(0, 2, 3, 1).reshape(1, -1, 64)
    np.testing.assert_allclose(params["pos_embed"][:, 1:], want, atol=1e-5, rtol=0)
    np.testing.assert_array_equal(params["pos_embed"][:, :1], pos[:, :1])  # CLS kept
    qkv = sd["blocks.0.attn.qkv.weight"].numpy().T
    np.testing.assert_array_equal(params["blocks_0"]["attn"]["qkv"]["kernel"], qkv)
    features = model.apply({"params": params}, jnp.zeros((1, 64, 64, 3)))["features"]
    assert [f.shape for f in features] == [(1, 4, 4, 64)]  # 64 px / 16 px patches


def test_native_geometry_is_kept_and_storage_dtype_applied(tmp_path):
    sd = official_vit_14px()
    torch.save(sd, tmp_path / "vit.pth")
    cfg = _config(tmp_path / "vit.pth", patch_size=14, pos_grid=37, param_dtype="bfloat16")
    model, params = build.load_backbone_weights(cfg, 0)
    assert (model.arch.patch_size, model.arch.pos_grid) == (14, 37)
    kernel = params["patch_embed"]["kernel"]
    assert kernel.dtype == jnp.bfloat16
    want = sd["patch_embed.proj.weight"].numpy().transpose(2, 3, 1, 0)
    np.testing.assert_array_equal(np.asarray(kernel, np.float32), jnp.asarray(want, jnp.bfloat16))


def _layerscales(params) -> set[float]:
    return {
        float(v)
        for name, block in params.items()
        if name.startswith("blocks_")
        for ls in ("ls1", "ls2")
        for v in np.unique(np.asarray(block[ls]["gamma"]))
    }


def test_layerscale_init_sets_a_random_backbone_and_a_weights_file_brings_its_own(tmp_path):
    cfg = smoke(base_config())
    assert cfg.model.backbone.layerscale_init == 1.0  # the tiny random backbone: blocks matter
    assert _layerscales(build.load_backbone_weights(cfg, 0)[1]) == {1.0}
    cfg.model.backbone.layerscale_init = 1e-5  # the recipe configs' value, DINOv2's
    assert base_config().model.backbone.layerscale_init == 1e-5
    assert _layerscales(build.load_backbone_weights(cfg, 0)[1]) == {np.float32(1e-5).item()}
    sd = official_vit_14px()
    torch.save(sd, tmp_path / "vit.pth")
    _, params = build.load_backbone_weights(_config(tmp_path / "vit.pth", layerscale_init=1.0), 0)
    np.testing.assert_array_equal(params["blocks_0"]["ls1"]["gamma"], sd["blocks.0.ls1.gamma"])
