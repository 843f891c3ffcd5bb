"""One demo painting: a random composition in the artist's palette, painted over in the artist's texture family
(strokes, dots, hatching, swirls, facets, flat areas, halftone, geometry, grids, crackle, tiles, drips, smooth
glazes), with film grain; a few artists' paintings come out greyscale, as in the real data."""
from __future__ import annotations

import math
from typing import Callable

import cv2
import numpy as np

from .styles import PAINTING_STREAM, REFERENCE_SIDE, Style, painting_variant, stream_rng


def _to_uint8(image: np.ndarray) -> np.ndarray:
    return np.clip(image, 0, 255).astype(np.uint8)


def _luminance(image: np.ndarray) -> np.ndarray:
    return image[..., 0] * 0.114 + image[..., 1] * 0.587 + image[..., 2] * 0.299


def pixels(size: float) -> int:
    return max(1, int(round(size)))


def _colours_at(base: np.ndarray, points: np.ndarray, jitter: float, rng: np.random.Generator) -> np.ndarray:
    """The base colour under each (x, y) point, plus per-point noise."""
    height, width = base.shape[:2]
    xs = np.clip(points[:, 0].astype(int), 0, width - 1)
    ys = np.clip(points[:, 1].astype(int), 0, height - 1)
    return np.clip(base[ys, xs] + rng.normal(0, jitter, (len(points), 3)), 0, 255)


def _random_points(rng: np.random.Generator, count: int, height: int, width: int, margin: float = 0.0):
    return rng.uniform([-margin, -margin], [width + margin, height + margin], (count, 2))


def _draw_segments(canvas: np.ndarray, starts: np.ndarray, ends: np.ndarray, colours: np.ndarray,
                   widths: np.ndarray) -> None:
    for p0, p1, colour, width in zip(np.round(starts).astype(int).tolist(), np.round(ends).astype(int).tolist(),
                                     colours.tolist(), widths.tolist()):
        cv2.line(canvas, tuple(p0), tuple(p1), colour, width, cv2.LINE_AA)


def _draw_polylines(canvas: np.ndarray, paths: np.ndarray, colours: np.ndarray, widths: np.ndarray) -> None:
    for path, colour, width in zip(np.round(paths).astype(np.int32), colours.tolist(), widths.tolist()):
        cv2.polylines(canvas, [path], False, colour, width, cv2.LINE_AA)


def _region_labels(base: np.ndarray, palette: np.ndarray) -> np.ndarray:
    """Index of the nearest palette colour of every pixel: the composition posterised to the palette."""
    distances = ((base[:, :, None, :] - palette[None, None]) ** 2).sum(axis=-1)
    return distances.argmin(axis=-1).astype(np.uint8)


def _outline_mask(labels: np.ndarray, width: float) -> np.ndarray:
    size = pixels(width)
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (size, size))
    return cv2.morphologyEx(labels, cv2.MORPH_GRADIENT, kernel) > 0


def _delaunay_triangles(points: np.ndarray, height: int, width: int) -> np.ndarray:
    """Triangles (n, 3, 2) of the points plus the canvas corners, all inside the canvas."""
    corners = np.array([[0, 0], [width - 1, 0], [0, height - 1], [width - 1, height - 1]], np.float32)
    points = np.concatenate([corners, np.clip(points, 0, [width - 1, height - 1])])
    subdiv = cv2.Subdiv2D((-1, -1, width + 2, height + 2))
    subdiv.insert([(float(x), float(y)) for x, y in points])
    triangles = subdiv.getTriangleList().reshape(-1, 3, 2)
    inside = ((triangles >= -1) & (triangles <= [width + 1, height + 1])).all(axis=(1, 2))
    return triangles[inside]


