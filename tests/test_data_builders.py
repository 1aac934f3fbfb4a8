"""Every dg_* builder builds from data in its real layout and reads back identical pixels and
correctly mapped labels, in a process where importing TensorFlow is impossible."""

import json
import sys
from pathlib import Path

import numpy as np
from test_data_labels import MAPILLARY_V12


class _BlockTensorFlow:
    """meta_path finder: any `import tensorflow...` fails. Availability probes through
    `importlib.util.find_spec` (etils/TFDS ask before choosing a backend) fall through to the
    normal finders, which find nothing in this environment; the run asserts none was loaded."""

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] != "tensorflow":
            return None
        caller = sys._getframe(2).f_code
        if caller.co_name == "find_spec" and "util" in caller.co_filename:
            return None
        raise ModuleNotFoundError(f"TensorFlow is blocked in this test ({name})")


def _write_fixtures(root: Path, rng: np.random.Generator) -> dict:
    """Tiny datasets in the layouts of SYNTHIA, BDD100K, Mapillary (v1.2) and ACDC; returns, per
    dataset, {file_name: (image path, raw label)}."""
    import cv2
    from PIL import Image

    out = {}

    def image(path, h=24, w=40):
        path.parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(path), rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        return path

    def grey(path, raw, palette=False):
        path.parent.mkdir(parents=True, exist_ok=True)
        im = Image.fromarray(raw)
        if palette:
            im.putpalette(list(rng.integers(0, 256, 768, dtype=np.uint8)))
        im.save(path)

    syn = {}
    for i in range(3):
        raw = rng.integers(0, 23, (24, 40)).astype(np.uint16)
        img = image(root / "synthia" / "RGB" / f"{i:07d}.png")
        lab = root / "synthia" / "GT" / "LABELS" / f"{i:07d}.png"
        lab.parent.mkdir(parents=True, exist_ok=True)  # 16-bit, class id in the first channel
        cv2.imwrite(
            str(lab),
            np.stack([rng.integers(0, 999, raw.shape), raw * 0 + 7, raw], -1).astype(np.uint16),
        )
        syn[img.name] = (str(img), raw.astype(np.uint8).tolist())
    out["dg_synthia"] = syn
    for split in ("train", "val"):
        for i in range(2):
            raw = rng.choice([*range(19), 255], (24, 40)).astype(np.uint8)
            img = image(root / "bdd" / "images" / "10k" / split / f"{split}{i}.jpg")
            grey(root / "bdd" / "labels" / "sem_seg" / "masks" / split / f"{split}{i}.png", raw)
            out.setdefault("dg_bdd100k", {})[img.name] = (str(img), raw.tolist())
    names = list(MAPILLARY_V12)
    rng.shuffle(names)  # ids follow the config's order, mapping follows the names
    (root / "mapillary").mkdir()
    (root / "mapillary" / "config_v1.2.json").write_text(
        json.dumps({"labels": [{"name": n} for n in names]})
    )
    for split in ("training", "validation"):
        for i in range(2):
            raw = rng.integers(0, 66, (30, 41)).astype(np.uint8)
            img = image(root / "mapillary" / split / "images" / f"{split}{i}.jpg", 30, 41)
            grey(
                root / "mapillary" / split / "v1.2" / "labels" / f"{split}{i}.png",
                raw,
                palette=True,
            )
            out.setdefault("dg_mapillary", {})[img.name] = (str(img), raw.tolist())
    out["mapillary_names"] = names
    for cond in ("fog", "night", "rain", "snow"):
        for split in ("train", "val"):
            raw = rng.integers(0, 34, (24, 40)).astype(np.uint8)
            stem = f"GOPR0{cond}_{split}_000001"
            img = image(
                root / "acdc" / "rgb_anon" / cond / split / f"GOPR0{cond}" / f"{stem}_rgb_anon.png"
            )
            grey(
                root / "acdc" / "gt" / cond / split / f"GOPR0{cond}" / f"{stem}_gt_labelIds.png",
                raw,
            )
            out.setdefault("dg_acdc", {})[img.name] = (str(img), raw.tolist())
    return out


