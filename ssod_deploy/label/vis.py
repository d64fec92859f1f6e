"""`--save-vis N`: a few images with their pseudo-labels drawn, for a quick look before review.

Label boxes (score >= tau2) are solid; uncertain boxes (tau1 <= score < tau2) are dashed and
their caption ends in '?', in the class colour either way, so the two read apart at a glance.
Pillow only, with its bundled default font (nothing is downloaded).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

VIS_DIR = "vis"
VIS_MAX_SIDE = 1280  # vis images are previews: big photos are shrunk before they are queued
VIS_MIN_SIDE = 480  # and tiny ones enlarged, so captions do not cover them

# Colour-blind-friendly-ish palette (Okabe-Ito + extras), cycled by class index.
PALETTE = (
    (230, 159, 0), (86, 180, 233), (0, 158, 115), (240, 228, 66), (0, 114, 178),
    (213, 94, 0), (204, 121, 167), (255, 255, 255), (148, 103, 189), (140, 86, 75),
)


def shrink_for_vis(img: np.ndarray, max_side: int = VIS_MAX_SIDE, min_side: int = VIS_MIN_SIDE) -> np.ndarray:
    """A copy of ``img`` resized so its longest side is within [min_side, max_side]: big photos
    shrink (queued previews stay small), tiny ones grow so boxes and captions stay legible."""
    h, w = img.shape[:2]
    s = max(h, w)
    if min_side <= s <= max_side:
        return img.copy()
    r = (max_side if s > max_side else min_side) / s
    resample = Image.BILINEAR if s > max_side else Image.NEAREST
    return np.asarray(Image.fromarray(img).resize((max(1, round(w * r)), max(1, round(h * r))), resample))


def _dashed_rect(draw: ImageDraw.ImageDraw, box: tuple[float, float, float, float], color, width: int,
                 dash: int) -> None:
    x1, y1, x2, y2 = box
    for (ax, ay, bx, by) in ((x1, y1, x2, y1), (x2, y1, x2, y2), (x2, y2, x1, y2), (x1, y2, x1, y1)):
        length = max(abs(bx - ax), abs(by - ay))
        n = max(1, int(length // (2 * dash)) + 1)
        t = np.linspace(0.0, 1.0, 2 * n, endpoint=False)
        for t0 in t[::2]:
            t1 = min(1.0, t0 + dash / max(length, 1e-6))
            draw.line([(ax + (bx - ax) * t0, ay + (by - ay) * t0), (ax + (bx - ax) * t1, ay + (by - ay) * t1)],
                      fill=color, width=width)


def draw_detections(
    img: np.ndarray,
    boxes: np.ndarray,
    scores: np.ndarray | None,
    labels: np.ndarray,
    uncertain: np.ndarray,
    names: list[str],
) -> Image.Image:
    """RGB ``img`` with xyxy ``boxes`` (pixels of ``img``) drawn; uncertain ones dashed.
    ``scores`` None (ground truth): captions carry the class name only."""
    im = Image.fromarray(np.ascontiguousarray(img)).convert("RGB")
    draw = ImageDraw.Draw(im)
    side = max(im.size)
    width = max(2, side // 240)
    try:
        font = ImageFont.load_default(size=max(10, side // 50))
    except TypeError:  # Pillow < 10.1: fixed-size bitmap font
        font = ImageFont.load_default()
    # strongest drawn last, on top
    order = np.arange(len(labels)) if scores is None else np.argsort(np.asarray(scores), kind="stable")
    for k in order:
        x1, y1, x2, y2 = (float(v) for v in boxes[k])
        c = int(labels[k])
        color = PALETTE[c % len(PALETTE)]
        name = names[c] if 0 <= c < len(names) else str(c)
        if uncertain[k]:
            _dashed_rect(draw, (x1, y1, x2, y2), color, width, dash=max(3, 3 * width))
            name += "?"
        else:
            draw.rectangle((x1, y1, x2, y2), outline=color, width=width)
        text = name if scores is None else f"{name} {float(scores[k]):.2f}"
        tb = draw.textbbox((x1, y1), text, font=font)
        ty = y1 - (tb[3] - tb[1]) - 2 if y1 - (tb[3] - tb[1]) - 2 >= 0 else y1
        tb = draw.textbbox((x1, ty), text, font=font)
        draw.rectangle(tb, fill=color)
        draw.text((x1, ty), text, fill=(0, 0, 0), font=font)
    return im


def save_vis(path: Path, img: np.ndarray, scale_xy: tuple[float, float], boxes: np.ndarray, scores: np.ndarray,
             labels: np.ndarray, uncertain: np.ndarray, names: list[str]) -> None:
    """Draw boxes given in original-image pixels on the (possibly shrunk) ``img`` and save JPEG."""
    b = np.asarray(boxes, np.float64).reshape(-1, 4) * np.array([*scale_xy, *scale_xy])
    draw_detections(img, b, scores, labels, uncertain, names).save(path, quality=90)
