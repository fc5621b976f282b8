"""Procedural chest-radiograph phantoms: the built-in dataset of the demo and the tests.

Real CXR sets need credentials and gigabytes of downloads; this one is drawn on the fly, bit for
bit reproducible from (seed, split, index, image_size), and looks enough like a PA chest film
(body, lungs with vessel markings, ribs, clavicles, spine, heart, diaphragm) for a ViT to have
anatomy to learn. Five independent findings are visible but not trivial: a raw-pixel logistic
regression stays far from perfect, a pre-trained encoder can do better. Exposure, noise, a
laterality marker and collimation vary as in real films and carry no label information.

Every image has three random streams derived from ``SeedSequence([seed, split_code, index,
stream])``: labels and finding parameters (cheap, so ``labels`` never renders), anatomy and
acquisition parameters, and noise textures. Labels therefore never depend on rendering, and
switching a finding off changes nothing else in the image.
"""

import dataclasses
import math
import numbers
import operator

import numpy as np
import torch
from torch.utils.data import Dataset

CLASS_NAMES = ("cardiomegaly", "effusion", "pneumothorax", "nodule", "consolidation")
PREVALENCE = (0.25, 0.30, 0.20, 0.30, 0.25)
SPLIT_SIZES = {"train": 2048, "val": 512, "test": 512}
_SPLIT_CODES = {"train": 0, "val": 1, "test": 2}
_LABEL_STREAM, _ANATOMY_STREAM, _TEXTURE_STREAM = 0, 1, 2

# Pixel mean/std of the default train split (seed 0, 2048 images) at image_size=64; they
# differ by under 0.01 at 128 and 224 and for other seeds: close enough to standardise inputs.
MEAN = 0.4893
STD = 0.3204

# Lung half-width at height t (in semi-axes ay) is ax (1 + _LUNG_TAPER t) sqrt(1 - t^2): wider
# towards the base. Its maximum, in units of ax, sets the thoracic width for the cardiothoracic
# ratio.
_LUNG_TAPER = 0.2
_T_WIDEST = (math.sqrt(1 + 8 * _LUNG_TAPER**2) - 1) / (4 * _LUNG_TAPER)  # zero of the derivative
_LUNG_WIDEST = (1 + _LUNG_TAPER * _T_WIDEST) * math.sqrt(1 - _T_WIDEST**2)

_GLYPHS = {
    "L": np.array([[1, 0, 0, 0], [1, 0, 0, 0], [1, 0, 0, 0], [1, 0, 0, 0], [1, 1, 1, 1]], bool),
    "R": np.array([[1, 1, 1, 0], [1, 0, 0, 1], [1, 1, 1, 0], [1, 0, 1, 0], [1, 0, 0, 1]], bool),
}


@dataclasses.dataclass(frozen=True)
class _Case:
    """Everything that defines one phantom except its noise textures (drawn from ``key``)."""

    key: tuple  # (seed, split_code, index)
    labels: tuple  # one bool per CLASS_NAMES entry
    finding: dict  # finding geometry, drawn whether or not the finding is present
    anatomy: dict  # anatomy and acquisition parameters


def _rng(key, stream):
    return np.random.default_rng(np.random.SeedSequence(list(key) + [stream]))


class _Uniforms:
    """Uniform draws from one pre-drawn vector: one numpy call instead of dozens (speed)."""

    def __init__(self, rng, n):
        self._x = iter(rng.random(n).tolist())

    def __call__(self, lo, hi):
        return lo + (hi - lo) * next(self._x)

    def sign(self):
        return -1 if next(self._x) < 0.5 else 1

    def chance(self, p):
        return next(self._x) < p