def _composition(height: int, width: int, palette: np.ndarray, rng: np.random.Generator,
                 n_shapes: tuple[int, int] = (2, 7)) -> np.ndarray:
    """A random layout in the palette: a gradient background and a few large flat shapes."""
    k = len(palette)
    first, second = palette[rng.choice(k, 2, replace=False)]
    angle = rng.uniform(0, 2 * math.pi)
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    ramp = xs * math.cos(angle) + ys * math.sin(angle)
    ramp = (ramp - ramp.min()) / max(float(ramp.max() - ramp.min()), 1.0)
    base = first + (second - first) * ramp[..., None]
    side = min(height, width)
    for _ in range(rng.integers(*n_shapes)):
        colour = (palette[rng.integers(k)] * rng.uniform(0.85, 1.15)).tolist()
        centre = rng.uniform([0, 0], [width, height])
        kind = rng.integers(3)
        if kind == 0:
            axes = rng.uniform(0.1, 0.45, 2) * side
            cv2.ellipse(base, tuple(np.round(centre).astype(int).tolist()), tuple(np.round(axes).astype(int).tolist()),
                        float(rng.uniform(0, 180)), 0, 360, colour, -1)
        elif kind == 1:
            corners = np.sort(rng.uniform(0, 2 * math.pi, rng.integers(3, 8)))
            radii = rng.uniform(0.15, 0.45, len(corners)) * side
            polygon = centre + radii[:, None] * np.stack([np.cos(corners), np.sin(corners)], axis=1)
            cv2.fillPoly(base, [np.round(polygon).astype(np.int32)], colour)
        else:  # a band across the canvas, like a horizon or a field
            left, right = rng.uniform(0, height, 2)
            thickness = rng.uniform(0.1, 0.35) * height
            band = np.array([[0, left], [width, right], [width, right + thickness], [0, left + thickness]])
            cv2.fillPoly(base, [np.round(band).astype(np.int32)], colour)
    return base


# ----------------------------------------------------------------------------------------------------
# Texture families: each turns the composition `base` (float32 BGR) into a painting (uint8 BGR).


def _render_strokes(base: np.ndarray, style: Style, rng: np.random.Generator) -> np.ndarray:
    """Straight brush strokes around the mean angle (brush: long and directional; dabs: short, any way)."""
    height, width = base.shape[:2]
    length, stroke_width = style.stroke_length, style.stroke_width
    count = int(style.density * height * width / max(length * stroke_width, 1.0))
    starts = _random_points(rng, count, height, width, margin=length / 2)
    angles = style.stroke_angle + rng.normal(0, style.angle_spread, count)
    lengths = length * rng.uniform(0.6, 1.4, count)
    ends = starts + lengths[:, None] * np.stack([np.cos(angles), np.sin(angles)], axis=1)
    colours = _colours_at(base, (starts + ends) / 2, style.colour_jitter, rng)
    broken = rng.random(count) < 0.15  # the odd stroke of pure palette colour
    colours[broken] = style.palette[rng.integers(len(style.palette), size=int(broken.sum()))]
    widths = np.maximum(1, np.round(stroke_width * rng.uniform(0.7, 1.3, count))).astype(int)
    canvas = _to_uint8(base)
    _draw_segments(canvas, starts, ends, colours, widths)
    return canvas


def _render_dots(base: np.ndarray, style: Style, rng: np.random.Generator) -> np.ndarray:
    """Pointillism: small round dots of pure palette colours and of the colour beneath, on a light ground."""
    height, width = base.shape[:2]
    radius = max(1, int(round(style.stroke_width / 2)))
    count = int(style.density * height * width / (math.pi * radius ** 2))
    centres = _random_points(rng, count, height, width)
    colours = _colours_at(base, centres, style.colour_jitter, rng)
    pure = rng.random(count) < 0.4
    colours[pure] = style.palette[rng.integers(len(style.palette), size=int(pure.sum()))]
    canvas = _to_uint8(base * 0.5 + 120)
    for (x, y), colour in zip(np.round(centres).astype(int).tolist(), colours.tolist()):
        cv2.circle(canvas, (x, y), radius, colour, -1, cv2.LINE_AA)
    return canvas


