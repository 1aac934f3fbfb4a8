"""Label tables against their authoritative sources."""

import json
import re
from collections import Counter

import numpy as np
import pytest
from cityscapesscripts.helpers import labels as cs

from recyclelora_jax.data import labels
from recyclelora_jax.data.layouts import mapillary_class_names

# The 66 class names of Mapillary Vistas v1.2 (its config.json), in id order.
MAPILLARY_V12 = (
    "animal--bird", "animal--ground-animal", "construction--barrier--curb",
    "construction--barrier--fence", "construction--barrier--guard-rail",
    "construction--barrier--other-barrier", "construction--barrier--wall",
    "construction--flat--bike-lane", "construction--flat--crosswalk-plain",
    "construction--flat--curb-cut", "construction--flat--parking",
    "construction--flat--pedestrian-area", "construction--flat--rail-track",
    "construction--flat--road", "construction--flat--service-lane", "construction--flat--sidewalk",
    "construction--structure--bridge", "construction--structure--building",
    "construction--structure--tunnel", "human--person", "human--rider--bicyclist",
    "human--rider--motorcyclist", "human--rider--other-rider", "marking--crosswalk-zebra",
    "marking--general", "nature--mountain", "nature--sand", "nature--sky", "nature--snow",
    "nature--terrain", "nature--vegetation", "nature--water", "object--banner", "object--bench",
    "object--bike-rack", "object--billboard", "object--catch-basin", "object--cctv-camera",
    "object--fire-hydrant", "object--junction-box", "object--mailbox", "object--manhole",
    "object--phone-booth", "object--pothole", "object--street-light", "object--support--pole",
    "object--support--traffic-sign-frame", "object--support--utility-pole",
    "object--traffic-light", "object--traffic-sign--back", "object--traffic-sign--front",
    "object--trash-can", "object--vehicle--bicycle", "object--vehicle--boat",
    "object--vehicle--bus", "object--vehicle--car", "object--vehicle--caravan",
    "object--vehicle--motorcycle", "object--vehicle--on-rails", "object--vehicle--other-vehicle",
    "object--vehicle--trailer", "object--vehicle--truck", "object--vehicle--wheeled-slow",
    "void--car-mount", "void--ego-vehicle", "void--unlabeled",
)  # fmt: skip


def test_cityscapes_table_equals_cityscapesscripts():
    for label in cs.labels:
        if label.id < 0:
            continue  # license plate (-1) never appears in labelIds PNGs
        want = 255 if label.trainId in (255, -1) else label.trainId
        assert labels.CITYSCAPES.lut[label.id] == want, label.name
        assert labels.CITYSCAPES.valid[label.id]
    assert not labels.CITYSCAPES.valid[34:].any()
    train = sorted((lab for lab in cs.labels if 0 <= lab.trainId < 19), key=lambda x: x.trainId)
    assert tuple(lab.name for lab in train) == labels.CLASS_NAMES


def test_gtav_table_equals_spec():
    spec = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11,
            25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}  # fmt: skip
    want = np.full(256, 255)
    want[list(spec)] = list(spec.values())
    np.testing.assert_array_equal(labels.GTAV.lut, want)


# SYNTHIA RAND-CITYSCAPES class ids (its README.txt), with the Cityscapes name of each class.
SYNTHIA_README = (
    "void", "sky", "building", "road", "sidewalk", "fence", "vegetation", "pole", "car",
    "traffic sign", "pedestrian", "bicycle", "motorcycle", "parking-slot", "road-work",
    "traffic light", "terrain", "rider", "truck", "bus", "train", "wall", "lanemarking",
)  # fmt: skip
SYNTHIA_TO_CITYSCAPES_NAME = {"pedestrian": "person"}
# The 16-class protocol of SYNTHIA → Cityscapes: terrain, truck and train are not evaluated.
SYNTHIA_NOT_EVALUATED = {"terrain", "truck", "train"}


def test_synthia_table_equals_its_readme_by_name():
    for raw, name in enumerate(SYNTHIA_README):
        name = SYNTHIA_TO_CITYSCAPES_NAME.get(name, name)
        if name in labels.CLASS_NAMES and name not in SYNTHIA_NOT_EVALUATED:
            want = labels.CLASS_NAMES.index(name)
        else:
            want = 255
        assert labels.SYNTHIA.lut[raw] == want, (raw, name)
        assert labels.SYNTHIA.valid[raw]
    assert not labels.SYNTHIA.valid[len(SYNTHIA_README) :].any()
    mapped = set(labels.SYNTHIA.lut[labels.SYNTHIA.valid].tolist()) - {255}
    assert len(mapped) == 16


