"""The demo's 50 artists, with the competition's train counts, and the seeded style each paints in: a texture
family, a palette, stroke length, width, direction and density. A style is a pure function of (seed, artist)."""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import cv2
import numpy as np

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
ARTIST_FACTS: dict[str, tuple[str, str, str, str]] = {
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
# long side is REFERENCE_SIDE; each family's renderer says what the parameters mean for it.
REFERENCE_SIDE = 320
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
STYLE_STREAM, PAINTING_STREAM, CROP_STREAM, ORDER_STREAM = range(4)


def stream_rng(seed: int, *keys: int) -> np.random.Generator:
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
    family = ARTIST_FACTS[name][3]
    ranges = {**_DEFAULT_RANGES, **_FAMILY_RANGES[family]}
    rng = stream_rng(seed, STYLE_STREAM, artist_index)

    def draw(key: str) -> float:
        return float(rng.uniform(*ranges[key]))

    # Golden-ratio hue steps keep neighbouring artists (and artists of one family) apart in hue.
    hue = 360.0 * ((stream_rng(seed, STYLE_STREAM).random() + artist_index * 0.618034) % 1.0)
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


def painting_variant(style: Style, rng: np.random.Generator, unit: float) -> Style:
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