def _render_hatching(base: np.ndarray, style: Style, rng: np.random.Generator) -> np.ndarray:
    """Engraving: thin parallel ink lines on paper, denser where the composition is dark, crossed in the
    darkest places."""
    height, width = base.shape[:2]
    length = style.stroke_length
    paper = np.array([205, 222, 235], np.float32) * rng.uniform(0.95, 1.03)
    canvas = _to_uint8(paper * 0.8 + base * 0.2)
    darkness = 1.0 - _luminance(base) / 255.0
    count = int(style.density * height * width / max(length * style.stroke_width, 1.0))
    points = _random_points(rng, count, height, width, margin=length / 2)
    xs = np.clip(points[:, 0].astype(int), 0, width - 1)
    ys = np.clip(points[:, 1].astype(int), 0, height - 1)
    local_darkness = darkness[ys, xs]
    keep = rng.random(count) < 0.15 + 0.85 * local_darkness
    crossed = keep & (local_darkness > 0.45)
    ink = style.palette[np.argmin(_luminance(style.palette))] * 0.35
    for selected, angle in ((keep, style.stroke_angle), (crossed, style.stroke_angle + math.pi / 2)):
        starts = points[selected]
        angles = angle + rng.normal(0, style.angle_spread, len(starts))
        ends = starts + length * np.stack([np.cos(angles), np.sin(angles)], axis=1)
        colours = np.clip(ink * 0.6 + _colours_at(base, starts, style.colour_jitter, rng) * 0.25, 0, 255)
        widths = np.full(len(starts), pixels(style.stroke_width))
        _draw_segments(canvas, starts, ends, colours, widths)
    return canvas


def _render_swirl(base: np.ndarray, style: Style, rng: np.random.Generator) -> np.ndarray:
    """Curved strokes that follow a wavy flow field (amplitude angle_spread, period wavelength)."""
    height, width = base.shape[:2]
    length, steps = style.stroke_length, 6
    waves = [(rng.uniform(0, 2 * math.pi), rng.uniform(0, 2 * math.pi)) for _ in range(2)]

    def flow_angle(points: np.ndarray) -> np.ndarray:
        angle = np.full(len(points), style.stroke_angle)
        for direction, phase in waves:
            along = points[:, 0] * math.cos(direction) + points[:, 1] * math.sin(direction)
            angle += style.angle_spread * np.sin(2 * math.pi * along / style.wavelength + phase)
        return angle

    count = int(style.density * height * width / max(length * style.stroke_width, 1.0))
    paths = np.empty((count, steps + 1, 2))
    paths[:, 0] = _random_points(rng, count, height, width, margin=length / 2)
    for step in range(steps):
        angle = flow_angle(paths[:, step])
        paths[:, step + 1] = paths[:, step] + (length / steps) * np.stack([np.cos(angle), np.sin(angle)], axis=1)
    colours = _colours_at(base, paths[:, 0], style.colour_jitter, rng)
    widths = np.maximum(1, np.round(style.stroke_width * rng.uniform(0.7, 1.3, count))).astype(int)
    canvas = _to_uint8(base)
    _draw_polylines(canvas, paths, colours, widths)
    return canvas


def _render_facets(base: np.ndarray, style: Style, rng: np.random.Generator) -> np.ndarray:
    """Cubist facets: flat-shaded triangles (size stroke_length) with dark edges."""
    height, width = base.shape[:2]
    count = max(4, int(height * width / style.stroke_length ** 2))
    triangles = _delaunay_triangles(_random_points(rng, count, height, width), height, width)
    colours = _colours_at(base, triangles.mean(axis=1), style.colour_jitter, rng)
    colours = np.clip(colours * rng.uniform(0.7, 1.25, (len(triangles), 1)), 0, 255)
    canvas = _to_uint8(base)
    edge_width = pixels(style.outline)
    for triangle, colour in zip(np.round(triangles).astype(np.int32), colours.tolist()):
        cv2.fillConvexPoly(canvas, triangle, colour, cv2.LINE_AA)
        cv2.polylines(canvas, [triangle], True, [c * 0.45 for c in colour], edge_width, cv2.LINE_AA)
    return canvas


