"""Official checkpoints in and out, against the real mmseg 1.2.2 / mmdet 3.3.0 / mmcv code: the
importer reproduces the pixel decoder, every prediction set, the semantic scores and the sliding
window (<= 1e-4); the exporter's files load into mmseg with the same scores; import -> export ->
import is bit-identical; bad checkpoints name their keys."""

from __future__ import annotations

import os
import re
import stat
import zipfile

import _mmseg
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import torch
import transformers
from _torch_dinov2 import TINY, fair_state_dict
from mmengine.logging import MessageHub
from mmengine.runner import load_checkpoint
from scipy.stats import ks_2samp
from train_helpers import run_cli

from recyclelora_jax import build, load_mmseg_checkpoint, recipe
from recyclelora_jax.config import METHODS, apply_method, base_config, smoke
from recyclelora_jax.convert import save_converted
from recyclelora_jax.evaluate.inference import slide_inference
from recyclelora_jax.models.mask2former import PixelDecoder, build_pyramid
from recyclelora_jax.models.segmentor import Segmentor
from recyclelora_jax.official import (
    from_official,
    model_from_state,
    official_keys,
    read_official,
    save_mmseg_checkpoint,
)
from recyclelora_jax.peft.params import attach, merge

TOL = 1e-4


def _images(h: int = 32, w: int = 32, batch: int = 2, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, h, w, 3)).astype(np.float32)


