"""A built-in procedural demo dataset in the competition's layout, so the whole pipeline runs (and is
tested) without the competition files and without downloads.

Train images are whole "paintings"; test images are crops of about a quarter of the area of held-out
paintings that never appear in train, as in the real competition. Each of the 50 artists paints in a
seeded style (texture family, palette, stroke length, width, direction and density), while every
painting gets its own random composition: the artist is recognisable from local texture, not from
layout, so a quarter crop still carries the signal. solution.csv holds the true artist of every test id
so that demo submissions can be scored; test_crops.csv records where each crop was cut.

    python -m src.demo_data --root inputs/demo --seed 0 --scale 0.1
"""
from __future__ import annotations

import argparse
import json
import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Optional, Sequence

import cv2
import numpy as np
import pandas as pd

from .errors import UserError
from .io_utils import write_csv, write_json

DEMO_MARKER = "DEMO.json"
FORMAT_VERSION = 1
JPEG_QUALITY = 90

# The competition's artists and train counts, in the order of its class frequency (sum 5,911).
ARTIST_COUNTS: dict[str, int] = {
    "Vincent van Gogh": 629, "Edgar Degas": 489, "Pablo Picasso": 303, "Pierre-Auguste Renoir": 233,
    "Albrecht Du rer": 220, "Paul Gauguin": 220, "Francisco Goya": 204, "Rembrandt": 181, "Titian": 173,
    "Marc Chagall": 173, "Alfred Sisley": 165, "Paul Klee": 142, "Rene Magritte": 137, "Andy Warhol": 132,
    "Amedeo Modigliani": 132, "Henri Matisse": 121, "Sandro Botticelli": 120, "Mikhail Vrubel": 118,
    "Hieronymus Bosch": 115, "Leonardo da Vinci": 101, "Salvador Dali": 99, "Peter Paul Rubens": 97,
    "Kazimir Malevich": 91, "Pieter Bruegel": 85, "Frida Kahlo": 84, "Diego Velazquez": 81, "Joan Miro": 76,
    "Andrei Rublev": 74, "Raphael": 73, "Giotto di Bondone": 72, "Gustav Klimt": 69, "El Greco": 65,
    "Jan van Eyck": 64, "Camille Pissarro": 64, "Edouard Manet": 62, "Henri de Toulouse-Lautrec": 61,
    "Vasiliy Kandinskiy": 60, "Claude Monet": 59, "Piet Mondrian": 59, "Henri Rousseau": 52, "Diego Rivera": 50,
    "William Turner": 44, "Edvard Munch": 44, "Gustave Courbet": 42, "Michelangelo": 34, "Paul Cezanne": 33,
    "Caravaggio": 32, "Georges Seurat": 30, "Eugene Delacroix": 26, "Jackson Pollock": 21,
}