def _render_flat(base: np.ndarray, style: Style, rng: np.random.Generator) -> np.ndarray:
    """Flat areas of pure palette colour with dark outlines."""
    labels = _region_labels(base, style.palette)
    canvas = style.palette[labels]
    canvas[_outline_mask(labels, style.outline)] = style.palette[np.argmin(_luminance(style.palette))] * 0.3
    return _to_uint8(canvas)


def _render_halftone(base: np.ndarray, style: Style, rng: np.random.Generator) -> np.ndarray:
    """Pop-art print: flat saturated areas under a screen of dots (spacing stroke_length, at the artist's
    angle) that grow where the composition is dark, with a misregistered black outline."""
    height, width = base.shape[:2]
    labels = _region_labels(base, style.palette)
    canvas = style.palette[labels]
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    cos, sin = math.cos(style.stroke_angle), math.sin(style.stroke_angle)
    spacing = max(3.0, style.stroke_length)
    along = (xs * cos + ys * sin) % spacing - spacing / 2
    across = (-xs * sin + ys * cos) % spacing - spacing / 2
    radius = spacing * 0.55 * np.sqrt(1.0 - _luminance(base) / 255.0)
    canvas[np.hypot(along, across) < radius] *= 0.35
    shift = rng.integers(-3, 4, 2) * max(1, int(style.outline / 2))
    outline = np.roll(_outline_mask(labels, style.outline), tuple(shift.tolist()), axis=(0, 1))
    canvas[outline] = 15
    return _to_uint8(canvas)


def _render_geometric(base: np.ndarray, style: Style, rng: np.random.Generator) -> np.ndarray:
    """Abstract shapes (size stroke_length) on a light ground: circles, rings, bars at the artist's angle,
    thin lines and triangles, in the artist's mix."""
    height, width = base.shape[:2]
    canvas = _to_uint8(np.array([225, 235, 240], np.float32) * 0.75 + base * 0.25)
    size = style.stroke_length
    count = max(3, int(style.density * 3 * height * width / size ** 2))
    kinds = rng.choice(5, size=count, p=np.array(style.shape_weights))
    line_width = pixels(style.stroke_width)
    for kind in kinds.tolist():
        colour = style.palette[rng.integers(len(style.palette))] if rng.random() < 0.85 else np.zeros(3)
        colour = np.clip(colour + rng.normal(0, style.colour_jitter, 3), 0, 255).tolist()
        centre = rng.uniform([0, 0], [width, height])
        extent = size * rng.uniform(0.3, 1.0)
        angle = style.stroke_angle + rng.normal(0, style.angle_spread)
        direction = np.array([math.cos(angle), math.sin(angle)])
        if kind in (0, 1):  # circle, ring
            cv2.circle(canvas, tuple(np.round(centre).astype(int).tolist()), pixels(extent / 2), colour,
                       -1 if kind == 0 else line_width, cv2.LINE_AA)
        elif kind == 2:  # bar
            box = cv2.boxPoints(((float(centre[0]), float(centre[1])), (float(extent * 1.6), float(extent * 0.4)),
                                 math.degrees(angle)))
            cv2.fillConvexPoly(canvas, np.round(box).astype(np.int32), colour, cv2.LINE_AA)
        elif kind == 3:  # line
            ends = np.round([centre - direction * extent, centre + direction * extent]).astype(int)
            cv2.line(canvas, tuple(ends[0].tolist()), tuple(ends[1].tolist()), colour, line_width, cv2.LINE_AA)
        else:  # triangle
            corners = centre + extent / 2 * np.stack([np.cos(angle + np.array([0, 2.1, 4.2])),
                                                      np.sin(angle + np.array([0, 2.1, 4.2]))], axis=1)
            cv2.fillConvexPoly(canvas, np.round(corners).astype(np.int32), colour, cv2.LINE_AA)
    return canvas