def _nchw(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()


def _metas(images: np.ndarray) -> list[dict]:
    return [dict(img_shape=images.shape[1:3], ori_shape=images.shape[1:3])] * len(images)


def _save_mmengine(model: torch.nn.Module, cfg, path) -> None:
    """What mmengine's ``CheckpointHook`` writes: meta (with the config text), state dict, and
    objects of other classes (the message hub, the optimizer state)."""
    hub = MessageHub.get_instance("test_official")
    hub.update_scalar("train/loss", 1.0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    torch.save(
        {
            "meta": {"cfg": cfg.pretty_text, "iter": 40000, "dataset_meta": {"classes": ("a",)}},
            "state_dict": model.state_dict(),
            "message_hub": hub.state_dict(),
            "optimizer": optimizer.state_dict(),
        },
        path,
    )


@pytest.fixture(scope="module")
def official(tmp_path_factory):
    """The official model with adapters (r_main 4 + r_sub 2), random weights, saved by mmengine."""
    cfg = _mmseg.official_config(r_main=4, r_sub=2, lora_alpha=1.5)
    model = _mmseg.build(cfg)
    _mmseg.randomize(model)
    path = tmp_path_factory.mktemp("official") / "iter_40000.pth"
    _save_mmengine(model, cfg, path)
    ours, params = load_mmseg_checkpoint(path)
    return model, ours, params, path


def test_test_backbone_is_dinov2():
    """The official-layout torch backbone computes what transformers' Dinov2Model computes."""
    torch.manual_seed(0)
    ref = transformers.Dinov2Model(
        transformers.Dinov2Config(**{**TINY, "num_hidden_layers": _mmseg.DEPTH})
    ).eval()
    _mmseg.randomize(ref)
    ours = _mmseg.TinyOfficialDinoV2(out_indices=(0, 1, 2, 3))
    ours.load_state_dict(fair_state_dict(ref))
    images = _nchw(_images())
    with torch.no_grad():
        hidden = ref(images, output_hidden_states=True).hidden_states
        got = ours(images)[2]  # the x1 level: block 2, no resize
    want = hidden[3][:, 1:].transpose(1, 2).reshape(got.shape)
    np.testing.assert_allclose(got.numpy(), want.numpy(), atol=1e-5, rtol=0)


def test_architecture_and_config_come_from_the_checkpoint(official):
    _, ours, _, path = official
    b, h = ours.backbone, ours.head
    assert (b.arch.embed_dim, b.arch.depth, b.arch.patch_size, b.arch.pos_grid) == (128, 4, 8, 4)
    assert b.out_indices == _mmseg.OUT_INDICES
    assert len(b.adapters) == 4 * _mmseg.DEPTH
    spec = dict(b.adapters)["blocks_2/mlp/fc1"]
    assert spec.ranks == (("main", 4), ("sub", 2)) and spec.scale == 1.5 / 6
    assert (h.num_classes, h.dim, h.num_queries, h.num_heads, h.num_points) == (5, 32, 7, 4, 2)
    assert (h.encoder_layers, h.decoder_layers, h.encoder_ffn_dim, h.decoder_ffn_dim) == (
        2,
        3,
        64,
        64,
    )
    state, cfg = read_official(path)
    assert cfg["model"]["backbone"]["lora_alpha"] == 1.5 and "backbone.cls_token" in state


def test_pixel_decoder_and_every_prediction_set_match_mmdet(official):
    model, ours, params, _ = official
    images = _images()
    with torch.no_grad():
        feats = model.backbone(_nchw(images))
        mask_features, memories = model.decode_head.pixel_decoder(feats)
        cls_sets, mask_sets = model.decode_head(feats, [None] * len(images))
    h = ours.head
    decoder = PixelDecoder(h.dim, h.num_heads, h.encoder_layers, h.num_points, h.encoder_ffn_dim)

    @jax.jit  # one compile for the three (eager dispatch costs more here)
    def run(x):
        pyramid = build_pyramid(ours.apply({"params": params}, x, method=_backbone_features))
        decoded = decoder.apply({"params": params["head"]["pixel_decoder"]}, pyramid)
        return pyramid, decoded, ours.apply({"params": params}, x)

    pyramid, (got_mask, got_levels), out = run(jnp.asarray(images))
    for f, want in zip(pyramid, feats, strict=True):
        np.testing.assert_allclose(np.asarray(f), want.permute(0, 2, 3, 1).numpy(), atol=TOL)
    np.testing.assert_allclose(got_mask, mask_features.permute(0, 2, 3, 1).numpy(), atol=TOL)
    for got, want in zip(got_levels, memories, strict=True):
        np.testing.assert_allclose(got, want.permute(0, 2, 3, 1).numpy(), atol=TOL)
    logits = np.concatenate([out["aux_logits"], out["pred_logits"][None]])
    masks = np.concatenate([out["aux_masks"], out["pred_masks"][None]])
    assert len(logits) == len(cls_sets) == 4
    for i in range(4):
        np.testing.assert_allclose(logits[i], cls_sets[i].numpy(), atol=TOL, err_msg=f"set {i}")
        np.testing.assert_allclose(masks[i], mask_sets[i].numpy(), atol=TOL, err_msg=f"set {i}")


def _backbone_features(module: Segmentor, images):
    return module.backbone(images)["features"]


def _mmseg_scores(model, images: np.ndarray, slide: bool = False) -> np.ndarray:
    with torch.no_grad():
        if slide:
            out = model.slide_inference(_nchw(images), _metas(images))
        else:
            out = model.encode_decode(_nchw(images), _metas(images))
    return out.permute(0, 2, 3, 1).numpy()


def _our_scores(ours, params, images: np.ndarray, slide: bool = False) -> np.ndarray:
    predict = jax.jit(lambda x: ours.apply({"params": params}, x, method=Segmentor.predict))
    if slide:
        return np.asarray(slide_inference(predict, jnp.asarray(images), 32, 21))
    return np.asarray(predict(jnp.asarray(images)))


def test_semantic_scores_and_sliding_window_match_mmseg(official):
    model, ours, params, _ = official
    images = _images()
    np.testing.assert_allclose(
        _our_scores(ours, params, images), _mmseg_scores(model, images), atol=TOL, rtol=0
    )
    wide = _images(48, 56, batch=1, seed=1)  # 2 x 3 windows of 32, stride 21
    np.testing.assert_allclose(
        _our_scores(ours, params, wide, slide=True),
        _mmseg_scores(model, wide, slide=True),
        atol=TOL,
        rtol=0,
    )


@pytest.mark.parametrize("merged", [False, True])
def test_export_is_read_back_by_mmseg_with_the_same_scores(official, tmp_path, merged):
    model, ours, params, _ = official
    path = tmp_path / "export.pth"
    save_mmseg_checkpoint(path, ours, params, merged=merged)
    loaded = torch.load(path, weights_only=True)
    assert set(loaded) == {"meta", "state_dict"}
    r_main, r_sub = (0, 0) if merged else (4, 2)
    fresh = _mmseg.build(_mmseg.official_config(r_main=r_main, r_sub=r_sub, lora_alpha=1.5))
    load_checkpoint(fresh, str(path), strict=True)
    images = _images(seed=2)
    np.testing.assert_allclose(
        _mmseg_scores(fresh, images), _mmseg_scores(model, images), atol=TOL, rtol=0
    )


def _flat(params) -> dict:
    return {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree.leaves_with_path(params)}


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_import_export_import_is_bit_identical(official, tmp_path, suffix):
    _, ours, params, _ = official
    path = tmp_path / f"again{suffix}"
    save_mmseg_checkpoint(path, ours, params)
    again, params2 = load_mmseg_checkpoint(path)
    assert again == ours
    a, b = _flat(params), _flat(params2)
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].tobytes() == b[k].tobytes(), k


@pytest.fixture
def umask():
    previous = os.umask(0o027)
    yield
    os.umask(previous)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_exports_appear_whole_with_the_umask_permissions(official, tmp_path, umask, suffix):
    """Both formats: mode 0666 & ~umask (the safetensors writer alone would give 0600), nothing
    beside the file; a write failing midway leaves neither the file nor a temporary one; a
    damaged file is named when read."""
    _, ours, params, _ = official
    path = tmp_path / f"model{suffix}"
    save_mmseg_checkpoint(path, ours, params)
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    assert [p.name for p in tmp_path.iterdir()] == [path.name]
    path.unlink()

    def failing(*args, **kwargs):
        raise OSError("disk full")

    writer = (zipfile.ZipFile, "writestr") if suffix == ".pth" else (safetensors.numpy, "save_file")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(*writer, failing)
        with pytest.raises(OSError, match="disk full"):
            save_mmseg_checkpoint(path, ours, params)
    assert list(tmp_path.iterdir()) == []
    path.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{broken}")
    with pytest.raises(ValueError, match=f"^{re.escape(str(path))}: "):
        load_mmseg_checkpoint(path)


def test_checkpoint_without_adapters_is_a_plain_backbone(tmp_path):
    model = _mmseg.build(_mmseg.official_config(r_main=0, r_sub=0))
    _mmseg.randomize(model, seed=3)
    torch.save(model.state_dict(), tmp_path / "bare.pth")  # a bare state dict, no meta
    ours, params = load_mmseg_checkpoint(tmp_path / "bare.pth")
    assert ours.backbone.adapters == ()
    # without meta the official head counts (8) apply; this tiny head has 4: mmseg disagrees
    assert ours.head.num_heads == 8
    # with the right counts, it reproduces mmseg
    path = tmp_path / "with_meta.pth"
    _save_mmengine(model, _mmseg.official_config(r_main=0, r_sub=0), path)
    ours, params = load_mmseg_checkpoint(path)
    images = _images(seed=4)
    np.testing.assert_allclose(
        _our_scores(ours, params, images), _mmseg_scores(model, images), atol=TOL, rtol=0
    )


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda s: s.pop("decode_head.cls_embed.bias"), r"missing keys \['decode_head.cls_embed"),
        (
            lambda s: s.update({"decode_head.extra.weight": torch.zeros(1)}),
            r"unexpected keys \['decode_head.extra.weight'\]",
        ),
        (
            lambda s: s.update({"backbone.blocks.1.attn.qkv.lora_B_sub": torch.zeros(384, 3)}),
            r"misshapen keys \['backbone.blocks.1.attn.qkv.lora_B_sub: \(384, 3\) "
            r"\(expected \(384, 2\)\)'\]",
        ),
    ],
)
def test_bad_checkpoints_name_the_key(official, tmp_path, edit, message):
    model = official[0]
    state = dict(model.state_dict())
    edit(state)
    torch.save(
        {"state_dict": state, "meta": {"cfg": _mmseg.official_config().pretty_text}},
        tmp_path / "bad.pth",
    )
    with pytest.raises(ValueError, match=message):
        load_mmseg_checkpoint(tmp_path / "bad.pth")