# name -> (years, genre, nationality, texture family). The family is a loose nod to the painter; the
# seed decides everything else about the style.
_ARTIST_FACTS: dict[str, tuple[str, str, str, str]] = {
    "Vincent van Gogh": ("1853 - 1890", "Post-Impressionism", "Dutch", "swirl"),
    "Edgar Degas": ("1834 - 1917", "Impressionism", "French", "dabs"),
    "Pablo Picasso": ("1881 - 1973", "Cubism", "Spanish", "facets"),
    "Pierre-Auguste Renoir": ("1841 - 1919", "Impressionism", "French", "dabs"),
    "Albrecht Du rer": ("1471 - 1528", "Northern Renaissance", "German", "hatching"),
    "Paul Gauguin": ("1848 - 1903", "Symbolism,Post-Impressionism", "French", "flat"),
    "Francisco Goya": ("1746 - 1828", "Romanticism", "Spanish", "brush"),
    "Rembrandt": ("1606 - 1669", "Baroque", "Dutch", "smooth"),
    "Titian": ("1488 - 1576", "High Renaissance,Mannerism", "Italian", "smooth"),
    "Marc Chagall": ("1887 - 1985", "Primitivism", "French,Jewish,Belarusian", "swirl"),
    "Alfred Sisley": ("1839 - 1899", "Impressionism", "French,British", "dabs"),
    "Paul Klee": ("1879 - 1940", "Expressionism,Abstractionism,Surrealism", "German,Swiss", "grid"),
    "Rene Magritte": ("1898 - 1967", "Surrealism,Impressionism", "Belgian", "smooth"),
    "Andy Warhol": ("1928 - 1987", "Pop Art", "American", "halftone"),
    "Amedeo Modigliani": ("1884 - 1920", "Expressionism", "Italian", "flat"),
    "Henri Matisse": ("1869 - 1954", "Impressionism,Post-Impressionism,Fauvism", "French", "flat"),
    "Sandro Botticelli": ("1445 - 1510", "Early Renaissance", "Italian", "hatching"),
    "Mikhail Vrubel": ("1856 - 1910", "Symbolism", "Russian", "facets"),
    "Hieronymus Bosch": ("1450 - 1516", "Northern Renaissance", "Dutch", "brush"),
    "Leonardo da Vinci": ("1452 - 1519", "High Renaissance", "Italian", "smooth"),
    "Salvador Dali": ("1904 - 1989", "Surrealism", "Spanish", "smooth"),
    "Peter Paul Rubens": ("1577 - 1640", "Baroque", "Flemish", "brush"),
    "Kazimir Malevich": ("1879 - 1935", "Suprematism", "Russian", "geometric"),
    "Pieter Bruegel": ("1525 - 1569", "Northern Renaissance", "Flemish", "brush"),
    "Frida Kahlo": ("1907 - 1954", "Primitivism,Surrealism", "Mexican", "flat"),
    "Diego Velazquez": ("1599 - 1660", "Baroque", "Spanish", "brush"),
    "Joan Miro": ("1893 - 1983", "Surrealism", "Spanish", "geometric"),
    "Andrei Rublev": ("1360 - 1430", "Byzantine Art", "Russian", "crackle"),
    "Raphael": ("1483 - 1520", "High Renaissance", "Italian", "smooth"),
    "Giotto di Bondone": ("1267 - 1337", "Proto Renaissance", "Italian", "crackle"),
    "Gustav Klimt": ("1862 - 1918", "Symbolism,Art Nouveau", "Austrian", "tiles"),
    "El Greco": ("1541 - 1614", "Mannerism", "Spanish,Greek", "brush"),
    "Jan van Eyck": ("1390 - 1441", "Northern Renaissance", "Flemish", "crackle"),
    "Camille Pissarro": ("1830 - 1903", "Impressionism,Post-Impressionism", "French", "dabs"),
    "Edouard Manet": ("1832 - 1883", "Realism,Impressionism", "French", "brush"),
    "Henri de Toulouse-Lautrec": ("1864 - 1901", "Post-Impressionism", "French", "flat"),
    "Vasiliy Kandinskiy": ("1866 - 1944", "Expressionism,Abstractionism", "Russian", "geometric"),
    "Claude Monet": ("1840 - 1926", "Impressionism", "French", "dabs"),
    "Piet Mondrian": ("1872 - 1944", "Neoplasticism", "Dutch", "grid"),
    "Henri Rousseau": ("1844 - 1910", "Primitivism", "French", "flat"),
    "Diego Rivera": ("1886 - 1957", "Social Realism,Muralism", "Mexican", "flat"),
    "William Turner": ("1775 - 1851", "Romanticism", "British", "swirl"),
    "Edvard Munch": ("1863 - 1944", "Symbolism,Expressionism", "Norwegian", "swirl"),
    "Gustave Courbet": ("1819 - 1877", "Realism", "French", "brush"),
    "Michelangelo": ("1475 - 1564", "High Renaissance", "Italian", "hatching"),
    "Paul Cezanne": ("1839 - 1906", "Post-Impressionism", "French", "facets"),
    "Caravaggio": ("1571 - 1610", "Baroque", "Italian", "smooth"),
    "Georges Seurat": ("1859 - 1891", "Post-Impressionism", "French", "dots"),
    "Eugene Delacroix": ("1798 - 1863", "Romanticism", "French", "brush"),
    "Jackson Pollock": ("1912 - 1956", "Abstract Expressionism", "American", "drips"),
}

