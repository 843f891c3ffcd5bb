"""Decoding an image file to RGB pixels."""
from __future__ import annotations

import cv2
import numpy as np

from ..core.errors import UserError


def read_image(path: str, reduce: int = 1) -> np.ndarray:
    """Decode an image file to RGB uint8, optionally `reduce` (2, 4 or 8) times smaller at decode time, which is
    faster; raises UserError if it fails.

    OpenCV's IMREAD_COLOR expands greyscale to three equal channels, converts CMYK JPEGs to RGB, scales 16-bit
    images to 8 bits and drops an alpha channel (pixels keep their stored colour; nothing is composited)."""
    try:
        buffer = np.fromfile(path, dtype=np.uint8)
    except OSError as exc:
        raise UserError(f"{path}: cannot read the file ({exc.strerror}); restore it or remove its row") from None
    flags = {1: cv2.IMREAD_COLOR, 2: cv2.IMREAD_REDUCED_COLOR_2, 4: cv2.IMREAD_REDUCED_COLOR_4,
             8: cv2.IMREAD_REDUCED_COLOR_8}[reduce]
    try:
        image = cv2.imdecode(buffer, flags) if buffer.size else None
    except cv2.error as exc:  # e.g. over OpenCV's own pixel limit, CV_IO_MAX_IMAGE_PIXELS
        raise UserError(f"{path}: OpenCV refuses to decode the image (failed check: {exc.err}); replace it, remove "
                        "its row, or raise OpenCV's limits with the OPENCV_IO_MAX_IMAGE_* environment variables") \
            from None
    if image is None:
        raise UserError(f"{path}: cannot decode the image (corrupt, truncated or unsupported); replace it or "
                        "remove its row")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
