"""The four procedural scenes: how a polyp, fundus, skin or ultrasound image and its label are drawn.

Each renderer takes a geometry generator ``g`` and a texture generator ``t``, the side ``S`` and
whether the image is lesion-free, and returns ``(image (3,S,S) float in [0,1], mask (S,S) class
indices, label (S,S) lesion instances, extra meta)``. :mod:`datamodules.procedural` seeds them.
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np
from scipy import ndimage


@lru_cache(maxsize=8)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates ``(X, Y)``, each (S,S) in [-1, 1]; Y grows downwards."""
    c = (np.arange(size, dtype=np.float32) + 0.5) / size * 2 - 1
    X, Y = np.meshgrid(c, c, indexing="xy")
    X.flags.writeable = Y.flags.writeable = False
    return X, Y


@lru_cache(maxsize=32)
def _bspline_weights(size: int, cells: int) -> np.ndarray:
    """Cubic B-spline interpolation matrix (S, cells+3) from a coarse knot grid to S pixels."""
    t = np.linspace(0, cells, size)[:, None] - (np.arange(cells + 3) - 1)[None, :]
    a = np.abs(t)
    w = np.where(a < 1, 2 / 3 - a ** 2 + a ** 3 / 2, np.where(a < 2, (2 - a) ** 3 / 6, 0.0))
    return w.astype(np.float32)


