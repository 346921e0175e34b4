"""The embedded synthetic domain pair: a GTA5-like source and a Cityscapes-like target.

Both domains are drawn from one street-scene grammar (a pinhole camera over a flat ground plane: road in
perspective, sidewalks, terrain strips, building blocks with windows, walls and fences, trees and hedges, poles
with signs and traffic lights, cars, trucks, buses, persons, riders on bicycles and motorcycles), so layout and
shape carry over between them. The *appearance* differs, and differs per class:

* source ("game"): flat, saturated colours, a strong sun with cast shadows and bright/dark facade sides, a blue sky,
  almost no noise;
* target ("camera"): muted palettes with textured surfaces, overcast light, haze growing with depth, lens blur,
  sensor noise, JPEG blocking, and an ego-vehicle bonnet at the bottom.

Some class colours move *towards another class* of the other domain (confusable pairs): the target sidewalk
looks like the source road, the target terrain like the source vegetation, target riders dress like source
persons and target signs are grey like source poles. A source-only model therefore makes systematic, partly
right mistakes that self-training can fix. Class frequencies are long-tailed and differ between the domains
(more cars in the source; more vegetation, terrain and persons in the target).

Output layout (``generate``)::

    out/gta5/images/00001.png            RGB
    out/gta5/labels/00001.png            palettised ("P") PNG, indices are Cityscapes labelIds
    out/gta5/split.mat                   trainIds / valIds / testIds, 1-based, column vectors
    out/cityscapes/leftImg8bit/{train,val}/<city>/<city>_000000_000019_leftImg8bit.png
    out/cityscapes/gtFine/{train,val}/<city>/<city>_000000_000019_gtFine_labelIds.png   ("L", labelIds)

Every image is drawn from its own RNG, seeded with ``(seed, domain, index)``, so the files do not depend on the
number of worker processes, and the same seed gives byte-identical files.
"""

from __future__ import annotations

import io
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Callable

import cv2
import numpy as np
from PIL import Image

from cpsl.config import SynthConfig
from cpsl.outputs import publish_dir, remove_stale_staging, staging_dir
from cpsl.labels import CITYSCAPES_LABELS, CLASSES_19, NAME_TO_LABEL_ID

SOURCE, TARGET = 0, 1
DOMAIN_NAMES = ("source", "target")
# RNG stream ids: the target train and val images get separate streams so that changing one count leaves the
# other split's images unchanged.
_STREAM = {"source": 0, "target_train": 1, "target_val": 2}

TARGET_TRAIN_CITIES = ("ashford", "brennholm", "corvale")
TARGET_VAL_CITIES = ("dunmere", "elsbach")
PNG_COMPRESS_LEVEL = 3  # fixed PNG settings: identical inputs give identical bytes

# How far the target palettes move away from the source ones (0 = same colours, 1 = full target palette).
PALETTE_SHIFT = 1.0
SKY_DEPTH = 1000.0

LID = NAME_TO_LABEL_ID

Color = tuple[float, float, float]


# ---------------------------------------------------------------------------------------------------------
# Palettes: per domain, per class, a list of base colours (one is drawn per object or per image) and a jitter.

@dataclass(frozen=True)
class Style:
    """Appearance settings of one domain."""

    colors: dict[str, list[Color]]
    jitter: dict[str, float]
    texture: dict[str, tuple[float, float, float]]  # per class: amplitude of fine / medium / coarse noise
    sun: tuple[float, float]           # brightness of the left / right facades (light direction)
    shadow: tuple[float, float]        # range of the cast-shadow factor on the ground (1 = no shadow)
    saturation: tuple[float, float]    # global saturation factor range
    haze: tuple[float, float]          # haze coefficient range (per metre)
    haze_color: Color
    blur: tuple[float, float]          # gaussian blur sigma range (pixels)
    noise: tuple[float, float]         # sensor noise sigma range (grey levels)
    jpeg: tuple[int, int] | None       # JPEG quality range, None = no JPEG round trip
    sky_top: list[Color]
    sky_bottom: list[Color]


SOURCE_STYLE = Style(
    colors={
        "road": [(92, 86, 104)],
        "lane": [(235, 235, 225)],
        "sidewalk": [(188, 172, 150)],
        "parking": [(128, 112, 118)],
        "ground": [(150, 120, 90)],
        "building": [(196, 122, 92), (214, 204, 178), (160, 150, 140), (122, 132, 168), (222, 182, 120)],
        "window": [(92, 146, 206), (70, 110, 170)],
        "wall": [(176, 164, 132)],
        "fence": [(146, 112, 70)],
        "pole": [(124, 124, 130)],
        "light_box": [(32, 32, 34)],
        "traffic_sign": [(232, 204, 32), (40, 84, 204), (222, 42, 42), (242, 242, 242)],
        "vegetation": [(68, 152, 44), (52, 128, 38)],
        "terrain": [(156, 178, 82)],
        "trunk": [(110, 80, 50)],
        "person": [(220, 40, 40), (40, 80, 200), (240, 200, 40), (30, 30, 30), (240, 240, 240), (40, 160, 70)],
        "rider": [(220, 40, 40), (40, 80, 200), (240, 200, 40), (30, 30, 30), (240, 240, 240), (40, 160, 70)],
        "skin": [(226, 178, 140), (160, 110, 80)],
        "car": [(204, 30, 30), (30, 60, 192), (232, 202, 40), (242, 242, 242), (22, 22, 24), (30, 150, 60),
                (240, 122, 22)],
        "car_glass": [(60, 80, 110)],
        "truck": [(206, 204, 192), (60, 110, 170)],
        "bus": [(226, 172, 32), (40, 140, 200)],
        "train": [(200, 60, 60)],
        "bicycle": [(200, 40, 40), (40, 40, 40)],
        "motorcycle": [(60, 60, 70), (200, 30, 30)],
        "static": [(60, 110, 70), (110, 110, 110)],
        "unlabeled": [(80, 80, 80)],
        "ego_vehicle": [(30, 34, 44)],
    },
    jitter={"default": 10.0, "building": 14.0, "car": 12.0, "person": 20.0, "rider": 20.0},
    texture={"default": (0.01, 0.005, 0.015)},
    sun=(1.18, 0.72),
    shadow=(0.5, 0.65),
    saturation=(1.15, 1.3),
    haze=(0.0, 0.002),
    haze_color=(200, 215, 235),
    blur=(0.0, 0.0),
    noise=(0.5, 1.5),
    jpeg=None,
    sky_top=[(70, 140, 235), (90, 160, 245)],
    sky_bottom=[(165, 205, 250), (190, 220, 250)],
)

