"""Raw-id → Cityscapes train-id tables of every dataset, written once as data.

Each table is a `LabelTable`: a 256-entry lookup (raw id → train id, 255 = ignore) plus the set of
raw ids the dataset defines. A value outside that set becomes ignore, as in the reference's
conversion tools (the output starts as 255 everywhere, then each table id is written over it),
and is counted, so that the prepare reports it; or, strictly, is an error naming the file.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping

import numpy as np

from recyclelora_jax.classes import CLASS_NAMES, IGNORE, NUM_CLASSES


@dataclasses.dataclass(frozen=True)
class LabelTable:
    """Lookup `lut[raw] = train id` and the mask `valid[raw]` of raw ids the dataset defines."""

    name: str
    lut: np.ndarray
    valid: np.ndarray

    def unknown(self, raw: np.ndarray) -> dict[int, int]:
        """Pixels per value of ``raw`` (unsigned ids) that the table does not define."""
        bad = ~_lookup(self.valid, raw, False)
        if not bad.any():
            return {}
        values, counts = np.unique(raw[bad], return_counts=True)
        return {int(v): int(c) for v, c in zip(values, counts, strict=True)}

    def map(
        self, raw: np.ndarray, file_name: str = "<label>", *, strict: bool = False
    ) -> np.ndarray:
        """Train ids (uint8) of ``raw``: values outside the table become ignore, or with
        ``strict`` a `ValueError` naming ``file_name`` and every such value."""
        if strict and (unknown := self.unknown(raw)):
            raise ValueError(
                f"{file_name}: label values {list(unknown)} are not in the {self.name} label "
                f"table (pixels: {list(unknown.values())})"
            )
        return _lookup(self.lut, raw, IGNORE)


def _lookup(table: np.ndarray, raw: np.ndarray, outside) -> np.ndarray:
    """``table[raw]``, ``outside`` where ``raw`` (unsigned, 8 or 16 bits) is beyond the table."""
    if raw.dtype == np.uint8:
        return table[raw]
    inside = raw < len(table)
    return np.where(inside, table[np.where(inside, raw, 0)], outside).astype(table.dtype)


def make_table(name: str, mapping: Mapping[int, int], valid_ids: Iterable[int]) -> LabelTable:
    """Builds a `LabelTable`; ids in `valid_ids` but not in `mapping` map to ignore."""
    lut = np.full(256, IGNORE, np.uint8)
    valid = np.zeros(256, bool)
    valid[list(valid_ids)] = True
    for raw, train_id in mapping.items():
        if not valid[raw]:
            raise ValueError(f"{name}: mapped raw id {raw} is not a valid id")
        lut[raw] = train_id
    return LabelTable(name, lut, valid)


# Cityscapes labelIds 0..33 (README of cityscapesScripts); GTAV uses the same ids (RECIPE.md §6).
CITYSCAPES_ID_TO_TRAIN = {
    7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11, 25: 12,
    26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18,
}  # fmt: skip
CITYSCAPES = make_table("Cityscapes", CITYSCAPES_ID_TO_TRAIN, range(34))
GTAV = make_table("GTAV", CITYSCAPES_ID_TO_TRAIN, range(34))

# SYNTHIA RAND-CITYSCAPES class ids 0..22 (its README); the 16 shared classes as in DAFormer's
# conversion (terrain, truck and train are absent).
SYNTHIA_ID_TO_TRAIN = {
    3: 0, 4: 1, 2: 2, 21: 3, 5: 4, 7: 5, 15: 6, 9: 7, 6: 8, 1: 10, 10: 11, 17: 12, 8: 13, 19: 15,
    12: 17, 11: 18,
}  # fmt: skip
SYNTHIA = make_table("SYNTHIA", SYNTHIA_ID_TO_TRAIN, range(23))

# UrbanSyn's ss/ maps hold train ids, 19 = unlabelled.
URBANSYN = make_table("UrbanSyn", {i: i for i in range(NUM_CLASSES)}, range(NUM_CLASSES + 1))

# BDD100K sem_seg masks already hold train ids.
BDD100K = make_table("BDD100K", {i: i for i in range(NUM_CLASSES)}, [*range(NUM_CLASSES), IGNORE])

# Mapillary Vistas v1.2, by class name (RECIPE.md §6); every other v1.2 class is ignored.
MAPILLARY_NAME_TO_CLASS = {
    "construction--flat--road": "road",
    "construction--flat--crosswalk-plain": "road",
    "construction--flat--parking": "road",
    "construction--flat--bike-lane": "road",
    "construction--flat--service-lane": "road",
    "marking--crosswalk-zebra": "road",
    "marking--general": "road",
    "construction--flat--sidewalk": "sidewalk",
    "construction--flat--pedestrian-area": "sidewalk",
    "construction--barrier--curb": "sidewalk",
    "construction--flat--curb-cut": "sidewalk",
    "construction--structure--building": "building",
    "construction--barrier--wall": "wall",
    "construction--barrier--fence": "fence",
    "object--support--pole": "pole",
    "object--support--utility-pole": "pole",
    "object--street-light": "pole",
    "object--traffic-light": "traffic light",
    "object--traffic-sign--front": "traffic sign",
    "object--traffic-sign--back": "traffic sign",
    "object--support--traffic-sign-frame": "traffic sign",  # the official conversion's rule
    "nature--vegetation": "vegetation",
    "nature--terrain": "terrain",
    "nature--sky": "sky",
    "human--person": "person",
    "human--rider--bicyclist": "rider",
    "human--rider--motorcyclist": "rider",
    "human--rider--other-rider": "rider",
    "object--vehicle--car": "car",
    "object--vehicle--truck": "truck",
    "object--vehicle--bus": "bus",
    "object--vehicle--on-rails": "train",
    "object--vehicle--motorcycle": "motorcycle",
    "object--vehicle--bicycle": "bicycle",
}
MAPILLARY_V12_IGNORED = (
    "animal--bird", "animal--ground-animal", "construction--barrier--guard-rail",
    "construction--barrier--other-barrier", "construction--flat--rail-track",
    "construction--structure--bridge", "construction--structure--tunnel", "nature--mountain",
    "nature--sand", "nature--snow", "nature--water", "object--banner", "object--bench",
    "object--bike-rack", "object--billboard", "object--catch-basin", "object--cctv-camera",
    "object--fire-hydrant", "object--junction-box", "object--mailbox", "object--manhole",
    "object--phone-booth", "object--pothole", "object--trash-can", "object--vehicle--boat",
    "object--vehicle--caravan",
    "object--vehicle--other-vehicle", "object--vehicle--trailer", "object--vehicle--wheeled-slow",
    "void--car-mount", "void--ego-vehicle", "void--unlabeled",
)  # fmt: skip


def mapillary_table(class_names: list[str], sign_frame: bool = True) -> LabelTable:
    """Table for a Vistas `config.json` whose i-th label has name `class_names[i]` (v1.2).
    `sign_frame=False` ignores traffic-sign frames (this project's rule before it followed the
    official conversion, which counts them as traffic sign)."""
    unknown = [n for n in class_names if n not in MAPILLARY_NAME_TO_CLASS]
    unknown = [n for n in unknown if n not in MAPILLARY_V12_IGNORED]
    if unknown:
        raise ValueError(f"Mapillary config has class names that are not Vistas v1.2: {unknown}")
    mapping = {
        i: CLASS_NAMES.index(MAPILLARY_NAME_TO_CLASS[n])
        for i, n in enumerate(class_names)
        if n in MAPILLARY_NAME_TO_CLASS
        and (sign_frame or n != "object--support--traffic-sign-frame")
    }
    return make_table("Mapillary Vistas v1.2", mapping, range(len(class_names)))