@pytest.fixture(scope="module")
def base_weights(tmp_path_factory):
    """A converted random base with LayerScale 1 (a fresh ViT's 1e-5 would hide the blocks)."""
    model, params = build.load_backbone_weights(smoke(base_config()), 0)
    params = jax.tree_util.tree_map_with_path(
        lambda p, x: jnp.ones_like(x) if "gamma" in jax.tree_util.keystr(p) else x, params
    )
    path = tmp_path_factory.mktemp("base") / "base.safetensors"
    save_converted(path, model, params)
    return path


def _built(method: str, base_weights) -> tuple[Segmentor, dict]:
    """``method``'s tiny run as train.py builds it -- the config's base weights, the recipe's
    adapters attached to them (RRQR for RecycleLoRA), the config's model -- as training leaves
    it: adapters moved off their init, the head random (its init is tested elsewhere and
    would cost a compile here)."""
    cfg = smoke(apply_method(base_config(), method))
    cfg.model.backbone.weights = str(base_weights)
    backbone, base = build.load_backbone_weights(cfg, cfg.seed)
    plan = recipe.from_config(cfg, backbone.arch)
    adapted, layout = attach(base, backbone.arch, plan.attach, seed=cfg.seed, progress=False)
    model = build.build_segmentor(cfg, backbone, layout)
    shapes = jax.eval_shape(lambda: build.init_head(model, cfg.data.crop_size, cfg.seed))
    rng = np.random.default_rng(0)

    def train(path, x):
        if "adapter_" not in jax.tree_util.keystr(path):
            return np.asarray(x)
        return np.asarray(x) + 0.1 * np.std(x) * rng.standard_normal(x.shape).astype(np.float32)

    head = jax.tree.map(lambda s: 0.1 * rng.standard_normal(s.shape).astype(s.dtype), shapes)
    backbone_params = jax.tree_util.tree_map_with_path(train, jax.device_get(adapted))
    return model, {"backbone": backbone_params, "head": head}