TARGET_STYLE = Style(
    colors={
        "road": [(78, 76, 80)],
        "lane": [(190, 190, 185)],
        "sidewalk": [(106, 98, 116)],        # moves towards where the source road was
        "parking": [(110, 104, 100)],
        "ground": [(120, 110, 95)],
        "building": [(140, 134, 124), (112, 106, 100), (168, 158, 142), (126, 122, 132)],
        "window": [(52, 58, 64), (80, 88, 96)],
        "wall": [(150, 142, 128)],
        "fence": [(118, 124, 118)],
        "pole": [(92, 92, 88)],
        "light_box": [(44, 46, 44)],
        "traffic_sign": [(60, 92, 160), (182, 52, 52), (204, 204, 200), (128, 128, 124)],  # grey backs ~ pole
        "vegetation": [(58, 96, 48), (46, 80, 40)],
        "terrain": [(90, 148, 58)],          # moves towards where the source vegetation was
        "trunk": [(70, 60, 50)],
        "person": [(40, 42, 50), (90, 84, 80), (60, 70, 100), (130, 40, 40), (170, 168, 160)],
        "rider": [(220, 40, 40), (40, 80, 200), (240, 200, 40), (240, 240, 240)],  # dressed like source persons
        "skin": [(200, 160, 130), (140, 100, 80)],
        "car": [(62, 62, 66), (200, 200, 205), (20, 22, 25), (122, 126, 130), (40, 50, 90), (130, 40, 40)],
        "car_glass": [(30, 34, 40)],
        "truck": [(150, 150, 146), (90, 100, 110)],
        "bus": [(210, 214, 220), (170, 40, 40)],
        "train": [(120, 130, 140)],
        "bicycle": [(30, 30, 30), (90, 90, 95)],
        "motorcycle": [(40, 40, 46), (120, 120, 125)],
        "static": [(50, 80, 60), (90, 90, 90)],
        "unlabeled": [(70, 70, 70)],
        "ego_vehicle": [(34, 40, 52)],
    },
    jitter={"default": 9.0, "building": 12.0, "car": 10.0, "person": 12.0, "rider": 16.0},
    texture={
        "default": (0.05, 0.04, 0.04),
        "road": (0.04, 0.05, 0.05),
        "sidewalk": (0.10, 0.04, 0.04),
        "building": (0.06, 0.06, 0.08),
        "vegetation": (0.18, 0.12, 0.06),
        "terrain": (0.10, 0.10, 0.08),
        "sky": (0.01, 0.03, 0.06),
    },
    sun=(1.0, 0.9),
    shadow=(0.85, 1.0),
    saturation=(0.8, 0.95),
    haze=(0.002, 0.007),
    haze_color=(190, 196, 206),
    blur=(0.3, 0.8),
    noise=(2.0, 5.0),
    jpeg=(30, 60),
    sky_top=[(120, 160, 215), (140, 170, 205)],
    sky_bottom=[(185, 200, 220), (200, 208, 218)],
)


def _style(domain: int) -> Style:
    if domain == SOURCE or PALETTE_SHIFT >= 1.0:
        return SOURCE_STYLE if domain == SOURCE else TARGET_STYLE
    # Partial shift (a tuning knob): blend every target colour with the source colour at the same position.
    mixed = {}
    for name, tcols in TARGET_STYLE.colors.items():
        scols = SOURCE_STYLE.colors[name]
        mixed[name] = [tuple(s + PALETTE_SHIFT * (t - s) for s, t in zip(scols[i % len(scols)], tc))
                       for i, tc in enumerate(tcols)]
    return Style(**{**TARGET_STYLE.__dict__, "colors": mixed})


# ---------------------------------------------------------------------------------------------------------
# Scene grammar: per-domain frequencies of the layout elements (same grammar, different rates).

@dataclass(frozen=True)
class Grammar:
    cars: tuple[int, int]
    parked_car_p: float
    persons: tuple[int, int]
    riders: tuple[int, int]
    trees: tuple[int, int]
    hedge_p: float
    terrain_p: float
    wall_p: float
    fence_p: float
    poles: tuple[int, int]
    big_vehicle_p: float
    building_height: tuple[float, float]
    building_gap_p: float
    ego_vehicle: bool
    ground_p: float


SOURCE_GRAMMAR = Grammar(cars=(2, 8), parked_car_p=0.7, persons=(0, 3), riders=(0, 2), trees=(0, 4),
                         hedge_p=0.2, terrain_p=0.3, wall_p=0.35, fence_p=0.3, poles=(1, 4), big_vehicle_p=0.35,
                         building_height=(6.0, 22.0), building_gap_p=0.3, ego_vehicle=False, ground_p=0.1)
TARGET_GRAMMAR = Grammar(cars=(1, 5), parked_car_p=0.5, persons=(1, 7), riders=(0, 2), trees=(2, 7),
                         hedge_p=0.45, terrain_p=0.6, wall_p=0.3, fence_p=0.35, poles=(1, 5), big_vehicle_p=0.2,
                         building_height=(5.0, 18.0), building_gap_p=0.4, ego_vehicle=True, ground_p=0.3)


# ---------------------------------------------------------------------------------------------------------
# Drawing


@dataclass
class Camera:
    """A pinhole camera at height ``h`` over the ground plane; x right, y up, z forward (metres)."""

    f: float
    h: float
    xv: float  # vanishing point (pixels)
    yh: float  # horizon row (pixels)

    def project(self, x: float, y: float, z: float) -> tuple[float, float]:
        return self.xv + self.f * x / z, self.yh + self.f * (self.h - y) / z


@dataclass
class Canvas:
    """The label map, the base colour image and the depth map, painted together (painter's algorithm)."""

    height: int
    width: int
    label: np.ndarray = field(init=False)
    rgb: np.ndarray = field(init=False)
    depth: np.ndarray = field(init=False)
    side_x: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.label = np.full((self.height, self.width), LID["sky"], np.uint8)
        self.rgb = np.zeros((self.height, self.width, 3), np.float32)
        self.depth = np.full((self.height, self.width), SKY_DEPTH, np.float32)
        self.side_x = np.zeros((self.height, self.width), np.float32)

    def poly(self, pts: list[tuple[float, float]], name: str | None, color: Color, depth: float | None,
             side_x: float | None = None) -> None:
        """Fill a polygon. ``name=None`` paints colour only (windows, lane marks); ``depth=None`` keeps depth.

        Depth 0 marks the ground (its depth follows from the row later); ``side_x`` marks a wall parallel to the
        street at lateral position x (its depth follows from the column later).
        """
        self.polys([pts], name, color, depth, side_x)

    def polys(self, many: list[list[tuple[float, float]]], name: str | None, color: Color, depth: float | None,
              side_x: float | None = None) -> None:
        """Fill several non-overlapping polygons of one colour in one call (like ``poly``)."""
        if not many:
            return
        # 4 fractional bits (cv2 ``shift=4``); clamp far-away vertices so the fixed-point values cannot overflow
        lim = 1 << 24
        arrs = [np.array([(min(max(int(round(x * 16)), -lim), lim), min(max(int(round(y * 16)), -lim), lim))
                          for x, y in pts], np.int32) for pts in many]
        cv2.fillPoly(self.rgb, arrs, tuple(float(c) for c in color), lineType=cv2.LINE_8, shift=4)
        if name is not None:
            cv2.fillPoly(self.label, arrs, int(LID[name]), cv2.LINE_8, shift=4)
        if depth is not None:
            cv2.fillPoly(self.depth, arrs, float(depth) if side_x is None else -1.0, cv2.LINE_8, shift=4)
            if side_x is not None:
                cv2.fillPoly(self.side_x, arrs, float(side_x), cv2.LINE_8, shift=4)

    def ellipse(self, cx: float, cy: float, rx: float, ry: float, name: str | None, color: Color,
                depth: float | None) -> None:
        """Fill an axis-aligned ellipse (as a polygon, so it shares the rasterisation rules of ``poly``)."""
        n = 16
        pts = [(cx + rx * math.cos(2 * math.pi * k / n), cy + ry * math.sin(2 * math.pi * k / n)) for k in range(n)]
        self.poly(pts, name, color, depth)


