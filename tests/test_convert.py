"""Checkpoint import: every naming gives the same tree, strict errors name the key, the 512-px
conversion matches `torch.nn.functional.interpolate`, converted files round-trip, and the
torch-free `.pth` reader agrees with `torch.save`."""

from __future__ import annotations

import dataclasses
import json

import jax
import numpy as np
import pytest
import safetensors.torch
import torch
from _torch_dinov2 import (
    fair_state_dict,
    official_vit_14px,
    reference_model,
    save_hub,
    save_transformers5,
)

from recyclelora_jax.convert import load_dinov2, main, resize_patch_and_pos, save_converted
from recyclelora_jax.models.dinov2 import ARCHS
from recyclelora_jax.pth import read_pth


def _flat(params):
    return {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree.leaves_with_path(params)}


def _assert_same_tree(a, b):
    fa, fb = _flat(a), _flat(b)
    assert fa.keys() == fb.keys()
    for k in fa:
        np.testing.assert_array_equal(fa[k], fb[k], err_msg=k)


@pytest.mark.parametrize("kind", ["plain", "swiglu", "registers"])
def test_all_namings_give_the_identical_tree(tmp_path, kind):
    ref = reference_model(kind)
    hub_model, hub = load_dinov2(save_hub(ref, tmp_path / "hub"))
    _, v5 = load_dinov2(save_transformers5(ref, tmp_path / "v5"))
    torch.save(fair_state_dict(ref), tmp_path / "fair.pth")
    fair_model, fair = load_dinov2(tmp_path / "fair.pth")
    _assert_same_tree(hub, v5)
    _assert_same_tree(hub, fair)
    assert fair_model == hub_model  # same arch (heads = 128 / 64) and interpolation defaults
    assert hub["blocks_0"]["attn"]["qkv"]["kernel"].shape == (128, 384)
    registers = kind == "registers"
    assert hub_model.arch.num_register_tokens == (4 if registers else 0)
    assert (hub_model.interpolate_offset, hub_model.interpolate_antialias) == (
        (0.0, True) if registers else (0.1, False)
    )


def _hub_tensors(tmp_path):
    path = save_hub(reference_model(), tmp_path / "src")
    return {k: v.clone() for k, v in safetensors.torch.load_file(str(path)).items()}


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            lambda t: t.pop("encoder.layer.1.attention.attention.key.bias"),
            "missing keys .*key.bias",
        ),
        (lambda t: t.update(extra=torch.zeros(2)), r"unexpected keys \['extra'\]"),
        (
            lambda t: t.update({"encoder.layer.2.mlp.fc2.weight": torch.zeros(128, 500)}),
            r"encoder.layer.2.mlp.fc2.weight: \(128, 500\) \(expected \(128, 512\)\)",
        ),
        (lambda t: t.pop("embeddings.cls_token"), "not a DINOv2 checkpoint"),
    ],
)
def test_bad_checkpoints_name_the_key(tmp_path, edit, message):
    tensors = _hub_tensors(tmp_path)
    edit(tensors)
    path = tmp_path / "bad.safetensors"
    safetensors.torch.save_file(tensors, str(path))
    with pytest.raises(ValueError, match=message):
        load_dinov2(path)


def test_config_json_gives_heads_and_is_cross_checked(tmp_path):
    path = save_hub(reference_model(), tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "num_attention_heads": 4}))
    assert load_dinov2(tmp_path)[0].arch.num_heads == 4  # a folder holding model.safetensors
    (tmp_path / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 5}))
    with pytest.raises(ValueError, match="num_hidden_layers=5 but the tensors give 3"):
        load_dinov2(path)


def test_converted_file_round_trips(tmp_path):
    model, params = load_dinov2(
        save_hub(reference_model("registers"), tmp_path), out_indices=(1,), interpolate_offset=0.1
    )
    save_converted(tmp_path / "conv.safetensors", model, params)
    again_model, again = load_dinov2(tmp_path / "conv.safetensors", out_indices=(1,))
    assert again_model == model  # arch and interpolation settings travel with the file
    _assert_same_tree(params, again)


def _torch_bicubic(x: np.ndarray, size) -> np.ndarray:
    t = torch.nn.functional.interpolate(
        torch.from_numpy(x), size=size, mode="bicubic", align_corners=False
    )
    return t.numpy()


