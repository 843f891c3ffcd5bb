"""Before/after strip of generated images for the README: content source | style source | result, one row each.

    .venv/bin/python docs/style_strip.py inputs/demo docs/style_transfer_strip.png [ID ...]
"""
from __future__ import annotations

import sys
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from src.data import STYLE_CSV, read_image  # noqa: E402

TILE = 200


def tile(image: np.ndarray, caption: str) -> np.ndarray:
    scale = TILE / max(image.shape[:2])
    resized = cv2.resize(image, (round(image.shape[1] * scale), round(image.shape[0] * scale)),
                         interpolation=cv2.INTER_AREA)
    canvas = np.full((TILE + 22, TILE, 3), 255, np.uint8)
    top, left = 22 + (TILE - resized.shape[0]) // 2, (TILE - resized.shape[1]) // 2
    canvas[top:top + resized.shape[0], left:left + resized.shape[1]] = resized
    cv2.putText(canvas, caption, (4, 15), cv2.FONT_HERSHEY_SIMPLEX, 0.42, (0, 0, 0), 1, cv2.LINE_AA)
    return canvas


def main(root: Path, out: Path, ids: list[str]) -> None:
    train = pd.read_csv(root / "train.csv", dtype=str).set_index("id")
    style = pd.read_csv(root / STYLE_CSV, dtype=str).set_index("id")
    rows = []
    for image_id in ids or list(style.index[:3]):
        row = style.loc[image_id]
        content_id, style_id = row["content_source_id"], row["style_source_id"]
        rows.append(np.concatenate([
            tile(read_image(str(root / train.at[content_id, "img_path"])),
                 f"content: id {content_id} ({train.at[content_id, 'artist']})"[:34]),
            tile(read_image(str(root / train.at[style_id, "img_path"])),
                 f"style: id {style_id} ({row['artist']})"[:34]),
            tile(read_image(str(root / row["img_path"])), f"result: {image_id}"[:34])], axis=1))
    strip = Image.fromarray(np.concatenate(rows, axis=0)).quantize(colors=256)  # a palette PNG stays small
    strip.save(out, optimize=True)
    print(f"wrote {out} ({out.stat().st_size // 1024} KB)")


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3:])