def _run(tmp: Path) -> dict:
    """Body of the TensorFlow-free subprocess: write, build, read back, compare."""
    sys.meta_path.insert(0, _BlockTensorFlow())
    import tensorflow_datasets as tfds

    from recyclelora_jax.data import codecs, labels, synthetic
    from recyclelora_jax.data.prepare import prepare

    rng = np.random.default_rng(0)
    syn = synthetic.write_synthetic(
        tmp / "raw", styles=("photo",), num_train=4, num_val=2, size=(64, 32)
    )
    expected = _write_fixtures(tmp / "raw", rng)
    for ds, root in (("dg_gtav", syn["gtav"]), ("dg_cityscapes", syn["cityscapes_photo"])):
        files = sorted(root.rglob("*.png"))
        imgs = [
            f for f in files if f.parent.name == "images" or f.name.endswith("_leftImg8bit.png")
        ]
        expected[ds] = {}
        for f in imgs:
            lab = (
                (f.parent.parent / "labels" / f.name)
                if ds == "dg_gtav"
                else Path(
                    str(f)
                    .replace("leftImg8bit", "gtFine")
                    .replace("gtFine.png", "gtFine_labelIds.png")
                )
            )
            expected[ds][f.name] = (str(f), codecs.decode_label(lab.read_bytes()).tolist())
    raw = tmp / "raw"
    manual = {"dg_gtav": syn["gtav"], "dg_cityscapes": syn["cityscapes_photo"],
              "dg_synthia": raw / "synthia", "dg_bdd100k": raw / "bdd",
              "dg_mapillary": raw / "mapillary", "dg_mapillary/half": raw / "mapillary",
              "dg_acdc": raw / "acdc"}  # fmt: skip
    tables = {"dg_gtav": labels.GTAV, "dg_cityscapes": labels.CITYSCAPES,
              "dg_synthia": labels.SYNTHIA, "dg_bdd100k": labels.BDD100K,
              "dg_acdc": labels.CITYSCAPES,
              "dg_mapillary": labels.mapillary_table(expected["mapillary_names"])}  # fmt: skip
    report = {}
    for ds, root in manual.items():
        prepare(ds, root, tmp / "tfds", num_workers=2 if ds == "dg_acdc" else 1)
        key = ds.split("/")[0]
        seen = {}
        for split in ("train", "validation"):
            if split == "validation" and key in ("dg_gtav", "dg_synthia"):
                continue
            for ex in tfds.data_source(ds, split=split, data_dir=str(tmp / "tfds")):
                name = ex["file_name"].decode()
                path, raw = expected[key][name]
                raw = np.asarray(raw, np.uint8)
                image = codecs.decode_image(ex["image"])
                label = codecs.decode_label(ex["label"])
                want_image = codecs.decode_image(Path(path).read_bytes())
                want_label = tables[key].lut[raw]
                if ds == "dg_mapillary/half" and split == "validation":
                    from recyclelora_jax.data.convert import halve

                    want_image, want_label = halve(want_image, want_label)
                else:
                    assert ex["image"] == Path(path).read_bytes(), name  # stored as downloaded
                assert np.array_equal(image, want_image), name
                assert np.array_equal(label, want_label), name
                seen[name] = int(label.size)
        assert sorted(seen) == sorted(expected[key]), (ds, sorted(seen))
        report[ds] = len(seen)
    assert not [m for m in sys.modules if m.split(".")[0] == "tensorflow"]
    return report


def test_builders_round_trip_without_tensorflow(tmp_path):
    from train_helpers import run_cli  # not at the top: this file also runs as that script

    proc = run_cli([sys.executable, __file__, str(tmp_path)], timeout=200)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report == {
        "dg_gtav": 6, "dg_cityscapes": 6, "dg_synthia": 3, "dg_bdd100k": 4, "dg_mapillary": 4,
        "dg_mapillary/half": 4, "dg_acdc": 8,
    }  # fmt: skip


if __name__ == "__main__":
    print(json.dumps(_run(Path(sys.argv[1]))))