# Artists whose paintings are sometimes greyscale (prints, drawings, grisailles), as in the real data.
_GREYSCALE_PROBABILITY = {"Albrecht Du rer": 0.7, "Francisco Goya": 0.4, "Rembrandt": 0.25}

# Ranges the seeded style parameters are drawn from. Lengths and widths are pixels on a painting whose
# long side is _REFERENCE_SIDE; each family's renderer says what the parameters mean for it.
_REFERENCE_SIDE = 320
_DEFAULT_RANGES = dict(length=(10, 30), width=(2, 5), spread=(0.2, 0.6), density=(1.0, 2.0),
                       jitter=(6, 16), grain=(2, 6), outline=(1.5, 3.5), wavelength=(60, 140),
                       shadow=(0.0, 0.3), saturation=(0.3, 0.85), value=(0.4, 0.85))
_FAMILY_RANGES: dict[str, dict[str, tuple[float, float]]] = {
    "brush": dict(length=(18, 45), width=(3, 7), spread=(0.08, 0.45), density=(1.5, 2.5), jitter=(8, 18)),
    "dabs": dict(length=(4, 10), width=(4, 8), spread=(0.6, 1.6), density=(1.6, 2.6), jitter=(14, 28),
                 value=(0.6, 0.95)),
    "dots": dict(width=(2.5, 5), density=(1.5, 2.5), jitter=(20, 40), value=(0.55, 0.95)),
    "hatching": dict(length=(8, 20), width=(1, 1.8), spread=(0.03, 0.15), density=(0.5, 0.9),
                     saturation=(0.1, 0.5)),
    "swirl": dict(length=(14, 30), width=(2.5, 5.5), spread=(0.6, 1.4), density=(1.5, 2.5), jitter=(8, 18)),
    "facets": dict(length=(18, 45), outline=(1, 2.5), jitter=(6, 14)),
    "flat": dict(outline=(2, 5), saturation=(0.5, 0.9)),
    "halftone": dict(length=(5, 10), outline=(2, 4), saturation=(0.7, 1.0), value=(0.7, 1.0)),
    "geometric": dict(length=(20, 60), width=(1.5, 4), density=(0.5, 1.2), saturation=(0.6, 0.95)),
    "grid": dict(length=(25, 70), outline=(2.5, 7), density=(0.3, 0.7), saturation=(0.7, 0.95),
                 value=(0.6, 0.95)),
    "crackle": dict(length=(10, 25), grain=(3, 7), shadow=(0.2, 0.5), value=(0.35, 0.7)),
    "tiles": dict(length=(6, 14), outline=(1, 2), density=(0.4, 0.8)),
    "drips": dict(length=(40, 120), width=(1, 3.5), spread=(0.3, 0.9), density=(0.5, 1.2)),
    "smooth": dict(length=(20, 50), width=(4, 9), spread=(0.1, 0.6), jitter=(3, 8), grain=(2, 8),
                   shadow=(0.3, 0.8), value=(0.25, 0.6)),
}
_GOLD_HSV = (45.0, 0.7, 0.85)

# Independent random streams: seeds are (seed, stream, ...) so no draw depends on another's order.
_STYLE_STREAM, _PAINTING_STREAM, _CROP_STREAM, _ORDER_STREAM = range(4)


def _rng(seed: int, *keys: int) -> np.random.Generator:
    return np.random.default_rng([seed, *keys])


@dataclass(frozen=True)
class Style:
    """An artist's seeded style; each painting renders a slightly jittered copy."""

    family: str
    palette: np.ndarray  # (k, 3) BGR float32, 0-255
    stroke_length: float
    stroke_width: float
    stroke_angle: float  # radians, mean direction of strokes, hatching, screens and bars
    angle_spread: float  # radians, std of stroke direction around the mean (swirl: flow-field amplitude)
    density: float  # how many times the marks cover the canvas (grid, tiles: fraction of coloured cells)
    colour_jitter: float  # std of each mark's colour around the colour beneath it
    grain: float  # std of the fine per-pixel noise
    outline: float  # width of outlines, facet edges, grid lines and tile borders
    wavelength: float  # period of the swirl flow field
    shadow: float  # strength of the darkening away from a light source (0: none)
    shape_weights: tuple[float, ...]  # geometric: how often circle, ring, bar, line, triangle appear
    greyscale_probability: float