def _rect(x0: float, y0: float, x1: float, y1: float) -> list[tuple[float, float]]:
    return [(x0, y0), (x1, y0), (x1, y1), (x0, y1)]


class Painter:
    """Draws world-space primitives of one scene with one camera, one style and one RNG."""

    def __init__(self, canvas: Canvas, cam: Camera, style: Style, rng: np.random.Generator) -> None:
        self.c, self.cam, self.style, self.rng = canvas, cam, style, rng
        self.image_shift: dict[str, np.ndarray] = {}

    # colours ------------------------------------------------------------------------------------------
    def color(self, key: str, scale: float = 1.0) -> Color:
        """A colour of class ``key``: a palette entry, a per-image class shift and a per-object jitter."""
        cols = self.style.colors[key]
        base = np.asarray(cols[int(self.rng.integers(len(cols)))], np.float64)
        if key not in self.image_shift:
            self.image_shift[key] = self.rng.normal(0, 6, 3)
        jit = self.style.jitter.get(key, self.style.jitter["default"])
        col = (base + self.image_shift[key] + self.rng.normal(0, jit * 0.5, 3) + self.rng.normal(0, jit * 0.5)) * scale
        return tuple(float(v) for v in np.clip(col, 0, 255))

    # primitives ---------------------------------------------------------------------------------------
    def ground(self, x0: float, x1: float, z0: float, z1: float, name: str | None, color: Color) -> None:
        """A ground-plane quad between lateral positions x0..x1 and depths z0..z1 (depth filled later)."""
        p = self.cam.project
        self.c.poly([p(x0, 0, z0), p(x1, 0, z0), p(x1, 0, z1), p(x0, 0, z1)], name, color,
                    None if name is None else 0.0)

    def side_wall(self, x: float, z0: float, z1: float, y0: float, y1: float, name: str | None,
                  color: Color) -> None:
        """A vertical quad parallel to the road (constant x) from depth z0 to z1 and height y0 to y1.

        With ``name=None`` only the colour is painted (windows, fence rails)."""
        p = self.cam.project
        self.c.poly([p(x, y0, z0), p(x, y0, z1), p(x, y1, z1), p(x, y1, z0)], name, color,
                    None if name is None else 1.0, side_x=x)

    def front(self, x0: float, x1: float, y0: float, y1: float, z: float, name: str | None, color: Color) -> None:
        """A vertical rectangle facing the camera at depth z."""
        p = self.cam.project
        (u0, v0), (u1, v1) = p(x0, y1, z), p(x1, y0, z)
        self.c.poly(_rect(u0, v0, u1, v1), name, color, z)

    def disc(self, x: float, y: float, z: float, r: float, name: str | None, color: Color,
             squash: float = 1.0) -> None:
        u, v = self.cam.project(x, y, z)
        rp = max(self.cam.f * r / z, 0.6)
        self.c.ellipse(u, v, rp, rp * squash, name, color, z)

    def ring(self, x: float, y: float, z: float, r: float, name: str, color: Color) -> None:
        """A wheel: an outline circle (thickness ~ 1/5 of the radius, at least one pixel)."""
        u, v = self.cam.project(x, y, z)
        rp = max(self.cam.f * r / z, 1.0)
        t = max(rp * 0.22, 0.8)
        n = 16
        outer = [(u + rp * math.cos(2 * math.pi * k / n), v + rp * math.sin(2 * math.pi * k / n)) for k in range(n)]
        inner = [(u + (rp - t) * math.cos(2 * math.pi * k / n), v + (rp - t) * math.sin(2 * math.pi * k / n))
                 for k in range(n)]
        # Fill the annulus as n quads so the hole stays what was behind.
        quads = [[outer[k], outer[(k + 1) % n], inner[(k + 1) % n], inner[k]] for k in range(n)]
        self.c.polys(quads, name, color, z)

    def bar(self, xa: float, ya: float, xb: float, yb: float, z: float, w: float, name: str | None,
            color: Color) -> None:
        """A thick line segment in the plane at depth z (bike frames, arms, legs)."""
        p = self.cam.project
        (u0, v0), (u1, v1) = p(xa, ya, z), p(xb, yb, z)
        wp = max(self.cam.f * w / z, 0.9) / 2
        dx, dy = u1 - u0, v1 - v0
        n = math.hypot(dx, dy) or 1.0
        nx, ny = -dy / n * wp, dx / n * wp
        self.c.poly([(u0 + nx, v0 + ny), (u1 + nx, v1 + ny), (u1 - nx, v1 - ny), (u0 - nx, v0 - ny)], name, color, z)


# ---------------------------------------------------------------------------------------------------------
# Objects


def _draw_person(pt: Painter, x: float, z: float, name: str = "person", base_y: float = 0.0,
                 seated: bool = False) -> None:
    """A pedestrian (or, with ``seated``, the upper body of a rider) standing at (x, base_y, z)."""
    rng = pt.rng
    hgt = rng.uniform(1.6, 1.9)
    shirt = pt.color(name)
    trousers = pt.color(name, 0.6)
    skin = pt.color("skin")
    w = hgt * 0.26
    leg_top = base_y + (0.0 if seated else hgt * 0.47)
    stride = rng.uniform(-0.15, 0.15)
    if seated:
        # thighs forward onto the saddle, shins down to the pedals
        pt.bar(x - w * 0.2, base_y + 0.05, x + w * 0.1, base_y - 0.45, z, w * 0.35, name, trousers)
        pt.bar(x + w * 0.2, base_y + 0.05, x + w * 0.2 + stride, base_y - 0.45, z, w * 0.35, name, trousers)
        torso0 = base_y
    else:
        pt.bar(x - w * 0.22, leg_top, x - w * 0.22 - stride, base_y, z, w * 0.38, name, trousers)
        pt.bar(x + w * 0.22, leg_top, x + w * 0.22 + stride, base_y, z, w * 0.38, name, trousers)
        torso0 = leg_top
    torso1 = torso0 + hgt * 0.34
    lean = rng.uniform(0.05, 0.2) if seated else 0.0
    p = pt.cam.project
    pts = [p(x - w / 2, torso0, z), p(x + w / 2, torso0, z), p(x + w / 2 + lean, torso1, z),
           p(x - w / 2 + lean, torso1, z)]
    pt.c.poly(pts, name, shirt, z)
    arm = rng.uniform(-0.2, 0.2)
    reach = 0.3 if seated else 0.0  # a rider's hands go forward to the handlebar
    pt.bar(x - w / 2 + lean, torso1, x - w / 2 - 0.05 + arm + reach, torso0 + 0.05, z, w * 0.25, name, shirt)
    pt.bar(x + w / 2 + lean, torso1, x + w / 2 + 0.05 - arm + reach, torso0 + 0.05, z, w * 0.25, name, shirt)
    head_r = hgt * 0.065
    pt.disc(x + lean, torso1 + head_r * 1.3, z, head_r, name, skin, squash=1.2)
    if seated and rng.random() < 0.7:  # helmet
        pt.disc(x + lean, torso1 + head_r * 1.6, z, head_r * 1.05, name, pt.color(name), squash=0.7)