def _same_leaves(a, b) -> None:
    a, b = _flat(a), _flat(b)
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].tobytes() == b[k].tobytes(), k


def test_a_run_built_as_train_py_builds_it_round_trips_with_the_same_scores(base_weights, tmp_path):
    """RecycleLoRA's RRQR adapters from the real build path. Kept: the official ``.pth`` holds
    the residual kernels and ``lora_{A,B}_{main,sub}``; read back, the same model (adapter
    ranks and scale, blocks, interpolation, head) with bit-identical parameters, so the same
    scores. Merged: a plain backbone holding exactly the merged kernels, whose scores equal
    the adapter model's within the merge's float rounding."""
    model, params = _built("recyclelora", base_weights)
    assert dict(model.backbone.adapters)["blocks_0/attn/qkv"].ranks == (("main", 4), ("sub", 2))
    save_mmseg_checkpoint(tmp_path / "run.pth", model, params)
    assert "backbone.blocks.3.mlp.fc2.lora_B_sub" in read_official(tmp_path / "run.pth")[0]
    again, params2 = load_mmseg_checkpoint(tmp_path / "run.pth")
    assert again.backbone == model.backbone.clone(dtype=None) and again.head == model.head
    _same_leaves(params, params2)
    save_mmseg_checkpoint(tmp_path / "plain.safetensors", model, params, merged=True)
    plain, params3 = load_mmseg_checkpoint(tmp_path / "plain.safetensors")
    assert plain.backbone == again.backbone.clone(adapters=())
    _same_leaves(
        {**params, "backbone": merge(params["backbone"], again.backbone.adapters)}, params3
    )
    images = _images(64, 64, batch=1, seed=6)
    np.testing.assert_allclose(
        _our_scores(plain, params3, images), _our_scores(model, params, images), atol=1e-5, rtol=0
    )