def test_mapillary_config_maps_by_spec_rules(tmp_path):
    names = list(MAPILLARY_V12)
    assert len(names) == 66 and len(set(names)) == 66
    np.random.default_rng(0).shuffle(names)
    (tmp_path / "config.json").write_text(json.dumps({"labels": [{"name": n} for n in names]}))
    table = labels.mapillary_table(mapillary_class_names(tmp_path))
    rules = {  # RECIPE.md §6 plus the direct name matches
        "construction--flat--road": "road", "construction--flat--crosswalk-plain": "road",
        "construction--flat--parking": "road", "construction--flat--bike-lane": "road",
        "construction--flat--service-lane": "road", "marking--crosswalk-zebra": "road",
        "marking--general": "road", "construction--flat--sidewalk": "sidewalk",
        "construction--flat--pedestrian-area": "sidewalk",
        "construction--barrier--curb": "sidewalk",
        "construction--flat--curb-cut": "sidewalk", "construction--structure--building": "building",
        "construction--barrier--wall": "wall", "construction--barrier--fence": "fence",
        "object--support--pole": "pole", "object--support--utility-pole": "pole",
        "object--street-light": "pole", "object--traffic-light": "traffic light",
        "object--traffic-sign--front": "traffic sign", "object--traffic-sign--back": "traffic sign",
        "object--support--traffic-sign-frame": "traffic sign",  # the official conversion's rule
        "nature--vegetation": "vegetation", "nature--terrain": "terrain", "nature--sky": "sky",
        "human--person": "person", "human--rider--bicyclist": "rider",
        "human--rider--motorcyclist": "rider", "human--rider--other-rider": "rider",
        "object--vehicle--car": "car", "object--vehicle--truck": "truck",
        "object--vehicle--bus": "bus", "object--vehicle--on-rails": "train",
        "object--vehicle--motorcycle": "motorcycle", "object--vehicle--bicycle": "bicycle",
    }  # fmt: skip
    for i, name in enumerate(names):
        want = labels.CLASS_NAMES.index(rules[name]) if name in rules else 255
        assert table.lut[i] == want, name
    assert table.valid[:66].all() and not table.valid[66:].any()
    old_rule = labels.mapillary_table(names, sign_frame=False)
    frame = names.index("object--support--traffic-sign-frame")
    assert (
        old_rule.lut[frame] == 255
        and (np.delete(old_rule.lut, frame) == np.delete(table.lut, frame)).all()
    )
    with pytest.raises(ValueError, match="66"):
        table.map(np.array([[66]], np.uint8), "x.png", strict=True)


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_values_outside_a_table_become_ignore_and_are_counted(dtype):
    """As the reference's converters do (255 everywhere, then each table id written over it),
    for 8-bit ids and SYNTHIA's 16-bit ones (values above 255 included)."""
    raw = np.random.default_rng(0).integers(0, 40 if dtype == np.uint8 else 400, (9, 11))
    raw = raw.astype(dtype)
    want = np.full(raw.shape, 255, np.uint8)
    for k, v in labels.SYNTHIA_ID_TO_TRAIN.items():
        want[raw == k] = v
    np.testing.assert_array_equal(labels.SYNTHIA.map(raw), want)
    outside = Counter(v for v in raw.ravel().tolist() if v >= 23)
    assert labels.SYNTHIA.unknown(raw) == dict(sorted(outside.items()))
    assert labels.SYNTHIA.unknown(raw[raw < 23]) == {}
    message = f"x.png: label values {sorted(outside)} are not in the SYNTHIA label table "
    with pytest.raises(ValueError, match=f"^{re.escape(message)}"):
        labels.SYNTHIA.map(raw, "x.png", strict=True)


def test_mapillary_rejects_v2_names(tmp_path):
    with pytest.raises(ValueError, match=r"not Vistas v1\.2.*flat--driveway"):
        labels.mapillary_table([*MAPILLARY_V12, "construction--flat--driveway"])
