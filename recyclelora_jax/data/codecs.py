"""Image and label decoding/encoding with the libraries mmseg uses (OpenCV, Pillow).

Images decode like mmcv's default cv2 backend (3-channel colour, RGB order here); labels decode
like mmseg's `LoadAnnotations` (Pillow, palette PNGs give their indices).
"""

from __future__ import annotations

import io

import cv2
import numpy as np
from PIL import Image


def decode_image(data: bytes, file_name: str = "<bytes>") -> np.ndarray:
    """Encoded PNG/JPEG → (H, W, 3) uint8 RGB; raises naming `file_name` when undecodable."""
    bgr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if bgr is None:
        raise ValueError(f"{file_name}: not a decodable image")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def decode_label(data: bytes, file_name: str = "<bytes>") -> np.ndarray:
    """Single-channel 8-bit (grey or palette) PNG → (H, W) uint8 of raw ids."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            if im.mode not in ("L", "P"):
                raise ValueError(f"{file_name}: label must be an 8-bit grey or palette PNG")
            return np.asarray(im)
    except (OSError, SyntaxError) as err:
        raise ValueError(f"{file_name}: not a decodable label image ({err})") from err


def decode_label_channel(data: bytes, file_name: str = "<bytes>", *, channel: int) -> np.ndarray:
    """One channel (RGB index) of a possibly 16-bit colour PNG, as SYNTHIA stores its class ids."""
    raw = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if raw is None or raw.ndim != 3:
        raise ValueError(f"{file_name}: not a decodable colour label image")
    ids = raw[:, :, 2 - channel]  # OpenCV is BGR
    if ids.max() > 255:
        raise ValueError(f"{file_name}: label ids above 255")
    return ids.astype(np.uint8)


def encode_png(array: np.ndarray) -> bytes:
    """uint8 (H, W) or (H, W, 3) RGB → PNG bytes (fast compression: this is a cache, not art)."""
    if array.ndim == 3:
        array = cv2.cvtColor(array, cv2.COLOR_RGB2BGR)
    ok, buf = cv2.imencode(".png", array, [cv2.IMWRITE_PNG_COMPRESSION, 1])
    if not ok:
        raise ValueError(f"could not encode an array of shape {array.shape} as PNG")
    return buf.tobytes()