def _hsv_to_bgr(hsv: np.ndarray) -> np.ndarray:
    """HSV (hue in degrees, saturation and value in 0-1) rows -> BGR rows in 0-255."""
    hsv = np.array(hsv, np.float32).reshape(1, -1, 3)
    hsv[..., 0] %= 360.0
    hsv[..., 1:] = np.clip(hsv[..., 1:], 0.0, 1.0)
    return (cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR) * 255.0).reshape(-1, 3)


def artist_style(seed: int, artist_index: int) -> Style:
    """The style of the artist at `artist_index` in ARTIST_COUNTS, a pure function of (seed, index)."""
    name = list(ARTIST_COUNTS)[artist_index]
    family = _ARTIST_FACTS[name][3]
    ranges = {**_DEFAULT_RANGES, **_FAMILY_RANGES[family]}
    rng = _rng(seed, _STYLE_STREAM, artist_index)

    def draw(key: str) -> float:
        return float(rng.uniform(*ranges[key]))

    # Golden-ratio hue steps keep neighbouring artists (and artists of one family) apart in hue.
    hue = 360.0 * ((_rng(seed, _STYLE_STREAM).random() + artist_index * 0.618034) % 1.0)
    hue_spread = rng.uniform(8, 60)
    saturation, value = draw("saturation"), draw("value")
    n_colours = 5
    palette_hsv = np.stack([hue + rng.normal(0, hue_spread, n_colours),
                            saturation + rng.normal(0, 0.15, n_colours),
                            value + rng.normal(0, 0.18, n_colours)], axis=1)
    if rng.random() < 0.4:  # a complementary accent
        palette_hsv[-1, 0] = hue + 180.0
    if family in ("crackle", "tiles"):
        palette_hsv[0] = _GOLD_HSV
    return Style(
        family=family, palette=_hsv_to_bgr(palette_hsv), stroke_length=draw("length"),
        stroke_width=draw("width"), stroke_angle=float(rng.uniform(0, math.pi)), angle_spread=draw("spread"),
        density=draw("density"), colour_jitter=draw("jitter"), grain=draw("grain"), outline=draw("outline"),
        wavelength=draw("wavelength"), shadow=draw("shadow"),
        shape_weights=tuple(float(w) for w in rng.dirichlet(np.full(5, 0.7))),
        greyscale_probability=_GREYSCALE_PROBABILITY.get(name, 0.0))


def _painting_variant(style: Style, rng: np.random.Generator, unit: float) -> Style:
    """Per-painting jitter of the style, with lengths converted to this painting's pixels."""
    def vary(x: float) -> float:
        return x * float(rng.uniform(0.8, 1.25))

    hsv = cv2.cvtColor(style.palette.reshape(1, -1, 3) / 255.0, cv2.COLOR_BGR2HSV).reshape(-1, 3)
    hsv[:, 0] += rng.normal(0, 10) + rng.normal(0, 4, len(hsv))  # hue drifts as a whole and per colour
    hsv[:, 1:] *= rng.uniform(0.85, 1.15, 2)
    return replace(
        style, palette=_hsv_to_bgr(hsv),
        stroke_length=vary(style.stroke_length) * unit, stroke_width=vary(style.stroke_width) * unit,
        stroke_angle=style.stroke_angle + float(rng.normal(0, 0.12)), angle_spread=vary(style.angle_spread),
        density=vary(style.density), colour_jitter=vary(style.colour_jitter), grain=vary(style.grain),
        outline=vary(style.outline) * unit, wavelength=vary(style.wavelength) * unit, shadow=vary(style.shadow))


# ----------------------------------------------------------------------------------------------------
# Drawing helpers


def _to_uint8(image: np.ndarray) -> np.ndarray:
    return np.clip(image, 0, 255).astype(np.uint8)