def _draw_labels(key):
    """Labels and finding geometry. A fixed number of draws, so each finding's geometry does not
    depend on which other findings are present. Sides: -1 is the patient's right (image left)."""
    r = _rng(key, _LABEL_STREAM)
    labels = tuple(bool(x) for x in r.random(5) < np.asarray(PREVALENCE))
    u = _Uniforms(r, 40)
    eff = u(0, 1)
    f = {
        # Cardiothoracic ratio: normal and enlarged ranges do not overlap.
        "ctr": (u(0.44, 0.49), u(0.51, 0.56)),
        "effusion_sides": (-1,) if eff < 0.4 else (1,) if eff < 0.8 else (-1, 1),
        "effusion_height": (u(0.10, 0.45), u(0.10, 0.45)),
        "ptx_side": u.sign(),
        "ptx_depth": u(0.15, 0.45),
        "ptx_angle": u(-0.5 * math.pi - 0.4, 0.1),  # deepest part: apex (-pi/2) to lateral (0)
        "nodule_count": 1 + int(3 * u(0, 1)),
        # per nodule: side, lateral / vertical position in lung semi-axes, radius, density
        "nodules": tuple(
            (u.sign(), u(-0.3, 0.7), u(-0.7, 0.3), u(0.04, 0.12), u(0.2, 0.45)) for _ in range(3)
        ),
        "cons_side": u.sign(),
        "cons_pos": (u(-0.1, 0.6), u(-0.6, 0.35)),
        "cons_radius": (u(0.12, 0.26), u(0.12, 0.28)),
        "cons_density": u(0.3, 0.6),
    }
    return labels, f


def _draw_anatomy(key):
    u = _Uniforms(_rng(key, _ANATOMY_STREAM), 64)
    return {
        # global pose and patient size
        "tx": u(-0.10, 0.10),
        "ty": u(-0.07, 0.07),
        "scale": u(0.75, 1.10),
        "rot": math.radians(u(-4.0, 4.0)),
        "body_w": u(0.84, 0.98),
        "neck_w": u(0.22, 0.30),
        "shoulder_v": u(-0.95, -0.82),
        "tissue": u(1.0, 1.4),
        # lungs (one shape, mirrored), diaphragm (the patient's right dome is higher)
        "cx": u(0.38, 0.46),
        "cy": u(-0.14, -0.06),
        "ax": u(0.28, 0.36),
        "ay": u(0.64, 0.72),
        "air": u(0.8, 1.0),
        "dome_l": u(0.30, 0.40),
        "dome_rise": u(0.0, 0.06),
        "dome_k": u(1.2, 1.8),
        "heart_u": u(-0.07, 0.07),
        "heart_v": u(0.10, 0.22),
        "heart_h": u(0.22, 0.34),
        "heart_d": u(0.04, 0.12),
        "carina_v": u(-0.30, -0.20),
        "rib_top": u(-0.84, -0.76),
        "rib_dy": u(0.12, 0.14),
        "rib_d": u(0.08, 0.15),
        "ant_top": u(-0.55, -0.45),
        "clav_v": u(-0.72, -0.62),
        "vert_phase": u(0.0, 1.0),
        "vessel_d": u(0.22, 0.32),
        "bubble": u.chance(0.6),
        "bubble_u": u(0.2, 0.4),
        "bubble_r": u(0.06, 0.12),
        # acquisition: window (brightness / contrast), gamma, gradient, noise
        "exposure": u(0.8, 1.25),
        "lo": u(-0.06, 0.04),
        "hi": u(0.80, 0.98),
        "gamma": u(0.75, 1.35),
        "grad": u(0.0, 0.12),
        "grad_angle": u(0.0, 2 * math.pi),
        "noise": u(0.008, 0.035),
        "marker": u.chance(0.5),
        "marker_glyph": "L" if u.chance(0.5) else "R",
        "marker_x": u(0.55, 0.78) * u.sign(),
        "marker_y": u(-0.92, -0.75),
        "marker_h": u(0.16, 0.22),
        "collimation": u.chance(0.35),
        "collim_w": tuple(u(0.0, 0.16) for _ in range(4)),
        "collim_value": u(0.0, 0.1) if u.chance(0.5) else u(0.85, 1.0),
    }