def _draw_bike(pt: Painter, x: float, z: float, motor: bool, side_view: bool) -> float:
    """A bicycle or motorcycle at (x, 0, z). Returns the saddle height."""
    rng = pt.rng
    name = "motorcycle" if motor else "bicycle"
    col = pt.color(name)
    r = 0.33 if motor else 0.34
    if side_view:
        half = 0.55 if motor else 0.5
        pt.ring(x - half, r, z, r, name, pt.color(name, 0.4))
        pt.ring(x + half, r, z, r, name, pt.color(name, 0.4))
        if motor:
            p = pt.cam.project
            pts = [p(x - half * 0.6, r * 0.8, z), p(x + half * 0.8, r * 0.8, z), p(x + half * 0.6, r * 2.4, z),
                   p(x - half * 0.4, r * 2.2, z)]
            pt.c.poly(pts, name, col, z)
        else:
            pt.bar(x - half, r, x, r * 2.6, z, 0.05, name, col)
            pt.bar(x, r * 2.6, x + half * 0.8, r * 2.7, z, 0.05, name, col)
            pt.bar(x + half * 0.8, r * 2.7, x + half, r, z, 0.05, name, col)
            pt.bar(x - half, r, x + half * 0.3, r, z, 0.05, name, col)
        return r * (2.5 if motor else 2.6)
    # seen from behind: a thin wheel and a frame
    width = 0.3 if motor else 0.12
    pt.front(x - width / 2, x + width / 2, 0.0, 2 * r, z, name, pt.color(name, 0.4))
    pt.front(x - width, x + width, r * 1.6, r * 2.3, z, name, col)
    if rng.random() < 0.8:
        pt.bar(x - 0.3, r * 2.9, x + 0.3, r * 2.9, z, 0.05, name, col)  # handlebar
    return r * 2.5


def _draw_rider(pt: Painter, x: float, z: float) -> None:
    motor = pt.rng.random() < 0.35
    side = pt.rng.random() < 0.4
    saddle = _draw_bike(pt, x, z, motor, side)
    _draw_person(pt, x, z - 0.01, "rider", base_y=saddle, seated=True)
    if side:  # the handlebar side of a side-view bicycle sits in front of the rider
        pt.bar(x + 0.35, saddle + 0.05, x + 0.45, saddle + 0.35, z - 0.02, 0.05,
               "motorcycle" if motor else "bicycle", pt.color("motorcycle" if motor else "bicycle"))


def _draw_car(pt: Painter, x: float, z: float, kind: str = "car") -> None:
    """A vehicle seen from behind or in front, centred at lateral position x, depth z."""
    rng = pt.rng
    if kind == "car":
        w, h = rng.uniform(1.65, 2.0), rng.uniform(1.35, 1.65)
    elif kind == "truck":
        w, h = rng.uniform(2.3, 2.55), rng.uniform(2.8, 3.6)
    else:  # bus
        w, h = rng.uniform(2.45, 2.6), rng.uniform(3.0, 3.4)
    body = pt.color(kind)
    glass = pt.color("car_glass")
    tyre = (18.0, 18.0, 20.0)
    wheel_h = 0.35
    pt.front(x - w / 2 + 0.05, x - w / 2 + 0.35, 0.0, wheel_h + 0.05, z + 0.05, kind, tyre)
    pt.front(x + w / 2 - 0.35, x + w / 2 - 0.05, 0.0, wheel_h + 0.05, z + 0.05, kind, tyre)
    if kind == "car":
        pt.front(x - w / 2, x + w / 2, wheel_h * 0.6, h * 0.58, z, kind, body)
        p = pt.cam.project
        top = [p(x - w * 0.48, h * 0.58, z), p(x + w * 0.48, h * 0.58, z), p(x + w * 0.38, h, z), p(x - w * 0.38, h, z)]
        pt.c.poly(top, kind, body, z)
        inner = [p(x - w * 0.42, h * 0.62, z), p(x + w * 0.42, h * 0.62, z), p(x + w * 0.35, h * 0.95, z),
                 p(x - w * 0.35, h * 0.95, z)]
        pt.c.poly(inner, None, glass, None)
        lamp = (220.0, 40.0, 30.0) if rng.random() < 0.6 else (235.0, 230.0, 200.0)
        pt.front(x - w / 2 + 0.08, x - w / 2 + 0.35, h * 0.4, h * 0.5, z, None, lamp)
        pt.front(x + w / 2 - 0.35, x + w / 2 - 0.08, h * 0.4, h * 0.5, z, None, lamp)
    else:
        pt.front(x - w / 2, x + w / 2, wheel_h * 0.6, h, z, kind, body)
        if kind == "bus":
            pt.front(x - w * 0.45, x + w * 0.45, h * 0.55, h * 0.9, z, None, glass)
        else:
            pt.front(x - w * 0.4, x + w * 0.4, h * 0.1, h * 0.2, z, None, pt.color(kind, 0.7))