def test_resize_for_512_matches_torch():
    """14x14 -> 16x16 kernel and 37x37 -> 32x32 positions, CLS position kept, within 1e-5.

    Values have std 0.1, above the spread of the pretrained tensors; both sides round sampling
    positions in float32, which leaves relative differences of ~3e-6."""
    rng = np.random.default_rng(0)
    arch = dataclasses.replace(ARCHS["tiny"], patch_size=14, pos_grid=37)  # DINOv2's geometry
    c = arch.embed_dim
    kernel = 0.1 * rng.standard_normal((c, 3, 14, 14)).astype(np.float32)  # torch (O, I, H, W)
    pos = 0.1 * rng.standard_normal((1, 1 + 37 * 37, c)).astype(np.float32)
    params = {"patch_embed": {"kernel": kernel.transpose(2, 3, 1, 0), "bias": 0}, "pos_embed": pos}
    new_arch, new = resize_patch_and_pos(arch, params, 16, 32)
    assert (new_arch.patch_size, new_arch.pos_grid) == (16, 32)
    want_kernel = _torch_bicubic(kernel, (16, 16)).transpose(2, 3, 1, 0)
    np.testing.assert_allclose(new["patch_embed"]["kernel"], want_kernel, atol=1e-5, rtol=0)
    grid = pos[:, 1:].reshape(1, 37, 37, c).transpose(0, 3, 1, 2)
    want_grid = _torch_bicubic(grid, (32, 32)).transpose(0, 2, 3, 1).reshape(1, -1, c)
    np.testing.assert_allclose(new["pos_embed"][:, 1:], want_grid, atol=1e-5, rtol=0)
    np.testing.assert_array_equal(new["pos_embed"][:, :1], pos[:, :1])


def test_cli_converts_official_pth_for_512(tmp_path, capsys):
    """`python -m recyclelora_jax.convert SRC DST --patch-size 16 --pos-grid 32` on an official
    layout with the real 14-px patch and 37x37 grid (width 64, one block)."""
    sd = official_vit_14px()
    src, dst = tmp_path / "vit.pth", tmp_path / "vit512.safetensors"
    torch.save(sd, src)
    main([str(src), str(dst), "--patch-size", "16", "--pos-grid", "32"])
    assert "vit512.safetensors" in capsys.readouterr().out
    model, params = load_dinov2(tmp_path / "vit512.safetensors")
    assert (model.arch.patch_size, model.arch.pos_grid, model.arch.depth) == (16, 32, 1)
    assert model.interpolate_offset == 0.1
    want = _torch_bicubic(sd["patch_embed.proj.weight"].numpy(), (16, 16)).transpose(2, 3, 1, 0)
    np.testing.assert_allclose(params["patch_embed"]["kernel"], want, atol=1e-5, rtol=0)
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "--pos-grid" in capsys.readouterr().out


def test_pth_reader_matches_torch_save(tmp_path):
    base = torch.randn(6, 5)
    state = {
        "f32": torch.randn(3, 4),
        "f16": torch.randn(2, 3).half(),
        "bf16": torch.randn(4, 2).bfloat16(),
        "transposed": base.t(),  # non-contiguous view
        "slice": base[2:4, 1:],  # offset into a shared storage
        "scalar": torch.tensor(3.5),
        "int64": torch.arange(5),
        "param": torch.nn.Parameter(torch.randn(2)),
        "empty": torch.zeros(0, 3),
    }
    torch.save(state, tmp_path / "x.pth")
    got = read_pth(tmp_path / "x.pth")
    assert got.keys() == state.keys()
    for k, v in state.items():
        want = v.detach().float().numpy() if v.dtype == torch.bfloat16 else v.detach().numpy()
        assert got[k].dtype.itemsize == v.element_size(), k
        np.testing.assert_array_equal(got[k].astype(want.dtype), want, err_msg=k)


class _NotATensor:
    pass


def test_pth_reader_refuses_arbitrary_objects(tmp_path):
    torch.save({"w": torch.zeros(2), "x": _NotATensor()}, tmp_path / "evil.pth")
    with pytest.raises(Exception, match=r"refusing to load .*_NotATensor"):
        read_pth(tmp_path / "evil.pth")
    (tmp_path / "old.pth").write_bytes(b"\x80\x02not a zip")
    with pytest.raises(ValueError, match="not a zip-format"):
        read_pth(tmp_path / "old.pth")


def test_non_square_position_count_is_rejected(tmp_path):
    tensors = _hub_tensors(tmp_path)
    tensors["embeddings.position_embeddings"] = torch.zeros(1, 1 + 15, 128)
    path = tmp_path / "m.safetensors"
    safetensors.torch.save_file(tensors, str(path))
    with pytest.raises(ValueError, match="15 patch positions, not a square"):
        load_dinov2(path)


def test_shallow_checkpoint_gets_valid_default_blocks(tmp_path):
    """A 3-block checkpoint: the default blocks are the quarters' ends clipped at block 0, the
    model runs, and its features are those blocks' outputs in the reference."""
    ref = reference_model()
    torch.save(fair_state_dict(ref), tmp_path / "fair.pth")
    model, params = load_dinov2(tmp_path / "fair.pth")
    assert model.out_indices == (0, 0, 1, 2)
    images = np.random.default_rng(0).standard_normal((1, 32, 32, 3)).astype(np.float32)
    features = model.apply({"params": params}, images)["features"]
    with torch.no_grad():
        hidden = ref(torch.from_numpy(images).permute(0, 3, 1, 2), output_hidden_states=True)
    for i, feat in zip(model.out_indices, features, strict=True):
        want = hidden.hidden_states[i + 1][:, 1:].numpy().reshape(feat.shape)
        np.testing.assert_allclose(np.asarray(feat), want, atol=1e-4, rtol=0)