def _case(key):
    labels, finding = _draw_labels(key)
    return _Case(key=key, labels=labels, finding=finding, anatomy=_draw_anatomy(key))


def _sig(z):
    # tanh form: no overflow warnings for large |z|
    return 0.5 + 0.5 * np.tanh(z)


def _noise(grid, a, b):
    """Smooth periodic value noise: ``grid`` (G, G), G a power of two, sampled at continuous
    cell coordinates (a along columns, b along rows)."""
    g = grid.shape[0]
    flat = grid.ravel()
    a0, b0 = np.floor(a), np.floor(b)
    fa, fb = a - a0, b - b0
    fa, fb = fa * fa * (3 - 2 * fa), fb * fb * (3 - 2 * fb)  # smoothstep: no grid creases
    # Wrap with a bit mask (integer % is slow) and gather from the flat grid (faster than 2-D).
    i0 = a0.astype(np.intp) & (g - 1)
    j0 = (b0.astype(np.intp) & (g - 1)) * g
    i1, j1 = (i0 + 1) & (g - 1), (j0 + g) & (g * g - 1)
    c00, c01 = flat.take(j0 + i0), flat.take(j0 + i1)
    c10, c11 = flat.take(j1 + i0), flat.take(j1 + i1)
    top = c00 + (c01 - c00) * fa
    return top + (c10 + (c11 - c10) * fa - top) * fb