def _draw_pole(pt: Painter, x: float, z: float, with_light: bool) -> None:
    rng = pt.rng
    hgt = rng.uniform(3.5, 7.5)
    w = rng.uniform(0.12, 0.22)
    pole = pt.color("pole")
    pt.front(x - w / 2, x + w / 2, 0.0, hgt, z, "pole", pole)
    if with_light:
        box = pt.color("light_box")
        bw, bh = 0.34, 0.95
        if rng.random() < 0.4:  # on an arm over the road
            arm = -np.sign(x) * rng.uniform(1.5, 3.5)
            pt.bar(x, hgt - 0.1, x + arm, hgt - 0.1, z, 0.12, "pole", pole)
            cx = x + arm
        else:
            cx = x
        top = hgt
        pt.front(cx - bw / 2, cx + bw / 2, top - bh, top, z - 0.05, "traffic_light", box)
        lamp_y = top - bh * (0.2 + 0.3 * int(rng.integers(3)))
        lamp = [(230.0, 40.0, 30.0), (240.0, 190.0, 30.0), (40.0, 220.0, 90.0)][int(rng.integers(3))]
        pt.disc(cx, lamp_y, z - 0.06, 0.09, None, lamp)
    else:
        s = rng.uniform(0.55, 0.85)
        y = rng.uniform(2.0, min(hgt, 3.6)) - s
        col = pt.color("traffic_sign")
        shape = int(rng.integers(3))
        p = pt.cam.project
        if shape == 0:
            pt.front(x - s / 2, x + s / 2, y, y + s, z - 0.05, "traffic_sign", col)
        elif shape == 1:
            pt.disc(x, y + s / 2, z - 0.05, s / 2, "traffic_sign", col)
        else:
            pt.c.poly([p(x - s / 2, y, z - 0.05), p(x + s / 2, y, z - 0.05), p(x, y + s, z - 0.05)],
                      "traffic_sign", col, z - 0.05)
        if rng.random() < 0.5:  # a second, smaller plate below
            pt.front(x - s * 0.4, x + s * 0.4, y - s * 0.45, y - s * 0.1, z - 0.05, "traffic_sign",
                     pt.color("traffic_sign"))


def _draw_tree(pt: Painter, x: float, z: float) -> None:
    rng = pt.rng
    trunk_h = rng.uniform(1.8, 3.2)
    pt.front(x - 0.12, x + 0.12, 0.0, trunk_h + 0.5, z, "vegetation", pt.color("trunk"))
    r = rng.uniform(1.2, 2.8)
    cy = trunk_h + r * 0.8
    for _ in range(int(rng.integers(3, 6))):
        dx, dy = rng.normal(0, r * 0.35, 2)
        rr = r * rng.uniform(0.55, 0.85)
        pt.disc(x + dx, cy + dy, z - 0.01, rr, "vegetation", pt.color("vegetation"), squash=rng.uniform(0.8, 1.1))


# ---------------------------------------------------------------------------------------------------------
# One scene


def _draw_buildings(pt: Painter, side: int, x_front: float, z_near: float, z_far: float, g: Grammar) -> None:
    """A row of building blocks along one side of the street (side -1 left, +1 right)."""
    rng, cam = pt.rng, pt.cam
    blocks: list[tuple[float, float, float, bool]] = []  # (z0, z1, height, is_gap)
    z = z_near - rng.uniform(0, 10)
    while z < z_far:
        if rng.random() < g.building_gap_p:
            length = rng.uniform(4, 12)
            blocks.append((z, z + length, 0.0, True))
        else:
            length = rng.uniform(8, 30)
            blocks.append((z, z + length, rng.uniform(*g.building_height), False))
        z += length
    sun = pt.style.sun[0] if side < 0 else pt.style.sun[1]
    for z0, z1, hgt, gap in reversed(blocks):  # far first
        z0c = max(z0, 0.6)
        if gap:
            # trees or a low fence in the gap; otherwise the sky shows through
            if rng.random() < 0.6:
                for _ in range(int(rng.integers(1, 4))):
                    _draw_tree(pt, side * (x_front + rng.uniform(1, 6)), rng.uniform(z0c + 1, max(z1, z0c + 1.5)))
            continue
        xf = side * x_front + side * rng.uniform(-0.3, 0.3)
        col = pt.color("building", sun)
        pt.side_wall(xf, z0c, z1, 0.0, hgt, "building", col)
        # the near end face of the block (perpendicular to the street), in the other light
        face = pt.color("building", pt.style.sun[1] if side < 0 else pt.style.sun[0])
        face = tuple(0.5 * (a + b) for a, b in zip(face, col))
        p = cam.project
        if z0 > 0.6:
            pts = [p(xf, 0, z0), p(xf + side * 15, 0, z0), p(xf + side * 15, hgt, z0), p(xf, hgt, z0)]
            pt.c.poly(pts, "building", face, z0)
        # windows: floors every ~3 m, columns every ~2.5-4 m
        win = pt.color("window", sun)
        floor_h = rng.uniform(2.8, 3.6)
        col_w = rng.uniform(2.2, 4.0)
        win_w, win_h = col_w * rng.uniform(0.35, 0.6), floor_h * rng.uniform(0.35, 0.55)
        zz = z0c + col_w * 0.5
        windows = []
        xw = xf - side * 0.01
        while zz + win_w < z1 - 0.5:
            fy = floor_h * 0.9
            while fy + win_h < hgt - 0.8:
                windows.append([p(xw, fy, zz), p(xw, fy, zz + win_w), p(xw, fy + win_h, zz + win_w),
                                p(xw, fy + win_h, zz)])
                fy += floor_h
            zz += col_w
        pt.c.polys(windows, None, win, None)
        # shop-front band on the ground floor
        if rng.random() < 0.4:
            pt.side_wall(xf - side * 0.01, z0c, z1, 0.4, floor_h * 0.8, None, pt.color("window", sun * 0.7))