def _luminance(image: np.ndarray) -> np.ndarray:
    return image[..., 0] * 0.114 + image[..., 1] * 0.587 + image[..., 2] * 0.299


def _pixels(size: float) -> int:
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
    size = _pixels(width)
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
        widths = np.full(len(starts), _pixels(style.stroke_width))
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
    edge_width = _pixels(style.outline)
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
    line_width = _pixels(style.stroke_width)
    for kind in kinds.tolist():
        colour = style.palette[rng.integers(len(style.palette))] if rng.random() < 0.85 else np.zeros(3)
        colour = np.clip(colour + rng.normal(0, style.colour_jitter, 3), 0, 255).tolist()
        centre = rng.uniform([0, 0], [width, height])
        extent = size * rng.uniform(0.3, 1.0)
        angle = style.stroke_angle + rng.normal(0, style.angle_spread)
        direction = np.array([math.cos(angle), math.sin(angle)])
        if kind in (0, 1):  # circle, ring
            cv2.circle(canvas, tuple(np.round(centre).astype(int).tolist()), _pixels(extent / 2), colour,
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
        cv2.rectangle(canvas, (x, y), (x + w, y + h), line_colour, _pixels(style.outline))
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
    joint = (ys % size < _pixels(style.outline)) | (shifted_xs % size < _pixels(style.outline))
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
        cv2.circle(canvas, (x, y), _pixels(style.stroke_width * rng.uniform(0.3, 1.0)), colour, -1, cv2.LINE_AA)
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
    rng = _rng(seed, _PAINTING_STREAM, artist_index, painting_index)
    aspect = math.exp(rng.uniform(math.log(0.6), math.log(1.6)))  # width / height
    long_side = int(rng.integers(min_side, max_side + 1))
    width, height = (long_side, _pixels(long_side / aspect)) if aspect >= 1 else (_pixels(long_side * aspect),
                                                                                   long_side)
    variant = _painting_variant(style, rng, unit=long_side / _REFERENCE_SIDE)
    n_shapes = (6, 16) if variant.family in ("flat", "halftone") else (2, 7)
    base = _composition(height, width, variant.palette, rng, n_shapes)
    canvas = _RENDERERS[variant.family](base, variant, rng).astype(np.float32)
    canvas += rng.normal(0, variant.grain, (height, width, 1)).astype(np.float32)
    painting = _to_uint8(canvas)
    if rng.random() < variant.greyscale_probability:
        return cv2.cvtColor(painting, cv2.COLOR_BGR2GRAY)
    return painting


def _crop_box(seed: int, artist_index: int, painting_index: int, crop_index: int,
              height: int, width: int) -> tuple[int, int, int, int]:
    """(x, y, w, h) of a crop covering about a quarter of the painting, at a random position."""
    rng = _rng(seed, _CROP_STREAM, artist_index, painting_index, crop_index)
    area = rng.uniform(0.2, 0.3)
    width_fraction = min(0.9, math.sqrt(area) * math.exp(rng.uniform(-0.15, 0.15)))
    crop_w = _pixels(width * width_fraction)
    crop_h = min(height, _pixels(height * area / width_fraction))
    x = int(rng.integers(0, width - crop_w + 1))
    y = int(rng.integers(0, height - crop_h + 1))
    return x, y, crop_w, crop_h


# ----------------------------------------------------------------------------------------------------
# The dataset


def demo_counts(n_artists: int = 50, scale: float = 0.1, min_per_artist: int = 6,
                test_fraction: float = 0.25) -> dict[str, tuple[int, int]]:
    """artist -> (train paintings, held-out paintings) of the demo dataset."""
    counts = {}
    for name, count in list(ARTIST_COUNTS.items())[:n_artists]:
        train = max(min_per_artist, round(count * scale))
        counts[name] = (train, max(1, round(train * test_fraction)))
    return counts


def _validate(params: dict) -> None:
    problems = [
        (not 1 <= params["n_artists"] <= len(ARTIST_COUNTS), f"n_artists must be 1..{len(ARTIST_COUNTS)}"),
        (params["seed"] < 0, "seed must be >= 0"),
        (params["scale"] <= 0, "scale must be > 0"),
        (params["min_per_artist"] < 1, "min_per_artist must be >= 1"),
        (params["crops_per_test_painting"] < 1, "crops_per_test_painting must be >= 1"),
        (params["test_fraction"] <= 0, "test_fraction must be > 0"),
        (not 32 <= params["min_side"] <= params["max_side"], "need 32 <= min_side <= max_side"),
    ]
    for failed, message in problems:
        if failed:
            raise ValueError(f"generate_demo_dataset: {message}")


def _read_manifest(root: Path) -> Optional[dict]:
    try:
        return json.loads((root / DEMO_MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _remove_previous_demo(root: Path) -> None:
    """Delete the files of an earlier demo generation, train.csv first and DEMO.json next, so that a run
    killed half-way is never taken for finished data nor for real competition data."""
    for name in ("train.csv", DEMO_MARKER, "test.csv", "sample_submission.csv", "solution.csv", "test_crops.csv",
                 "artists_info.csv"):
        (root / name).unlink(missing_ok=True)
    for pattern in ("train/[0-9]*.jpg", "test/TEST_*.jpg"):
        for path in root.glob(pattern):
            path.unlink()


def _write_jpeg(path: Path, image: np.ndarray) -> None:
    if not cv2.imwrite(str(path), image, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY]):
        raise OSError(f"cannot write {path}")


def generate_demo_dataset(root, seed: int = 0, scale: float = 0.1, min_per_artist: int = 6,
                          n_artists: int = 50, crops_per_test_painting: int = 2,
                          test_fraction: float = 0.25, min_side: int = 192, max_side: int = 448) -> Path:
    """Write the demo dataset under `root` and return it as a Path; returns at once when `root` already
    holds a finished demo dataset made with the same arguments.

    Files: train.csv, test.csv, sample_submission.csv, solution.csv (true artist of each test id),
    test_crops.csv (source painting and crop box of each test id), artists_info.csv, train/*.jpg,
    test/*.jpg and, written last, DEMO.json (the arguments and counts). The same arguments give
    byte-identical CSVs and identical pixels.
    """
    root = Path(root)
    params = dict(seed=int(seed), scale=float(scale), min_per_artist=int(min_per_artist), n_artists=int(n_artists),
                  crops_per_test_painting=int(crops_per_test_painting), test_fraction=float(test_fraction),
                  min_side=int(min_side), max_side=int(max_side))
    _validate(params)
    manifest = _read_manifest(root)
    if manifest is not None:
        if (manifest.get("format_version") == FORMAT_VERSION and manifest.get("params") == params
                and (root / "train.csv").is_file()):
            return root
        _remove_previous_demo(root)
    elif (root / "train.csv").is_file():
        raise UserError(f"{root}: holds a train.csv but no {DEMO_MARKER}, so it is not demo data; "
                        "refusing to overwrite it: choose another folder for the demo data")
    (root / "train").mkdir(parents=True, exist_ok=True)
    (root / "test").mkdir(parents=True, exist_ok=True)

    names = list(ARTIST_COUNTS)[:n_artists]
    counts = demo_counts(n_artists, scale, min_per_artist, test_fraction)
    # Paintings are numbered per artist: train ones first, then the held-out ones.
    train_paintings = [(a, p) for a, name in enumerate(names) for p in range(counts[name][0])]
    test_crops = [(a, counts[name][0] + p, c) for a, name in enumerate(names) for p in range(counts[name][1])
                  for c in range(crops_per_test_painting)]
    train_paintings = [train_paintings[i] for i in _rng(seed, _ORDER_STREAM, 0).permutation(len(train_paintings))]
    test_crops = [test_crops[i] for i in _rng(seed, _ORDER_STREAM, 1).permutation(len(test_crops))]
    digits = max(4, len(str(len(train_paintings) - 1)))
    train_ids = {painting: i for i, painting in enumerate(train_paintings)}
    test_ids = {crop: f"TEST_{i:05d}" for i, crop in enumerate(test_crops)}
    crops_of: dict[tuple[int, int], list[int]] = {}
    for artist, painting, crop in test_crops:
        crops_of.setdefault((artist, painting), []).append(crop)
    styles = [artist_style(seed, a) for a in range(n_artists)]

    def make_train(painting: tuple[int, int]) -> None:
        image = render_painting(styles[painting[0]], seed, *painting, min_side, max_side)
        _write_jpeg(root / "train" / f"{train_ids[painting]:0{digits}d}.jpg", image)

    def make_test(painting: tuple[int, int]) -> list[dict]:
        image = render_painting(styles[painting[0]], seed, *painting, min_side, max_side)
        height, width = image.shape[:2]
        rows = []
        for crop in crops_of[painting]:
            x, y, w, h = _crop_box(seed, *painting, crop, height, width)
            test_id = test_ids[(*painting, crop)]
            _write_jpeg(root / "test" / f"{test_id}.jpg", image[y:y + h, x:x + w])
            rows.append(dict(id=test_id, painting=f"{painting[0]:02d}-{painting[1]:04d}", painting_width=width,
                             painting_height=height, x=x, y=y, width=w, height=h))
        return rows

    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        crop_rows = [row for rows in pool.map(make_test, sorted(crops_of)) for row in rows]
        list(pool.map(make_train, train_paintings))

    test = pd.DataFrame({"id": list(test_ids.values()),
                         "img_path": [f"./test/{test_id}.jpg" for test_id in test_ids.values()]})
    train = pd.DataFrame({"id": range(len(train_paintings)),
                          "img_path": [f"./train/{i:0{digits}d}.jpg" for i in range(len(train_paintings))],
                          "artist": [names[artist] for artist, _ in train_paintings]})
    facts = [_ARTIST_FACTS[name] for name in names]
    write_csv(pd.DataFrame({"name": names, "years": [f[0] for f in facts], "genre": [f[1] for f in facts],
                            "nationality": [f[2] for f in facts]}), root / "artists_info.csv")
    write_csv(pd.DataFrame(crop_rows).set_index("id").loc[test["id"]].reset_index(), root / "test_crops.csv")
    write_csv(pd.DataFrame({"id": test["id"], "artist": names[0]}), root / "sample_submission.csv")
    write_csv(pd.DataFrame({"id": test["id"], "artist": [names[artist] for artist, _, _ in test_crops]}),
              root / "solution.csv")
    write_csv(test, root / "test.csv")
    write_csv(train, root / "train.csv")  # last of the CSVs: see _remove_previous_demo
    write_json(dict(generator="src.demo_data", format_version=FORMAT_VERSION, params=params, artists=n_artists,
                    train_images=len(train), test_images=len(test), held_out_paintings=len(crops_of)),
               root / DEMO_MARKER)
    return root


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m src.demo_data", description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", default="inputs/demo", help="folder to write (default: inputs/demo)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scale", type=float, default=0.1, help="train count per artist = real count x scale")
    parser.add_argument("--min-per-artist", type=int, default=6)
    parser.add_argument("--n-artists", type=int, default=50, help="use the first N artists (1-50)")
    parser.add_argument("--crops-per-test-painting", type=int, default=2)
    parser.add_argument("--test-fraction", type=float, default=0.25,
                        help="held-out paintings per artist = train count x this")
    parser.add_argument("--min-side", type=int, default=192)
    parser.add_argument("--max-side", type=int, default=448)
    args = parser.parse_args(argv)
    root = generate_demo_dataset(args.root, seed=args.seed, scale=args.scale, min_per_artist=args.min_per_artist,
                                 n_artists=args.n_artists, crops_per_test_painting=args.crops_per_test_painting,
                                 test_fraction=args.test_fraction, min_side=args.min_side, max_side=args.max_side)
    manifest = _read_manifest(root)
    print(f"demo data in {root}: {manifest['train_images']} train images and {manifest['test_images']} test "
          f"crops of {manifest['held_out_paintings']} held-out paintings, {manifest['artists']} artists "
          f"(seed {args.seed}, scale {args.scale})")


if __name__ == "__main__":
    main()