def _render_grid(base: np.ndarray, style: Style, rng: np.random.Generator) -> np.ndarray:
    """Rectangles from recursive splits (smallest side about stroke_length), a `density` share of them in
    palette colours and the rest off-white, divided by dark lines `outline` wide."""
    height, width = base.shape[:2]
    canvas = np.zeros((height, width, 3), np.uint8)
    smallest = max(4.0, style.stroke_length)
    pending, cells = [(0, 0, width, height)], []
    while pending:
        x, y, w, h = pending.pop()
        long_side = max(w, h)
        if long_side < 2 * smallest or (long_side < 4 * smallest and rng.random() < 0.4):
            cells.append((x, y, w, h))
            continue
        cut = int(long_side * rng.uniform(0.25, 0.75))
        pending += ([(x, y, cut, h), (x + cut, y, w - cut, h)] if w >= h else
                    [(x, y, w, cut), (x, y + cut, w, h - cut)])
    line_colour = (style.palette[np.argmin(_luminance(style.palette))] * 0.2).tolist()
    for x, y, w, h in cells:
        if rng.random() < style.density:
            colour = style.palette[rng.integers(len(style.palette))]
        else:
            colour = np.array([232, 238, 240]) * rng.uniform(0.9, 1.02)
        cv2.rectangle(canvas, (x, y), (x + w, y + h), colour.tolist(), -1)
        cv2.rectangle(canvas, (x, y), (x + w, y + h), line_colour, pixels(style.outline))
    return canvas


def _render_crackle(base: np.ndarray, style: Style, rng: np.random.Generator) -> np.ndarray:
    """An old panel: a softened composition with gold, yellowed varnish and a network of fine cracks
    (cells about stroke_length across)."""
    height, width = base.shape[:2]
    canvas = cv2.GaussianBlur(base, (0, 0), max(0.5, style.stroke_width)) * np.array([0.8, 0.95, 1.0], np.float32)
    points = np.clip(_random_points(rng, max(4, int(height * width / style.stroke_length ** 2)), height, width),
                     0, [width - 1, height - 1])
    subdiv = cv2.Subdiv2D((-1, -1, width + 2, height + 2))
    subdiv.insert([(float(x), float(y)) for x, y in points])
    facets, _ = subdiv.getVoronoiFacetList([])
    cracks = np.zeros((height, width), np.uint8)
    cv2.polylines(cracks, [np.round(facet).astype(np.int32) for facet in facets], True, 255, 1, cv2.LINE_AA)
    canvas *= 1.0 - 0.45 * (cracks[..., None] / 255.0)
    return _to_uint8(canvas)