def draw_scene(rng: np.random.Generator, domain: int, height: int,
               width: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict]:
    """Lay out and paint one street scene. Returns (labelIds uint8, base colour float32 HxWx3, depth, info)."""
    g = SOURCE_GRAMMAR if domain == SOURCE else TARGET_GRAMMAR
    style = _style(domain)
    canvas = Canvas(height, width)
    # camera: height, pitch (horizon row), yaw (vanishing point), focal length
    cam = Camera(f=width * rng.uniform(0.8, 1.15), h=rng.uniform(1.2, 2.6),
                 xv=width * rng.uniform(0.3, 0.7), yh=height * rng.uniform(0.32, 0.55))
    pt = Painter(canvas, cam, style, rng)
    z_near = cam.f * cam.h / (height - cam.yh) * 0.95  # ground depth at the bottom row
    z_far = 160.0

    # sky: a vertical gradient (base colour; texture/haze later)
    top = np.asarray(style.sky_top[int(rng.integers(len(style.sky_top)))], np.float32) + rng.normal(0, 6, 3)
    bot = np.asarray(style.sky_bottom[int(rng.integers(len(style.sky_bottom)))], np.float32) + rng.normal(0, 6, 3)
    t = np.clip(np.arange(height, dtype=np.float32) / max(cam.yh, 1.0), 0, 1)[:, None, None]
    canvas.rgb[:] = top * (1 - t) + bot * t

    # distant skyline across the end of the street
    x = -90.0
    while x < 90.0:
        w = rng.uniform(6, 25)
        if rng.random() < 0.3:
            tree_h = rng.uniform(5, 12)
            pt.front(x, x + w, 0.0, tree_h, z_far + 20, "vegetation", pt.color("vegetation"))
        elif rng.random() < 0.75:
            pt.front(x, x + w, 0.0, rng.uniform(6, 28), z_far + 10, "building", pt.color("building", 0.9))
        x += w

    # the ground: sidewalks, terrain and the road
    road_l, road_r = rng.uniform(3.0, 8.0), rng.uniform(3.0, 8.0)
    walk_l, walk_r = rng.uniform(1.5, 4.5), rng.uniform(1.5, 4.5)
    terr_l = rng.uniform(1.0, 5.0) if rng.random() < g.terrain_p else 0.0
    terr_r = rng.uniform(1.0, 5.0) if rng.random() < g.terrain_p else 0.0
    front_l = road_l + walk_l + terr_l + rng.uniform(0, 1.0)
    front_r = road_r + walk_r + terr_r + rng.uniform(0, 1.0)
    z0 = 0.5
    # beyond the buildings' line: ground far out (seen through gaps)
    far = "terrain" if rng.random() < 0.5 else "sidewalk"
    if domain == TARGET and rng.random() < 0.5:
        far = "unlabeled"  # the annotators left the far background open (void), as Cityscapes often does
    pt.ground(-200, 200, z0, z_far + 30, far, pt.color("terrain"))
    pt.ground(-front_l - 40, -road_l - walk_l, z0, z_far, "terrain" if terr_l else "sidewalk",
              pt.color("terrain" if terr_l else "sidewalk"))
    pt.ground(road_r + walk_r, front_r + 40, z0, z_far, "terrain" if terr_r else "sidewalk",
              pt.color("terrain" if terr_r else "sidewalk"))
    walk_col = pt.color("sidewalk")
    pt.ground(-road_l - walk_l, -road_l, z0, z_far, "sidewalk", walk_col)
    pt.ground(road_r, road_r + walk_r, z0, z_far, "sidewalk", walk_col)
    # ground / parking patches (void in Cityscapes)
    if rng.random() < g.ground_p:
        s = -1 if rng.random() < 0.5 else 1
        za = rng.uniform(z0, 25)
        xa = road_l + walk_l if s < 0 else road_r + walk_r
        pt.ground(s * xa, s * (xa + rng.uniform(1, 3)), za, za + rng.uniform(3, 15), "ground", pt.color("ground"))
    pt.ground(-road_l, road_r, z0, z_far, "road", pt.color("road"))
    if rng.random() < 0.35:
        s = -1 if rng.random() < 0.5 else 1
        edge = road_l if s < 0 else road_r
        za = rng.uniform(z0, 20)
        pt.ground(s * (edge - 2.3), s * edge, za, za + rng.uniform(5, 20), "parking", pt.color("parking"))
    # lane marks (colour only: they are road)
    lane = pt.color("lane")
    dash, gap = rng.uniform(2, 4), rng.uniform(3, 7)
    xm = rng.uniform(-1.0, 1.0) * min(road_l, road_r) * 0.3
    z = z0 + rng.uniform(0, gap)
    while z < 70:
        pt.ground(xm - 0.08, xm + 0.08, z, z + dash, None, lane)
        z += dash + gap
    for edge in (-road_l + 0.3, road_r - 0.3):
        pt.ground(edge - 0.06, edge + 0.06, z0, 90, None, lane)
    if rng.random() < 0.25:  # a crosswalk
        zc = rng.uniform(z_near + 2, 30)
        xs = -road_l + 0.3
        while xs < road_r - 0.6:
            pt.ground(xs, xs + 0.5, zc, zc + 3.0, None, lane)
            xs += 1.0
    # cast shadow of the buildings on one side (strong sun in the source, almost none in the target)
    shadow = rng.uniform(*style.shadow)
    if shadow < 0.99:
        s = -1 if rng.random() < 0.7 else 1
        xa = (road_l + walk_l) if s < 0 else (road_r + walk_r)
        width_m = rng.uniform(1.0, xa + 3)
        mask = np.zeros((height, width), np.uint8)
        p = cam.project
        pts = np.round(np.asarray([p(s * (xa + 5), 0, z0), p(s * (xa - width_m), 0, z0),
                                   p(s * (xa - width_m), 0, z_far), p(s * (xa + 5), 0, z_far)]) * 16).astype(np.int32)
        cv2.fillPoly(mask, pts[None], 1, cv2.LINE_8, shift=4)
        canvas.rgb[mask.astype(bool)] *= shadow

    # buildings on both sides
    _draw_buildings(pt, -1, front_l, z_near, z_far, g)
    _draw_buildings(pt, 1, front_r, z_near, z_far, g)

    # walls, fences and hedges along the outer edge of the sidewalks
    for s, xa in ((-1, road_l + walk_l), (1, road_r + walk_r)):
        for kind, prob in (("wall", g.wall_p), ("fence", g.fence_p), ("hedge", g.hedge_p)):
            if rng.random() >= prob:
                continue
            za = rng.uniform(z_near * 0.8, 30)
            zb = za + rng.uniform(4, 30)
            x_line = s * (xa + rng.uniform(0.0, 0.5))
            if kind == "wall":
                pt.side_wall(x_line, za, zb, 0.0, rng.uniform(0.8, 2.6), "wall", pt.color("wall"))
            elif kind == "fence":
                fh = rng.uniform(1.0, 2.0)
                col = pt.color("fence")
                pt.side_wall(x_line, za, zb, 0.0, fh, "fence", tuple(c * 0.75 for c in col))
                zz = za
                while zz < zb:  # posts and a top rail in a lighter colour (colour only)
                    pt.side_wall(x_line - s * 0.01, zz, zz + 0.12, 0.0, fh, None, col)
                    zz += rng.uniform(1.0, 2.0)
                pt.side_wall(x_line - s * 0.01, za, zb, fh - 0.12, fh, None, col)
            else:
                pt.side_wall(x_line, za, zb, 0.0, rng.uniform(0.7, 1.6), "vegetation", pt.color("vegetation"))

    # point objects, drawn far to near so near ones occlude
    objects: list[tuple[float, Callable[[], None]]] = []

    def add(z: float, fn: Callable[[], None]) -> None:
        objects.append((z, fn))

    n_cars = int(rng.integers(g.cars[0], g.cars[1] + 1))
    for _ in range(n_cars):
        z = rng.uniform(z_near + 2.5, 70)
        if rng.random() < g.parked_car_p * 0.5:
            s = -1 if rng.random() < 0.5 else 1
            x = s * ((road_l if s < 0 else road_r) - 1.1)
        else:
            x = rng.uniform(-road_l + 1.2, road_r - 1.2)
        add(z, lambda x=x, z=z: _draw_car(pt, x, z))
    if rng.random() < g.big_vehicle_p:
        z = rng.uniform(z_near + 4, 60)
        x = rng.uniform(-road_l + 1.5, road_r - 1.5)
        kind = "truck" if rng.random() < 0.55 else "bus"
        add(z, lambda x=x, z=z, kind=kind: _draw_car(pt, x, z, kind))
    for _ in range(int(rng.integers(g.persons[0], g.persons[1] + 1))):
        z = rng.uniform(z_near + 0.5, 45)
        s = -1 if rng.random() < 0.5 else 1
        x = s * ((road_l if s < 0 else road_r) + rng.uniform(0.3, (walk_l if s < 0 else walk_r) - 0.2))
        group = 1 if rng.random() < 0.7 else int(rng.integers(2, 4))
        for k in range(group):
            xk, zk = x + 0.55 * k * -s, z + rng.uniform(-0.4, 0.4)
            add(zk, lambda x=xk, z=zk: _draw_person(pt, x, z))
    for _ in range(int(rng.integers(g.riders[0], g.riders[1] + 1))):
        z = rng.uniform(z_near + 1.5, 45)
        s = -1 if rng.random() < 0.5 else 1
        x = s * ((road_l if s < 0 else road_r) - rng.uniform(0.5, 1.5))
        add(z, lambda x=x, z=z: _draw_rider(pt, x, z))
    for _ in range(int(rng.integers(g.poles[0], g.poles[1] + 1))):
        z = rng.uniform(z_near + 1.0, 60)
        s = -1 if rng.random() < 0.5 else 1
        x = s * ((road_l if s < 0 else road_r) + rng.uniform(0.3, 0.7))
        light = rng.random() < 0.4
        add(z, lambda x=x, z=z, light=light: _draw_pole(pt, x, z, light))
    for _ in range(int(rng.integers(g.trees[0], g.trees[1] + 1))):
        z = rng.uniform(z_near + 1.0, 60)
        s = -1 if rng.random() < 0.5 else 1
        xa = (road_l + walk_l) if s < 0 else (road_r + walk_r)
        x = s * (xa + rng.uniform(-0.6, 1.5))
        add(z, lambda x=x, z=z: _draw_tree(pt, x, z))
    for _ in range(int(rng.integers(0, 3))):  # bins and boxes (void "static")
        z = rng.uniform(z_near + 1.0, 40)
        s = -1 if rng.random() < 0.5 else 1
        x = s * ((road_l + walk_l if s < 0 else road_r + walk_r) - 0.5)
        add(z, lambda x=x, z=z: pt.front(x - 0.35, x + 0.35, 0, 1.0, z, "static", pt.color("static")))
    for _, fn in sorted(objects, key=lambda o: -o[0]):
        fn()

    # ego-vehicle bonnet (target only, like the Cityscapes car)
    if g.ego_vehicle:
        hb = height * rng.uniform(0.07, 0.13)
        n = 24
        pts = [(-0.05 * width + 1.1 * width * k / n,
                height - hb * (1 - 0.6 * (2 * k / n - 1) ** 2) - 0.15 * hb) for k in range(n + 1)]
        pts += [(1.05 * width, height + 2), (-0.05 * width, height + 2)]
        canvas.poly(pts, "ego_vehicle", pt.color("ego_vehicle"), 1.0)

    # per-pixel depth of the ground (from the row) and of walls along the street (from the column)
    rows = np.arange(height, dtype=np.float32)[:, None] + 0.5
    cols = np.arange(width, dtype=np.float32)[None, :] + 0.5
    ground_depth = cam.f * cam.h / np.maximum(rows - cam.yh, 0.5)
    wall_depth = cam.f * np.abs(canvas.side_x) / np.maximum(np.abs(cols - cam.xv), 0.5)
    depth = np.where(canvas.depth == 0.0, ground_depth, canvas.depth)
    depth = np.where(depth < 0.0, wall_depth, depth)
    canvas.depth = np.minimum(depth, SKY_DEPTH).astype(np.float32)
    info = {"horizon": cam.yh, "sun": style.sun}
    return canvas.label, canvas.rgb, canvas.depth.astype(np.float32), info