def _noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Smooth value noise with ``cells`` features per side, resolution-independent; (S,S), std≈1."""
    w = _bspline_weights(size, cells)
    out = w @ rng.standard_normal((cells + 3, cells + 3)).astype(np.float32) @ w.T  # separable: 2 matmuls
    return (out - out.mean()) / (out.std() + 1e-6)


def _blob(rng, X, Y, cx, cy, rx, ry, irregular=0.08, k=4) -> np.ndarray:
    """Normalised radial distance of an irregular ellipse; < 1 inside. Returns (S,S)."""
    a = rng.uniform(0, np.pi)
    dx, dy = X - cx, Y - cy
    u = (dx * np.cos(a) + dy * np.sin(a)) / rx
    v = (-dx * np.sin(a) + dy * np.cos(a)) / ry
    rho = np.hypot(u, v)
    z = (u + 1j * v) / np.maximum(rho, 1e-9)  # e^{i theta}: harmonics by powers, no trig per pixel
    amp = rng.uniform(0, irregular, k) / np.arange(1, k + 1) ** 0.5
    coef = amp * np.exp(1j * rng.uniform(0, 2 * np.pi, k))
    edge, zk = np.ones_like(u), z
    for j in range(k):
        zk = zk * z
        edge += (coef[j] * zk).real  # amp_j * cos((j+2) theta + phase_j)
    return rho / edge


def _alpha(q: np.ndarray, r_px: float, soft_px: float = 1.0) -> np.ndarray:
    """Soft coverage of a blob (0..1) with an edge ``soft_px`` wide; 0.5 exactly at q = 1."""
    return np.clip(0.5 + (1 - q) * r_px / soft_px, 0, 1)


def _curves(rng, size, n, length, curl, start=None, steps=24) -> np.ndarray:
    """Rasterise ``n`` smooth random curves (hair, vessels) into a binary (S,S) float image."""
    canvas = np.zeros((size, size), np.float32)
    if n == 0:
        return canvas
    p0 = rng.uniform(-1.1, 1.1, (n, 2)) if start is None else np.array([start(rng) for _ in range(n)], float)
    th = rng.uniform(0, 2 * np.pi, (n, 1))
    walk = curl * rng.standard_normal((n, steps)).cumsum(1) / steps ** 0.5
    ang = th + walk + rng.uniform(-curl, curl, (n, 1))
    seg = rng.uniform(*length, (n, 1, 1)) / steps
    pts = p0[:, None] + np.cumsum(np.stack([np.cos(ang), np.sin(ang)], -1) * seg, 1)  # (n,steps,2)
    # densify every segment to < half-pixel spacing so a curve stays connected at any size
    f = int(np.ceil(length[1] / steps * size)) + 1
    frac = np.linspace(0, 1, f, endpoint=False)[None, None, :, None]
    dense = (pts[:, :-1, None] + (pts[:, 1:] - pts[:, :-1])[:, :, None] * frac).reshape(-1, 2)
    ij = np.round((dense + 1) / 2 * size - 0.5).astype(int)
    ok = (ij >= 0).all(1) & (ij < size).all(1)
    canvas[ij[ok, 1], ij[ok, 0]] = 1.0
    return canvas


def _line(canvas: np.ndarray, width_px: float) -> np.ndarray:
    """Soft line intensity (0..1) of width ``width_px`` from a rasterised curve canvas."""
    sigma = max(width_px / 2.0, 0.35)
    out = ndimage.gaussian_filter(canvas, sigma)
    return np.clip(out * sigma * 4.0, 0, 1)  # saturate: no beading on diagonal curves


def _lesion_areas(rng, n: int, small_fraction: float, large: tuple) -> np.ndarray:
    """Area fractions: ``small_fraction`` under 2 % (U[0.4 %, 2 %]), the rest log-uniform in ``large``."""
    small = rng.random(n) < small_fraction
    return np.where(small, rng.uniform(0.004, 0.019, n), np.exp(rng.uniform(*np.log(large), n)))


def _n_lesions(rng, normal: bool) -> int:
    return 0 if normal else int(rng.choice([1, 2, 3], p=[0.7, 0.22, 0.08]))


def _polyp(g, t, S, normal):
    X, Y = _grid(S)
    R2 = X ** 2 + Y ** 2
    base = np.array([0.80, 0.40, 0.34]) * g.uniform(0.85, 1.1, 3)
    illum = (1 - g.uniform(0.4, 0.7) * R2 / 2) * (1 + 0.12 * _noise(g, S, 3))
    lx, ly = g.uniform(-0.6, 0.6, 2)  # dark lumen: the colon continues away from the scope
    illum *= 1 - g.uniform(0.5, 0.9) * np.exp(-((X - lx) ** 2 + (Y - ly) ** 2) / (2 * g.uniform(0.12, 0.3) ** 2))
    shade = np.ones((S, S), np.float32)
    for _ in range(g.integers(1, 5)):  # folds: arcs of circles centred outside the view
        a, dist, w = g.uniform(0, 2 * np.pi), g.uniform(1.0, 2.2), g.uniform(0.03, 0.08)
        d = np.hypot(X - dist * np.cos(a), Y - dist * np.sin(a)) - dist + g.uniform(-0.6, 0.5)
        shade *= 1 - g.uniform(0.25, 0.5) * np.exp(-(d / w) ** 2)
        shade *= 1 + 0.15 * np.exp(-((d + 1.5 * w) / w) ** 2)
    vessel = np.exp(-(_noise(g, S, 7) / 0.15) ** 2) * g.uniform(0.1, 0.35)
    col = base[:, None, None] * shade * (1 - vessel * np.array([0.2, 0.55, 0.5])[:, None, None])
    label = np.zeros((S, S), np.int16)
    areas = _lesion_areas(g, _n_lesions(g, normal), 0.25, (0.02, 0.25))
    for k, area in enumerate(areas, 1):
        r = np.sqrt(4 * area / np.pi)
        rad = g.uniform(0, 0.75 - 0.5 * r)
        ang = g.uniform(0, 2 * np.pi)
        cx, cy, asp = rad * np.cos(ang), rad * np.sin(ang), g.uniform(0.75, 1.3)
        q = _blob(g, X, Y, cx, cy, r * asp ** 0.5, r / asp ** 0.5, irregular=0.15)
        h = np.sqrt(np.clip(1 - q ** 2, 0, 1))
        light = 1 + 0.35 * np.clip(-((X - cx) + (Y - cy)) / (r * 1.4), -1, 1) * h
        rim = 1 - 0.35 * np.clip(q, 0, 1) ** 6
        tint = np.array([g.uniform(0.95, 1.15), g.uniform(0.9, 1.35), g.uniform(0.9, 1.3)])
        tex = 1 + g.uniform(0.03, 0.1) * _noise(g, S, 12)
        pc = base[:, None, None] * tint[:, None, None] * light * rim * tex
        al = _alpha(q, r * S / 2)
        col = col * (1 - al) + pc * al
        label[q < 1] = k
    spec = np.zeros((S, S), np.float32)  # specular highlights, on mucosa and lesions alike
    for _ in range(g.integers(2, 9)):
        sx, sy, ss = g.uniform(-0.8, 0.8), g.uniform(-0.8, 0.8), g.uniform(0.015, 0.04)
        spec = np.maximum(spec, np.exp(-((X - sx) ** 2 + (Y - sy) ** 2 * g.uniform(1, 3)) / (2 * ss ** 2)))
    fov_r = g.uniform(0.9, 1.15)  # > 1: the circular field of view is clipped by the frame
    fov = np.clip((fov_r - np.sqrt(R2)) * S / 2, 0, 1)
    img = col * illum * (1 + 0.04 * t.standard_normal((S, S)))
    img = img * (1 - spec) + spec * 0.97
    img = img * fov
    label[fov < 0.5] = 0
    return img, label > 0, label, {}


def _fundus(g, t, S, normal):
    X, Y = _grid(S)
    cx0, cy0 = g.uniform(-0.05, 0.05, 2)
    R = np.hypot(X - cx0, Y - cy0)
    fov = np.clip((g.uniform(0.95, 1.3) - R) * S / 2, 0, 1)
    base = np.array([0.78, 0.36, 0.2]) * g.uniform([0.8, 0.75, 0.5], [1.15, 1.3, 1.6])  # pale to dark fundi
    bright = (1 - 0.3 * R ** 3) * (1 + 0.1 * _noise(g, S, 4) + 0.04 * _noise(g, S, 16))
    side = g.choice([-1.0, 1.0])  # left / right eye
    dx, dy = side * g.uniform(0.05, 0.35), g.uniform(-0.2, 0.2)
    mac = np.exp(-((X - dx + side * 0.9) ** 2 + (Y - dy) ** 2) / (2 * 0.2 ** 2))
    col = base[:, None, None] * bright * (1 - 0.35 * mac)
    rd = g.uniform(0.17, 0.3)
    glaucoma = bool(g.random() < 0.3)
    cdr = g.uniform(0.6, 0.85) if glaucoma else g.uniform(0.25, 0.55)
    asp = g.uniform(1.0, 1.2)
    qd = _blob(g, X, Y, dx, dy, rd, rd * asp, irregular=0.05)
    off = (1 - cdr) * rd * 0.5 * g.uniform(0, 1)
    ccx, ccy = dx - side * off, dy + g.uniform(-0.3, 0.3) * off
    qc = _blob(g, X, Y, ccx, ccy, rd * cdr, rd * cdr * asp, irregular=0.05)
    if g.random() < 0.5:  # peripapillary atrophy: an unlabelled pale crescent beside the disc
        qp = _blob(g, X, Y, dx - side * rd * 0.35, dy + g.uniform(-0.1, 0.1), rd * 1.3, rd * asp * 1.15, 0.1)
        ap = _alpha(qp, rd * S / 2, 2.0) * (qd > 1) * g.uniform(0.3, 0.7)
        col = col * (1 - ap) + np.array([0.92, 0.7, 0.5])[:, None, None] * ap
    ad = _alpha(qd, rd * S / 2, 2.0) * g.uniform(0.4, 0.9)
    disc_col = np.array([0.98, 0.72, 0.42]) * g.uniform(0.9, 1.05, 3)
    col = col * (1 - ad) + disc_col[:, None, None] * ad * (1 + 0.05 * _noise(g, S, 10))
    ac = _alpha(qc, rd * cdr * S / 2, 2.0) * g.uniform(0.3, 0.8)  # cup edge is subtle in reality
    col = col * (1 - ac) + np.array([1.0, 0.92, 0.74])[:, None, None] * ac
    start = lambda r: (ccx + r.normal(0, 0.02), ccy + r.normal(0, 0.02))  # noqa: E731
    thick = _line(_curves(g, S, g.integers(4, 7), (0.8, 1.8), 0.8, start), 0.035 * S / 2)
    thin = _line(_curves(g, S, g.integers(5, 10), (0.3, 1.2), 1.2, start), 0.018 * S / 2)
    v = np.maximum(thick, 0.7 * thin)
    col = col * (1 - v * np.array([0.45, 0.65, 0.55])[:, None, None])
    img = col * fov * (1 + 0.03 * t.standard_normal((S, S)))
    label = np.where(qd < 1, 1, 0).astype(np.int16)
    label[(qc < 1) & (qd < 1 - 1.5 / (rd * S / 2))] = 2  # a neuroretinal rim of >= 1 px always remains
    label[fov < 0.5] = 0
    extra = {"cdr": float(cdr), "glaucoma": glaucoma}
    return img, label, label, extra


def _skin(g, t, S, normal):
    X, Y = _grid(S)
    tone = g.uniform(0, 1)
    base = (1 - tone) * np.array([0.94, 0.78, 0.68]) + tone * np.array([0.72, 0.5, 0.38])
    lines = np.exp(-(_noise(g, S, 10) / 0.2) ** 2)
    col = base[:, None, None] * (1 + 0.06 * _noise(g, S, 3)) * (1 - 0.07 * lines)
    label = np.zeros((S, S), np.int16)
    for k in range(g.integers(0, 5)):  # freckles: small unlabelled pigment that looks like lesion
        q = _blob(g, X, Y, *g.uniform(-0.9, 0.9, 2), *g.uniform(0.02, 0.05, 2))
        al = _alpha(q, 0.03 * S / 2, 1.0) * g.uniform(0.2, 0.5)
        col = col * (1 - al) + np.array([0.5, 0.33, 0.24])[:, None, None] * al
    areas = [] if normal else _lesion_areas(g, 1, 0.15, (0.04, 0.45))
    for k, area in enumerate(areas, 1):
        r = np.sqrt(4 * area / np.pi)
        cx, cy = g.uniform(-0.45, 0.45, 2) * (1.1 - r)
        asp = g.uniform(0.7, 1.4)
        q = _blob(g, X, Y, cx, cy, r * asp ** 0.5, r / asp ** 0.5, irregular=0.2, k=5)
        q = q + 0.06 * _noise(g, S, 10)  # ragged border
        dark = np.array([0.5, 0.3, 0.2]) * g.uniform(0.55, 1.15)
        contrast = g.uniform(0.35, 0.95)  # some lesions are barely darker than the skin
        h = np.clip(1 - q, 0, 1) ** 0.5
        blotch = 1 - 0.25 * np.clip(_noise(g, S, 6), 0, None) - 0.2 * np.exp(-(_noise(g, S, 18) / 0.3) ** 2)
        al = _alpha(q, r * S / 2, g.uniform(1.0, 3.0)) * contrast * (0.6 + 0.4 * h)
        col = col * (1 - al) + dark[:, None, None] * blotch * al
        label[q < 1] = k
    hair = _line(_curves(g, S, g.integers(0, 14), (0.6, 2.2), 1.0), g.uniform(0.006, 0.014) * S)
    col = col * (1 - hair * g.uniform(0.6, 0.85))
    vig = g.uniform(1.0, 1.5)  # dermoscope: dark corners outside the lens for some images
    fov = np.clip((vig - np.hypot(X, Y)) * S / 4, 0.05, 1)
    img = col * fov * (1 + 0.03 * t.standard_normal((S, S)))
    return img, label > 0, label, {}


def _ultrasound(g, t, S, normal):
    X, Y = _grid(S)
    ay = -1 - g.uniform(1.2, 2.5)  # apex above the frame: a wide, shallow-curved sector
    r, th = np.hypot(X, Y - ay), np.arctan2(X, Y - ay)
    half, r0 = np.arctan(g.uniform(0.7, 1.0) / -ay), -1 - ay + g.uniform(0.02, 0.1)
    fan = np.clip((half - np.abs(th)) * r * S / 2, 0, 1) * np.clip((r - r0) * S / 2, 0, 1)
    echo = 0.55 + 0.2 * _noise(g, S, 4) + 0.1 * np.sin(2 * np.pi * (r * g.uniform(2, 4) + 0.1 * _noise(g, S, 3)))
    for _ in range(g.integers(1, 4)):  # bright fascia lines, roughly parallel to the skin
        rl = r0 + g.uniform(0.1, 1.4)
        echo += g.uniform(0.3, 0.7) * np.exp(-((r - rl + 0.06 * _noise(g, S, 3)) / 0.025) ** 2)
    for _ in range(g.integers(0, 3)):  # unlabelled anechoic ducts: dark like the mass, but tubular
        q = _blob(g, X, Y, *g.uniform(-0.5, 0.5, 2), g.uniform(0.2, 0.4), g.uniform(0.03, 0.06))
        echo *= 1 - g.uniform(0.4, 0.75) * _alpha(q, 0.04 * S / 2, 1.5)
    label = np.zeros((S, S), np.int16)
    areas = _lesion_areas(g, 0 if normal else 1 + int(g.random() < 0.1), 0.25, (0.02, 0.18))
    post = "none"
    for k, area in enumerate(areas, 1):
        rr = np.sqrt(4 * area / np.pi)
        tc0, rc0 = g.uniform(-0.6, 0.6) * half, r0 + rr + g.uniform(0.05, 1.7 - 2 * rr)
        cx, cy = rc0 * np.sin(tc0), ay + rc0 * np.cos(tc0)
        asp = g.uniform(1.0, 1.8)  # wider than tall (benign) or taller (malignant)
        asp = asp if g.random() < 0.7 else 1 / asp
        malignant = g.random() < 0.4
        q = _blob(g, X, Y, cx, cy, rr * asp ** 0.5, rr / asp ** 0.5, 0.3 if malignant else 0.1, 8 if malignant else 4)
        echo = echo * (1 - _alpha(q, rr * S / 2, 1.2) * (1 - g.uniform(0.08, 0.4)))
        post = str(g.choice(["shadow", "enhancement", "none"], p=[0.4, 0.4, 0.2]))
        rc, tc = np.hypot(cx, cy - ay), np.arctan2(cx, cy - ay)
        dth = rr / rc * g.uniform(0.5, 0.9)
        col = np.clip((dth - np.abs(th - tc)) * rc * S / 2, 0, 1) * np.clip((r - rc - 0.5 * rr) * S / 4, 0, 1)
        col *= np.exp(-np.clip(r - rc, 0, None) / g.uniform(0.4, 1.2))
        if post != "none":
            echo = echo * (1 + col * (g.uniform(-0.7, -0.4) if post == "shadow" else g.uniform(0.4, 0.8)))
        label[q < 1] = k
    echo = np.clip(echo, 0.02, None) * np.exp(-g.uniform(0.1, 0.5) * (r - r0))
    sp = t.standard_normal((2, S, S)).astype(np.float32)
    grain = max(S / 160, 0.5)  # speckle grain is a fixed fraction of the field: sub-pixel at 64 px
    sp = ndimage.gaussian_filter(sp, (0, grain, 1.6 * grain))  # wider laterally
    env = np.hypot(sp[0], sp[1])  # Rayleigh envelope
    env /= env.mean()
    img = np.log1p(4 * echo * env) / np.log1p(4 * 2.2) * fan
    img = np.repeat(img[None], 3, 0) * np.array([1.0, 1.0, 0.98])[:, None, None]
    label[fan < 0.5] = 0
    return img, label > 0, label, {"posterior": post}


RENDERERS = {"polyp": _polyp, "fundus": _fundus, "skin": _skin, "ultrasound": _ultrasound}