def _render_tiles(base: np.ndarray, style: Style, rng: np.random.Generator) -> np.ndarray:
    """Mosaic: patches of small square tiles (side stroke_length) in gold and palette colours with dark
    joints, over the composition."""
    height, width = base.shape[:2]
    size = max(3, int(round(style.stroke_length)))
    rows, columns = height // size + 1, width // size + 2
    ys, xs = np.mgrid[0:height, 0:width]
    shifted_xs = xs + (ys // size % 2) * (size // 2)  # brick-like rows
    row, column = ys // size, shifted_xs // size
    patches = rng.random((rows // 4 + 1, columns // 4 + 1)) < style.density  # tiles come in patches of 4x4
    tiled = patches[row // 4, column // 4] & (rng.random((rows, columns)) < 0.9)[row, column]
    # Half the tiles are gold (palette colour 0), the rest any palette colour.
    palette_index = np.where(rng.random((rows, columns)) < 0.5, 0,
                             rng.integers(len(style.palette), size=(rows, columns)))
    tile_colours = style.palette[palette_index] * rng.uniform(0.8, 1.15, (rows, columns, 1))
    joint = (ys % size < pixels(style.outline)) | (shifted_xs % size < pixels(style.outline))
    canvas = np.where(tiled[..., None], np.where(joint[..., None], 40.0, tile_colours[row, column]), base)
    return _to_uint8(canvas)


def _render_drips(base: np.ndarray, style: Style, rng: np.random.Generator) -> np.ndarray:
    """Poured paint: long wandering curves (turn noise angle_spread) and splatter on a plain ground."""
    height, width = base.shape[:2]
    canvas = _to_uint8(np.array([190, 200, 205], np.float32) * 0.65 + base * 0.35)
    length, points_per_curve = style.stroke_length, 24
    count = max(3, int(style.density * height * width / (length * max(style.stroke_width, 1.0) * 4)))
    headings = rng.uniform(0, 2 * math.pi, (count, 1)) + np.cumsum(
        rng.normal(0, style.angle_spread, (count, points_per_curve)), axis=1)
    steps = (length / points_per_curve) * np.stack([np.cos(headings), np.sin(headings)], axis=2)
    paths = _random_points(rng, count, height, width)[:, None] + np.cumsum(steps, axis=1)
    colours = style.palette[rng.integers(len(style.palette), size=count)]
    colours[rng.random(count) < 0.2] = 20  # black enamel
    widths = np.maximum(1, np.round(style.stroke_width * rng.uniform(0.4, 1.5, count))).astype(int)
    _draw_polylines(canvas, paths, colours, widths)
    splatter = paths[rng.integers(count, size=count * 3), rng.integers(points_per_curve, size=count * 3)]
    splatter += rng.normal(0, length / 8, splatter.shape)
    for (x, y), colour in zip(np.round(splatter).astype(int).tolist(),
                              style.palette[rng.integers(len(style.palette), size=len(splatter))].tolist()):
        cv2.circle(canvas, (x, y), pixels(style.stroke_width * rng.uniform(0.3, 1.0)), colour, -1, cv2.LINE_AA)
    return canvas


def _render_smooth(base: np.ndarray, style: Style, rng: np.random.Generator) -> np.ndarray:
    """Old-master finish: soft blended glazes (faint long strokes, then blurred) with a spotlight shadow."""
    height, width = base.shape[:2]
    softened = cv2.GaussianBlur(base, (0, 0), max(1.0, style.stroke_length / 4))
    canvas = _render_strokes(softened, style, rng).astype(np.float32)
    canvas = cv2.GaussianBlur(canvas, (0, 0), max(0.5, style.stroke_width / 3))
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    light_x, light_y = rng.uniform([0.2 * width, 0.1 * height], [0.8 * width, 0.6 * height])
    distance = np.hypot(xs - light_x, ys - light_y) / math.hypot(width, height)
    return _to_uint8(canvas * np.clip(1.0 - style.shadow * 2.0 * distance, 0.05, 1.0)[..., None])


_RENDERERS: dict[str, Callable[[np.ndarray, Style, np.random.Generator], np.ndarray]] = {
    "brush": _render_strokes, "dabs": _render_strokes, "dots": _render_dots, "hatching": _render_hatching,
    "swirl": _render_swirl, "facets": _render_facets, "flat": _render_flat, "halftone": _render_halftone,
    "geometric": _render_geometric, "grid": _render_grid, "crackle": _render_crackle, "tiles": _render_tiles,
    "drips": _render_drips, "smooth": _render_smooth,
}


def render_painting(style: Style, seed: int, artist_index: int, painting_index: int,
                    min_side: int, max_side: int) -> np.ndarray:
    """One painting of the artist: uint8 BGR (h, w, 3), or (h, w) when it comes out greyscale."""
    rng = stream_rng(seed, PAINTING_STREAM, artist_index, painting_index)
    aspect = math.exp(rng.uniform(math.log(0.6), math.log(1.6)))  # width / height
    long_side = int(rng.integers(min_side, max_side + 1))
    width, height = (long_side, pixels(long_side / aspect)) if aspect >= 1 else (pixels(long_side * aspect),
                                                                                   long_side)
    variant = painting_variant(style, rng, unit=long_side / REFERENCE_SIDE)
    n_shapes = (6, 16) if variant.family in ("flat", "halftone") else (2, 7)
    base = _composition(height, width, variant.palette, rng, n_shapes)
    canvas = _RENDERERS[variant.family](base, variant, rng).astype(np.float32)
    canvas += rng.normal(0, variant.grain, (height, width, 1)).astype(np.float32)
    painting = _to_uint8(canvas)
    if rng.random() < variant.greyscale_probability:
        return cv2.cvtColor(painting, cv2.COLOR_BGR2GRAY)
    return painting