# ---------------------------------------------------------------------------------------------------------
# Rendering: textures, light, haze, blur, noise, JPEG


def _noise_field(rng: np.random.Generator, height: int, width: int, scale: int) -> np.ndarray:
    """Zero-mean, unit-std smooth noise with features of about ``scale`` pixels."""
    h, w = max(height // scale, 2), max(width // scale, 2)
    n = rng.standard_normal((h + 2, w + 2)).astype(np.float32)
    up = cv2.resize(n, (width + 2 * scale, height + 2 * scale), interpolation=cv2.INTER_CUBIC)
    up = up[scale:scale + height, scale:scale + width]
    return (up - up.mean()) / (up.std() + 1e-6)


def render(rng: np.random.Generator, domain: int, label: np.ndarray, rgb: np.ndarray, depth: np.ndarray) -> np.ndarray:
    """Turn the base colour image into the final uint8 RGB photo of the given domain."""
    style = _style(domain)
    height, width = label.shape
    # per-class luminance textures at three scales
    fine = rng.standard_normal((height, width)).astype(np.float32)
    med = _noise_field(rng, height, width, 4)
    coarse = _noise_field(rng, height, width, 16)
    amps = np.zeros((256, 3), np.float32)
    amps[:] = style.texture["default"]
    for lab in CITYSCAPES_LABELS:
        if lab.name in style.texture:
            amps[lab.label_id] = style.texture[lab.name]
    a = amps[label]
    lum = 1.0 + a[..., 0] * fine + a[..., 1] * med + a[..., 2] * coarse
    img = rgb * lum[..., None]
    if domain == TARGET:
        # vegetation: leafy chroma noise (some yellow-green, some dark)
        veg = (label == LID["vegetation"]) | (label == LID["terrain"])
        leaf = _noise_field(rng, height, width, 2)
        img[veg] += leaf[veg, None] * np.asarray([8.0, 12.0, 2.0], np.float32)
    # global exposure, contrast and saturation
    img *= rng.uniform(0.85, 1.15)
    grey = img.mean(axis=2, keepdims=True)
    img = grey + (img - grey) * rng.uniform(*style.saturation)
    # haze towards an airlight colour, growing with depth
    beta = rng.uniform(*style.haze)
    if beta > 0:
        tr = np.exp(-beta * np.minimum(depth, 400.0))[..., None]
        air = np.asarray(style.haze_color, np.float32) + rng.normal(0, 5, 3).astype(np.float32)
        img = img * tr + air * (1 - tr)
    # optics and sensor
    sigma = rng.uniform(*style.blur)
    if sigma > 0.05:
        img = cv2.GaussianBlur(img, (0, 0), sigma)
    img = img + rng.normal(0, rng.uniform(*style.noise), img.shape).astype(np.float32)
    if domain == TARGET:  # vignetting
        yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
        r2 = ((xx - width / 2) / (width / 2)) ** 2 + ((yy - height / 2) / (height / 2)) ** 2
        img *= (1 - 0.12 * r2)[..., None]
    out = np.clip(np.round(img), 0, 255).astype(np.uint8)
    if style.jpeg is not None:
        q = int(rng.integers(style.jpeg[0], style.jpeg[1] + 1))
        ok, buf = cv2.imencode(".jpg", out[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, q])
        if not ok:
            raise RuntimeError("JPEG encoding failed")
        out = cv2.imdecode(buf, cv2.IMREAD_COLOR)[..., ::-1]
    return np.ascontiguousarray(out)


def make_sample(seed: int, stream: str, index: int, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Image (H, W, 3 uint8 RGB) and labelIds (H, W uint8) of one sample; depends only on its arguments."""
    domain = SOURCE if stream == "source" else TARGET
    rng = np.random.default_rng([seed, _STREAM[stream], index])
    label, rgb, depth, _ = draw_scene(rng, domain, height, width)
    image = render(rng, domain, label, rgb, depth)
    return image, label


# ---------------------------------------------------------------------------------------------------------
# Files


def _gta5_palette() -> list[int]:
    pal = [0] * (256 * 3)
    for lab in CITYSCAPES_LABELS:
        pal[3 * lab.label_id:3 * lab.label_id + 3] = list(lab.color)
    return pal


_GTA5_PALETTE = _gta5_palette()


def _save_png(img: Image.Image, path: Path) -> None:
    img.save(path, format="PNG", compress_level=PNG_COMPRESS_LEVEL, optimize=False)


def cityscapes_stem(city: str, index: int) -> str:
    """``<city>_<sequence>_<frame>``; the frame number 19 is the annotated frame of real Cityscapes sequences."""
    return f"{city}_{index:06d}_000019"


def _job_paths(root: Path, stream: str, index: int, n_cities: int) -> tuple[Path, Path]:
    if stream == "source":
        name = f"{index + 1:05d}.png"
        return root / "gta5" / "images" / name, root / "gta5" / "labels" / name
    split = "train" if stream == "target_train" else "val"
    cities = TARGET_TRAIN_CITIES if split == "train" else TARGET_VAL_CITIES
    city = cities[index * len(cities) // n_cities]
    stem = cityscapes_stem(city, index)
    return (root / "cityscapes" / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png",
            root / "cityscapes" / "gtFine" / split / city / f"{stem}_gtFine_labelIds.png")


def _init_worker() -> None:
    """One thread per worker process: the images are small, and nested thread pools only oversubscribe."""
    cv2.setNumThreads(1)


def _run_job(job: tuple[int, str, int, int, int, int, str]) -> tuple[str, np.ndarray]:
    """Generate and write one sample; returns its stream and its labelId histogram (256 bins)."""
    seed, stream, index, height, width, n_in_stream, root = job
    image, label = make_sample(seed, stream, index, height, width)
    img_path, lbl_path = _job_paths(Path(root), stream, index, n_in_stream)
    _save_png(Image.fromarray(image, "RGB"), img_path)
    if stream == "source":
        lbl = Image.frombytes("P", (width, height), label.tobytes())
        lbl.putpalette(_GTA5_PALETTE)
        _save_png(lbl, lbl_path)
    else:
        _save_png(Image.fromarray(label, "L"), lbl_path)
    return stream, np.bincount(label.ravel(), minlength=256).astype(np.int64)


def _class_histogram(counts: np.ndarray) -> dict:
    """Pixel counts and percentages of the 19 classes (percent of labelled pixels) plus the void share."""
    per_class = {name: int(counts[LID[name]]) for name in CLASSES_19}
    labelled = sum(per_class.values())
    total = int(counts.sum())
    return {
        "pixels": per_class,
        "percent": {k: (100.0 * v / labelled if labelled else 0.0) for k, v in per_class.items()},
        "void_percent_of_all": 100.0 * (total - labelled) / total if total else 0.0,
        "label_ids_present": [int(i) for i in np.flatnonzero(counts)],
    }


def _write_split(root: Path, n_source: int, n_val: int) -> None:
    from scipy.io import savemat  # imported here: scipy is only needed to write the split file

    ids = np.arange(1, n_source + 1, dtype=np.float64)
    n_train = n_source - n_val
    buf = io.BytesIO()
    savemat(buf, {
        "trainIds": ids[:n_train].reshape(-1, 1),
        "valIds": ids[n_train:].reshape(-1, 1),
        "testIds": np.zeros((0, 1), np.float64),
    }, do_compression=False, oned_as="column")
    data = bytearray(buf.getvalue())
    # The MAT v5 header starts with 116 bytes of descriptive text that scipy stamps with the current time;
    # replace it with a fixed text so that the file is byte-identical between runs.
    data[:116] = b"MATLAB 5.0 MAT-file, written by cpsl synth".ljust(116, b" ")
    (root / "gta5" / "split.mat").write_bytes(bytes(data))


def generate(cfg: SynthConfig, out: Path) -> dict:
    """Write the synthetic GTA5-layout source and Cityscapes-layout target under ``out``.

    Everything is written into a temporary directory next to ``out`` and renamed at the end, so an interrupted
    run leaves no partial dataset under ``out``. An existing ``out`` is replaced. Returns a summary with the
    counts and the per-class pixel histogram of each domain.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = staging_dir(out)
    remove_stale_staging(out)  # what a killed run left
    if tmp.exists():
        shutil.rmtree(tmp)
    t0 = time.perf_counter()
    try:
        for d in ("gta5/images", "gta5/labels"):
            (tmp / d).mkdir(parents=True)
        for split, cities in (("train", TARGET_TRAIN_CITIES), ("val", TARGET_VAL_CITIES)):
            for city in cities:
                (tmp / "cityscapes" / "leftImg8bit" / split / city).mkdir(parents=True)
                (tmp / "cityscapes" / "gtFine" / split / city).mkdir(parents=True)
        counts = {"source": cfg.n_source, "target_train": cfg.n_target_train, "target_val": cfg.n_target_val}
        jobs = [(cfg.seed, stream, i, cfg.height, cfg.width, n, str(tmp))
                for stream, n in counts.items() for i in range(n)]
        if cfg.workers > 1:
            with get_context("spawn" if os.name == "nt" else "fork").Pool(cfg.workers, _init_worker) as pool:
                results = pool.map(_run_job, jobs, chunksize=max(1, len(jobs) // (cfg.workers * 8)))
        else:
            results = [_run_job(job) for job in jobs]
        hist = {name: np.zeros(256, np.int64) for name in counts}
        for stream, h in results:
            hist[stream] += h
        _write_split(tmp, cfg.n_source, cfg.n_source_val)
        for split, cities in (("train", TARGET_TRAIN_CITIES), ("val", TARGET_VAL_CITIES)):
            for city in cities:  # a tiny count can leave a city empty: drop its folders
                for kind in ("leftImg8bit", "gtFine"):
                    d = tmp / "cityscapes" / kind / split / city
                    if not any(d.iterdir()):
                        d.rmdir()
        publish_dir(tmp, out, "synth")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {
        "seed": cfg.seed,
        "height": cfg.height,
        "width": cfg.width,
        "images": {"gta5_train": cfg.n_source - cfg.n_source_val, "gta5_val": cfg.n_source_val,
                   "cityscapes_train": cfg.n_target_train, "cityscapes_val": cfg.n_target_val},
        "source": _class_histogram(hist["source"]),
        "target": _class_histogram(hist["target_train"] + hist["target_val"]),
        "seconds": round(time.perf_counter() - t0, 2),
    }