def test_which_methods_keep_their_adapters_in_the_official_layout():
    """The official layout names RecycleLoRA's two adapters (``lora_*_main``/``_sub``), so the
    RRQR methods export with their adapters kept, as do the methods without adapters; the
    single-adapter methods (``lora``) have no official key and are exported merged."""
    kept = set()
    for method in METHODS:
        model = build.segmentor_shapes(smoke(apply_method(base_config(), method)))[0]
        try:
            official_keys(model)
            kept.add(method)
        except ValueError as err:
            assert re.search(r"adapter 'lora' of blocks_\d+/.* export it merged", str(err))
        official_keys(model.clone(backbone=model.backbone.clone(adapters=())))  # merged: all
    assert kept == {"recyclelora", "main-only", "sub-only", "swapped", "full", "frozen"}


@pytest.mark.parametrize("method", ["sub-only", "soma", "full"])
def test_exports_round_trip_kept_and_merged(base_weights, tmp_path, method):
    """Kept (where the layout allows): read back bit-identical with the same adapters (a lone
    ``sub`` adapter included); merged: a plain backbone holding exactly the merged kernels.
    RecycleLoRA's own round trip is the test above."""
    model, params = _built(method, base_weights)
    path = tmp_path / "run.safetensors"
    if method != "soma":
        save_mmseg_checkpoint(path, model, params)
        again, params2 = load_mmseg_checkpoint(path)
        assert again.backbone.adapters == model.backbone.adapters
        _same_leaves(params, params2)
    save_mmseg_checkpoint(path, model, params, merged=True)
    again, params2 = load_mmseg_checkpoint(path)
    assert again.backbone.adapters == ()
    merged = merge(params["backbone"], model.backbone.adapters)
    _same_leaves({**params, "backbone": merged}, params2)


def test_head_init_follows_mmdet():
    """Our head's initial weights have the distributions of mmdet's ``init_weights`` (through
    the official key table): the same constants where mmdet sets constants (zero biases, unit
    norms), the same std per tensor (xavier-normal of the fused 3C x C ``in_proj_weight``), and
    pooled, the same shapes (untruncated normals, uniform FFN biases; two-sample KS test)."""
    model = _mmseg.build(_mmseg.official_config(r_main=0, r_sub=0))
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    ours = model_from_state(state, _mmseg.official_config().to_dict())
    theirs = _flat(from_official(ours, state)["head"])
    mine = _flat(build.init_head(ours, 32, 0))  # the head alone, as a run initialises it
    pooled_mine, pooled_theirs = [], []
    for k, t in theirs.items():
        m = mine[k]
        if np.all(t == t.flat[0]):
            np.testing.assert_array_equal(m, t, err_msg=k)
            continue
        assert not np.all(m == m.flat[0]), k
        if t.size >= 256:
            assert abs(m.std() / t.std() - 1) < 0.15, (k, m.std(), t.std())
            pooled_mine.append(m.ravel() / t.std())
            pooled_theirs.append(t.ravel() / t.std())
    assert ks_2samp(np.concatenate(pooled_mine), np.concatenate(pooled_theirs)).pvalue > 1e-3


def test_eval_py_segments_a_folder_with_an_official_checkpoint(official, tmp_path):
    """``eval.py --checkpoint iter_40000.pth --images DIR``: the official checkpoint segments
    a folder (ids PNG at the photo's size, labels within the checkpoint's classes)."""
    import sys
    from pathlib import Path

    from PIL import Image

    path = official[3]
    photos = tmp_path / "photos"
    photos.mkdir()
    rgb = np.random.default_rng(5).integers(0, 256, (24, 40, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(photos / "street.png")
    repo = Path(__file__).resolve().parent.parent
    args = [sys.executable, str(repo / "eval.py"), f"--checkpoint={path}",
            f"--images={photos}", f"--out={tmp_path / 'out'}", "--native_size"]  # fmt: skip
    done = run_cli(args, timeout=900, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    ids = np.asarray(Image.open(tmp_path / "out" / "images" / "street_ids.png"))
    assert ids.shape == (24, 40) and ids.max() < _mmseg.NUM_CLASSES