def _render(case, size):
    """One phantom as float32 (size, size) in [0, 1].

    Anatomy lives in a canonical frame (u right, v down, about [-1, 1]), so a phantom looks the
    same at any size. The image is 1 - exp(-density): ribs or nodules show less over the dense
    mediastinum than over the lungs, as on film. u < 0 is the patient's right (PA view).
    """
    a, f, on = case.anatomy, case.finding, dict(zip(CLASS_NAMES, case.labels, strict=True))
    tex = _rng(case.key, _TEXTURE_STREAM)
    g_vessel = tex.standard_normal((2, 32, 32), dtype=np.float32)
    g_patch = tex.standard_normal((2, 16, 16), dtype=np.float32)
    f32 = np.float32

    x = (np.arange(size, dtype=f32) + f32(0.5)) * f32(2.0 / size) - f32(1.0)
    X, Y = x[None, :], x[:, None]
    c, s = math.cos(a["rot"]), math.sin(a["rot"])
    dx, dy = X - a["tx"], Y - a["ty"]
    u = (c * dx + s * dy) / a["scale"]
    v = (-s * dx + c * dy) / a["scale"]
    px = 2.0 / size / a["scale"]  # one pixel in canonical units: floor for edge widths
    au = np.abs(u)
    right = u < 0
    side = np.where(right, f32(-1), f32(1))

    # Body: soft tissue, thicker in the middle; shoulders narrow to the neck at the top.
    w = a["neck_w"] + (a["body_w"] - a["neck_w"]) * _sig((v - a["shoulder_v"]) / 0.08)
    w = w * (1 - 0.06 * (v - 0.1) ** 2)  # barrel-shaped chest
    body = _sig((w - au) / max(0.02, px))
    D = a["tissue"] * (0.2 + 0.8 * np.sqrt(np.clip(1 - (u / w) ** 2, 0, 1))) * body

    # Lungs: mirrored egg shapes, wider at the base, flat mediastinal border, cut by the domes.
    cx, cy, ax, ay = a["cx"], a["cy"], a["ax"], a["ay"]
    p, q = au - cx, v - cy
    axe = np.maximum(ax * (1 + _LUNG_TAPER * q / ay) * np.where(p < 0, f32(0.75), f32(1)), 0.05)
    r2 = (p / axe) ** 2 + (q / ay) ** 2
    dome = np.where(right, f32(a["dome_l"] - a["dome_rise"]), f32(a["dome_l"]))
    vd = dome + a["dome_k"] * p**2  # lowest laterally: sharp costophrenic angles
    lung = _sig((1 - r2) / 0.08) * _sig((vd - v) / max(0.02, px))

    # Heart: two thirds of its width to the patient's left (image right).
    ctr = f["ctr"][1] if on["cardiomegaly"] else f["ctr"][0]
    hw = ctr * (cx + _LUNG_WIDEST * ax)  # half width = ctr * thoracic width / 2
    hh = a["heart_h"] * (0.6 + 0.9 * ctr)  # enlarged hearts are taller too
    hr2 = ((u - hw / 3 - a["heart_u"]) / hw) ** 2 + ((v - a["heart_v"]) / hh) ** 2
    heart = _sig((1 - hr2) / 0.1)
    lung = lung * (1 - heart)
    D += a["heart_d"] * heart * body

    if on["effusion"]:
        # Fluid fills the base up to a meniscus that climbs laterally, blunting the angle.
        p_cp = 0.95 * ax
        v_cp = dome + a["dome_k"] * p_cp**2
        t = np.clip((au - 0.1) / (cx + p_cp - 0.1), 0, 1)
        fluid = np.zeros_like(u)
        for sd in f["effusion_sides"]:
            level = v_cp - f["effusion_height"][sd > 0] * (0.45 + 0.55 * t * t)
            fluid += (side == sd) * _sig((v - level) / 0.03)
        fluid *= lung
        lung = lung - fluid
        D += 0.1 * fluid

    vessel_mask = lung
    if on["pneumothorax"]:
        # Peripheral rim of one lung with no markings, bounded by a thin pleural line.
        rho = np.sqrt(r2)
        wgt = np.clip(np.cos(np.arctan2(q / ay, p / axe) - f["ptx_angle"]), 0, 1) ** 0.7
        r_c = 1 - f["ptx_depth"] * wgt
        this = (side == f["ptx_side"]) * lung * _sig((wgt - 0.15) / 0.05)
        ptx = this * _sig((rho - r_c) / 0.02)
        line = this * np.exp(-(((rho - r_c) / max(0.015, 0.6 * px / ax)) ** 2))
        vessel_mask = lung * (1 - ptx)
        D += 0.15 * line - 0.2 * ptx

    D -= a["air"] * lung * (0.6 + 0.4 * np.sqrt(np.clip(1 - r2, 0, 1)))

    # Vessel markings: zero-crossing ridges of noise in polar coordinates around each hilum,
    # so they radiate outwards and fade towards the periphery.
    dxh, dyh = au - 0.17, v + 0.05
    rh = np.sqrt(dxh * dxh + dyh * dyh)
    th = np.arctan2(dyh, dxh) * f32(32 / (2 * math.pi))  # one turn = one grid period
    off = np.where(right, f32(16), f32(0))  # a different texture on each side
    n1 = _noise(g_vessel[0], th, rh * 5 + off)
    n2 = _noise(g_vessel[1], 2 * th, rh * 10 + off)
    ridges = 0.65 * np.exp(-((n1 / 0.3) ** 2)) + 0.35 * np.exp(-((n2 / 0.3) ** 2))
    D += a["vessel_d"] * ridges * np.exp(-rh / 0.55) * vessel_mask
    D += 0.15 * np.exp(-(dxh * dxh + dyh * dyh) / (2 * 0.06**2)) * body  # hila

    # Trachea (air column down to the carina), spine with vertebral bodies.
    D -= 0.3 * _sig((0.045 - au) / 0.012) * _sig((a["carina_v"] - v) / 0.03) * body
    vert = 0.75 + 0.25 * _sig(3 * np.cos((2 * math.pi) * (v / 0.135 - a["vert_phase"])))
    D += 0.35 * _sig((0.075 - au) / max(0.012, px)) * vert * body

    # Posterior ribs: one periodic band field for all of them, curving down laterally.
    lat = _sig((cx + 1.1 * ax + 0.03 - au) / 0.03) * _sig((au - 0.07) / 0.02) * body
    lat *= _sig((vd + 0.1 - v) / 0.06)  # fade out below the domes
    phi = (v - (-0.2 * au + 0.8 * au * au) - a["rib_top"]) / a["rib_dy"]
    k = np.floor(phi)
    z = (phi - k - 0.5) / 0.22
    D += a["rib_d"] * np.exp(-z * z) * ((k >= 0) & (k < 10)) * lat
    # Fainter anterior ribs, sloping down medially.
    phi = (v + 0.35 * au - a["ant_top"]) / (1.1 * a["rib_dy"])
    k = np.floor(phi)
    z = (phi - k - 0.5) / 0.15
    D += 0.05 * np.exp(-z * z) * ((k >= 0) & (k < 6)) * _sig((au - 0.14) / 0.03) * lat
    # Clavicles.
    z = (v - (a["clav_v"] - 0.25 * au + 0.3 * au * au)) / 0.035
    D += 0.35 * np.exp(-z * z) * _sig((au - 0.06) / 0.02) * _sig((0.62 - au) / 0.03) * body

    if a["bubble"]:  # gastric air under the left dome
        bd = ((u - a["bubble_u"]) / a["bubble_r"]) ** 2 + ((v - a["dome_l"] - 0.12) / 0.06) ** 2
        D -= 0.3 * _sig((1 - bd) / 0.3) * body

    if on["nodule"]:
        for sd, pn, qn, rad, dens in f["nodules"][: f["nodule_count"]]:
            d2 = ((u - sd * (cx + pn * ax)) ** 2 + (v - (cy + qn * ay)) ** 2) / rad**2
            D += dens * np.exp(-d2 * d2)

    if on["consolidation"]:
        sd, (pn, qn), (rx, ry) = f["cons_side"], f["cons_pos"], f["cons_radius"]
        uc, vc = sd * (cx + pn * ax), cy + qn * ay
        blob = _sig((1 - ((u - uc) / rx) ** 2 - ((v - vc) / ry) ** 2) / 0.4)
        patch = _noise(g_patch[0], (u + 2) * 5, (v + 2) * 5)
        patch += 0.6 * _noise(g_patch[1], (u + 2) * 11, (v + 2) * 11)
        D += f["cons_density"] * blob * _sig((patch + 0.2) / 0.3) * lung

    # Acquisition: exposure, window, gamma, smooth gradient, signal-dependent noise.
    img = 1 - np.exp(-np.maximum(D, 0) * a["exposure"])
    img = np.clip((img - a["lo"]) / (a["hi"] - a["lo"]), 0, 1) ** a["gamma"]
    ga = a["grad_angle"]
    img += a["grad"] * 0.5 * (math.cos(ga) * X + math.sin(ga) * Y)
    noise = tex.standard_normal((size, size), dtype=f32)
    img += a["noise"] * np.sqrt(np.clip(img, 0, 1) + 0.05) * noise

    if a["marker"]:
        glyph = _GLYPHS[a["marker_glyph"]]
        cell = a["marker_h"] / 5
        gi = np.floor((Y - a["marker_y"]) / cell).astype(np.intp)
        gj = np.floor((X - a["marker_x"]) / cell).astype(np.intp)
        inside = (gi >= 0) & (gi < 5) & (gj >= 0) & (gj < 4)
        img = np.where(inside & glyph[np.clip(gi, 0, 4), np.clip(gj, 0, 3)], f32(0.95), img)
    if a["collimation"]:
        left, right_, top, bottom = a["collim_w"]
        outside = (X < -1 + left) | (X > 1 - right_) | (Y < -1 + top) | (Y > 1 - bottom)
        img = np.where(outside, f32(a["collim_value"]), img)
    return np.clip(img, 0, 1).astype(f32)


