"""Image and label decoding/encoding with the libraries mmseg uses (OpenCV, Pillow).

Images decode like mmcv's default cv2 backend (3-channel colour, RGB order here; 16-bit images
scaled to 8 bits, as cv2 does); labels decode like mmseg's `LoadAnnotations` (Pillow, palette
PNGs give their indices) and must be PNGs by content: a lossy JPEG renamed `.png` would decode to
plausible ids with wrong classes at every boundary. Every failure is a `ValueError` naming the
file, which `--skip_invalid` can skip.
"""

from __future__ import annotations

import io

import cv2
import numpy as np
from PIL import Image

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _cv2_decode(data: bytes, file_name: str, flags: int) -> np.ndarray | None:
    if not data:
        raise ValueError(f"{file_name}: empty file (0 bytes)")
    try:
        return cv2.imdecode(np.frombuffer(data, np.uint8), flags)
    except cv2.error as err:
        raise ValueError(f"{file_name}: not a decodable image ({err.err})") from err


def _require_png(data: bytes, file_name: str) -> None:
    if not data.startswith(PNG_SIGNATURE):
        kind = "JPEG" if data.startswith(b"\xff\xd8") else "not PNG"
        raise ValueError(
            f"{file_name}: label content is {kind}; labels must be lossless PNGs "
            "(a re-encoded label changes classes at boundaries)"
        )


def decode_image(data: bytes, file_name: str = "<bytes>") -> np.ndarray:
    """Encoded PNG/JPEG → (H, W, 3) uint8 RGB; raises naming `file_name` when undecodable."""
    bgr = _cv2_decode(data, file_name, cv2.IMREAD_COLOR)
    if bgr is None:
        raise ValueError(f"{file_name}: not a decodable image (truncated or not an image)")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def decode_label(data: bytes, file_name: str = "<bytes>") -> np.ndarray:
    """Single-channel 8-bit (grey or palette) PNG → (H, W) uint8 of raw ids."""
    _require_png(data, file_name)
    try:
        with Image.open(io.BytesIO(data)) as im:
            if im.mode not in ("L", "P"):
                raise ValueError(f"{file_name}: label must be an 8-bit grey or palette PNG")
            return np.asarray(im)
    except (OSError, SyntaxError) as err:
        raise ValueError(f"{file_name}: not a decodable label image ({err})") from err


def decode_label_channel(data: bytes, file_name: str = "<bytes>", *, channel: int) -> np.ndarray:
    """One channel (RGB index) of a possibly 16-bit colour PNG, as SYNTHIA stores its class ids
    (uint8 or uint16: ids above 255 are outside every table, reported like any unknown value)."""
    _require_png(data, file_name)
    raw = _cv2_decode(data, file_name, cv2.IMREAD_UNCHANGED)
    if raw is None or raw.ndim != 3:
        raise ValueError(f"{file_name}: not a decodable colour label image")
    return raw[:, :, 2 - channel]  # OpenCV is BGR


def encode_png(array: np.ndarray) -> bytes:
    """uint8 (H, W) or (H, W, 3) RGB → PNG bytes (fast compression: this is a cache, not art)."""
    if array.ndim == 3:
        array = cv2.cvtColor(array, cv2.COLOR_RGB2BGR)
    ok, buf = cv2.imencode(".png", array, [cv2.IMWRITE_PNG_COMPRESSION, 1])
    if not ok:
        raise ValueError(f"could not encode an array of shape {array.shape} as PNG")
    return buf.tobytes()