def _is_int(x):
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


class SyntheticCXR(Dataset):
    """Procedural PA chest radiographs with five findings, rendered on the fly.

    Args:
        split: ``"train"`` (2048 images), ``"val"`` (512), ``"test"`` (512) or ``"all"``
            (train, val and test in that order). Splits never share an image.
        num_images: size of the split instead of its default (not with ``"all"``).
        image_size: side S of the square images, at least 32.
        seed: non-negative int; the same (seed, split, index, image_size) always gives the
            same image and labels, in any order and in any process.
        normalize: standardise images with the fixed dataset constants ``MEAN``/``STD``.

    Returns of ``ds[i]``: ``{"image": float32 (1, S, S) in [0, 1] (or standardised),
    "labels": float32 (C,) of 0/1 in ``class_names`` order, "id": "synthetic-<split>-<i:06d>"}``.

    Attributes: ``labels`` float32 (n, C), computed without rendering; ``ids`` list of n str;
    ``class_names`` = ``CLASS_NAMES`` (C = 5). ``images(start, stop)`` renders a range at once.

    Example::

        >>> ds = SyntheticCXR("val", num_images=8, image_size=64)
        >>> item = ds[3]
        >>> item["image"].shape, item["labels"].shape, item["id"]
        (torch.Size([1, 64, 64]), torch.Size([5]), 'synthetic-val-000003')
        >>> ds.images(0, 4).shape, ds.labels.shape
        (torch.Size([4, 1, 64, 64]), torch.Size([8, 5]))
    """

    class_names = CLASS_NAMES

    def __init__(self, split="train", num_images=None, image_size=64, seed=0, normalize=False):
        if split != "all" and split not in SPLIT_SIZES:
            raise ValueError(f"split must be one of {[*SPLIT_SIZES, 'all']}, got {split!r}")
        if not _is_int(image_size) or image_size < 32:
            raise ValueError(f"image_size must be an int >= 32, got {image_size!r}")
        if not _is_int(seed) or seed < 0:
            raise ValueError(f"seed must be a non-negative int, got {seed!r}")
        if num_images is not None:
            if split == "all":
                raise ValueError("num_images cannot be combined with split='all'")
            if not _is_int(num_images) or num_images < 1:
                raise ValueError(f"num_images must be an int >= 1, got {num_images!r}")
        image_size, seed = int(image_size), int(seed)
        splits = ("train", "val", "test") if split == "all" else (split,)
        self._index = [
            (name, i)
            for name in splits
            for i in range(SPLIT_SIZES[name] if num_images is None else int(num_images))
        ]
        self.split, self.image_size, self.seed, self.normalize = split, image_size, seed, normalize
        self.ids = [f"synthetic-{name}-{i:06d}" for name, i in self._index]
        self.labels = torch.tensor(
            [_draw_labels(self._key(j))[0] for j in range(len(self))], dtype=torch.float32
        ).reshape(len(self), len(CLASS_NAMES))

    def __len__(self):
        return len(self._index)

    def _key(self, j):
        name, i = self._index[j]
        return (self.seed, _SPLIT_CODES[name], i)

    def _position(self, index):
        j = operator.index(index)
        if not -len(self) <= j < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} images")
        return j % len(self)

    def _image(self, j):
        img = torch.from_numpy(_render(_case(self._key(j)), self.image_size))
        return (img - MEAN) / STD if self.normalize else img

    def __getitem__(self, index):
        j = self._position(index)
        return {"image": self._image(j)[None], "labels": self.labels[j].clone(), "id": self.ids[j]}

    def images(self, start=0, stop=None):
        """Render images ``start:stop`` (default: to the end) as float32 (n, 1, S, S)."""
        stop = len(self) if stop is None else stop
        if not 0 <= start <= stop <= len(self):
            raise IndexError(f"range [{start}, {stop}) out of bounds for {len(self)} images")
        out = torch.empty(stop - start, 1, self.image_size, self.image_size)
        for n, j in enumerate(range(start, stop)):
            out[n, 0] = self._image(j)
        return out
