"""Realistic synthetic OCT B-scans with exact masks, for demos and tests.

Each patient is a small "volume": fixed anatomy (fovea position, retinal thickness, tilt and curvature, retinal
vessels, lesions placed in (x, z)) and a set of B-scan positions z; each B-scan cuts the lesions at its z, so the
B-scans of one patient resemble each other and lesions grow and shrink from scan to scan as in a real volume.

A B-scan is drawn as a reflectivity map (retinal layers from the ILM down to the RPE, Bruch's membrane, choroid with
vessel lumens, sclera), lesions are painted into that map and into the mask from the same pixel sets, and the map
is then blurred by a small point-spread function, multiplied by correlated speckle and log-compressed with a
vendor-like display window. Everything is seeded by (seed, disease, patient, scan), so any B-scan can be drawn
on its own and is identical on every call.

- AMD: 1 drusen (dome-shaped RPE elevations over medium-reflective material), 2 scar (hyper-reflective
  subretinal fibrosis with shadowing), 3 fluid (dark intraretinal cysts and subretinal fluid lifting the retina).
- Macular hole: 1 macular_hole, the full-thickness foveal gap from the RPE up to the line joining the hole's rims;
  the rims are thickened and cystic (cysts are drawn but not labelled), sometimes with an operculum above.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from dataset_builder.writer import BuildResult, DatasetMeta, ScanRecord, build_dataset
from octsam.errors import OctSamError

LABELS: dict[str, list[str]] = {
    "amd": ["background", "drusen", "scar", "fluid"],
    "macular_hole": ["background", "macular_hole"],
}
_DISEASE_CODE = {"amd": 1, "macular_hole": 2}
_REF_HEIGHT = 496  # geometry is given in pixels of a 496-pixel-high Spectralis-like B-scan


@dataclass(frozen=True)
class Vendor:
    """Image size and display look of one device family (values are typical, not calibrated)."""

    name: str
    height: int
    widths: tuple[int, ...]
    depth_scale: float  # how many pixels one reference pixel of tissue spans, relative to height / 496
    db_range: tuple[float, float]  # display window in dB of the reflectivity (low, high)
    gamma: float
    speckle: float  # 1 = fully developed speckle, lower = averaged B-scans
    grain: tuple[float, float]  # speckle correlation (axial, lateral) in pixels at this vendor's size
    floor: float  # noise floor (linear reflectivity)
    wedge: float  # probability of a black registration wedge at the top (Spectralis exports)


VENDORS: tuple[Vendor, ...] = (
    Vendor("spectralis-like", 496, (512, 768), 1.0, (-40.0, 1.0), 1.0, 0.65, (0.8, 1.0), 0.0004, 0.35),
    Vendor("cirrus-like", 1024, (512,), 0.93, (-38.0, 0.0), 1.1, 0.7, (1.4, 0.9), 0.0006, 0.0),
    Vendor("topcon-like", 885, (512,), 0.82, (-37.0, 0.5), 0.9, 0.6, (1.2, 0.9), 0.0008, 0.0),
)

# Reflectivity of each zone in dB (0 dB = RPE), top to bottom (zone index = position in this tuple).
_ZONES = (
    ("vitreous", -99.0),
    ("rnfl", -8.0),
    ("gcl", -17.0),
    ("ipl", -12.0),
    ("inl", -20.0),
    ("opl", -12.5),
    ("onl", -24.0),
    ("elm", -14.0),
    ("is", -21.0),
    ("ez", -5.0),
    ("os", -18.0),
    ("iz", -9.0),
    ("srf", -99.0),
    ("scar_space", -99.0),  # filled by the scar painter
    ("rpe", 0.0),
    ("drusen", -15.0),
    ("bruch", -6.0),
    ("choroid", -99.0),  # textured
    ("sclera", -99.0),  # textured
)
_Z = {name: i for i, (name, _) in enumerate(_ZONES)}
_REFLECTIVITY = (10.0 ** (np.array([r for _, r in _ZONES]) / 10)).astype(np.float32)
_DARK = 0.0  # fluid, holes and vitreous: only the noise floor remains


@dataclass(frozen=True)
class Blob:
    """A lesion in (u, z): u = horizontal position 0..1, z = B-scan position -1..1; w/rz half-sizes; h height."""

    u: float
    z: float
    w: float
    rz: float
    h: float
    depth: float = 0.5  # where in its layer band (cysts) or how deep below the RPE (scar) it sits

    def chord(self, z: float) -> float:
        """Fraction 0..1 of the lesion's full size cut by the B-scan at ``z``."""
        k = 1.0 - ((z - self.z) / self.rz) ** 2
        return math.sqrt(k) if k > 0 else 0.0


@dataclass
class Patient:
    disease: str
    index: int
    vendor: Vendor
    height: int
    width: int
    px: float  # image pixels per reference pixel, vertically
    z: np.ndarray  # B-scan positions
    fovea: float
    side: float  # +1 / -1: which side is nasal (thicker nerve fibre layer)
    y0: float  # Bruch's membrane depth at the centre, as a fraction of the height
    curvature: float
    tilt: float
    wobble: tuple[float, float, float]
    thickness: float
    pit_depth: float
    pit_width: float
    choroid: float
    vessels: list[tuple[float, float, float]]
    gain: float
    classes: frozenset[int] = frozenset()
    drusen: list[Blob] = field(default_factory=list)
    scars: list[Blob] = field(default_factory=list)
    srf: list[Blob] = field(default_factory=list)
    cysts: list[Blob] = field(default_factory=list)
    hole: dict | None = None


# ------------------------------------------------------------------------------------------- patients


def _size_of(size: int | Sequence[int] | None) -> tuple[int, int] | None:
    """``size``: None (vendor sizes), (width, height), or an int height (width = height * 512 / 496)."""
    if size is None:
        return None
    if isinstance(size, int | np.integer):
        height = int(size)
        width = int(round(height * 512 / 496))
    else:
        width, height = (int(v) for v in size)
    if height < 64 or width < 64:
        raise OctSamError(f"synthetic size {width}x{height} is too small; use at least 64x64 (width x height).")
    return width, height


@functools.lru_cache(maxsize=256)
def make_patient(
    disease: str,
    seed: int,
    index: int,
    scans_per_patient: int,
    size: tuple[int, int] | None = None,
    lesion_scale: float = 1.0,
) -> Patient:
    """The fixed anatomy and lesions of one synthetic patient (deterministic for its arguments).

    ``lesion_scale`` multiplies AMD lesion widths and heights (1 = typical clinical sizes; the CPU demo uses larger
    ones so that a small model trained for minutes can see them).
    """
    if disease not in LABELS:
        raise OctSamError(f"unknown synthetic disease {disease!r}; choose one of {', '.join(LABELS)}.")
    rng = np.random.default_rng([seed, _DISEASE_CODE[disease], index, 0])
    vendor = VENDORS[int(rng.choice(len(VENDORS), p=[0.5, 0.3, 0.2]))]
    width, height = size if size is not None else (int(rng.choice(vendor.widths)), vendor.height)
    px = height / _REF_HEIGHT * vendor.depth_scale
    m = scans_per_patient
    z = np.linspace(-0.75, 0.75, m) if m > 1 else np.zeros(1)
    z = np.clip(z + rng.normal(0, 0.03, m), -0.95, 0.95)
    patient = Patient(
        disease=disease,
        index=index,
        vendor=vendor,
        height=height,
        width=width,
        px=px,
        z=z,
        fovea=0.5 + rng.normal(0, 0.04),
        side=float(rng.choice([-1.0, 1.0])),
        y0=rng.uniform(0.52, 0.62),
        curvature=rng.uniform(8, 40),
        tilt=rng.normal(0, 22),
        wobble=(rng.uniform(0, 3), rng.uniform(0.7, 2.0), rng.uniform(0, 2 * math.pi)),
        thickness=rng.normal(1.0, 0.07),
        pit_depth=rng.uniform(0.8, 1.0),
        pit_width=rng.uniform(0.055, 0.075),
        choroid=rng.uniform(55, 110),
        vessels=[
            (rng.uniform(0.08, 0.92), rng.uniform(1.8, 3.5), rng.normal(0, 0.04)) for _ in range(rng.integers(3, 7))
        ],
        gain=rng.normal(0, 1.0),
    )
    if disease == "amd":
        _amd_lesions(patient, rng, lesion_scale)
    else:
        _macular_hole(patient, rng)
    return patient


def _amd_lesions(p: Patient, rng: np.random.Generator, scale: float = 1.0) -> None:
    """Drusen, scar and fluid with typical sizes (reference pixels are ~3.9 um deep; u spans ~6 mm) x ``scale``."""
    classes: set[int] = set()
    while not classes:
        classes = {c for c, prob in ((1, 0.8), (2, 0.35), (3, 0.55)) if rng.random() < prob}
    p.classes = frozenset(classes)
    anchor = {c: float(p.z[rng.integers(len(p.z))]) for c in (1, 2, 3)}  # a B-scan that surely shows each class
    scar = None
    if 2 in classes:
        scar = Blob(
            p.fovea + rng.normal(0, 0.05),
            anchor[2],
            rng.uniform(0.06, 0.14) * scale,
            rng.uniform(0.5, 0.9),
            rng.uniform(16, 40) * scale,
            rng.uniform(2, 6),
        )
        p.scars.append(scar)
    if 1 in classes:
        for k in range(int(rng.integers(3, 9))):
            w = rng.uniform(0.02, 0.055) * scale
            u = float(np.clip(p.fovea + rng.normal(0, 0.17), 0.08, 0.92))
            if scar is not None and abs(u - scar.u) < scar.w + w + 0.02:  # drusen beside the scar, not under it
                side = 1.0 if u >= scar.u else -1.0
                u = scar.u + side * (scar.w + w + 0.02 + rng.uniform(0, 0.1))
                if not 0.06 < u < 0.94:
                    u = scar.u - side * (scar.w + w + 0.02 + rng.uniform(0, 0.1))
            zc = anchor[1] if k == 0 else rng.uniform(-1, 1)
            height = (rng.uniform(12, 32) if k == 0 else rng.uniform(6, 28)) * scale
            p.drusen.append(Blob(u, zc, w, rng.uniform(0.2, 0.5), height))
    if 3 in classes:
        kinds = ["srf", "irf"] if rng.random() < 0.4 else [str(rng.choice(["srf", "irf"]))]
        if "srf" in kinds:
            p.srf.append(
                Blob(
                    p.fovea + rng.normal(0, 0.06),
                    anchor[3],
                    rng.uniform(0.07, 0.2) * scale,
                    rng.uniform(0.5, 1.0),
                    rng.uniform(12, 45) * scale,
                )
            )
        if "irf" in kinds:
            for k in range(int(rng.integers(3, 10))):
                zc = anchor[3] if (k == 0 and "srf" not in kinds) else rng.uniform(-0.8, 0.8)
                p.cysts.append(
                    Blob(
                        float(np.clip(p.fovea + rng.normal(0, 0.09), 0.1, 0.9)),
                        zc,
                        rng.uniform(0.01, 0.03) * scale,
                        rng.uniform(0.15, 0.4),
                        rng.uniform(8, 24) * scale,
                        rng.uniform(0.3, 0.75),
                    )
                )


def _macular_hole(p: Patient, rng: np.random.Generator) -> None:
    p.classes = frozenset({1})
    z_centre = float(p.z[int(np.argmin(np.abs(p.z)))])
    base = rng.uniform(0.045, 0.1)
    p.hole = {
        "z": z_centre + rng.normal(0, 0.05),
        "rz": rng.uniform(0.75, 1.1),
        "base": base,
        "min": base * rng.uniform(0.3, 0.6),
        "flare": rng.uniform(0.01, 0.04),
        "rim": rng.uniform(15, 35),  # extra thickness of the rims, reference pixels
        "rim_width": rng.uniform(0.04, 0.07),
        "operculum": rng.random() < 0.4,
        "hyaloid": rng.random() < 0.6,
    }
    for _ in range(int(rng.integers(8, 16))):  # cystic rims: large cysts at the margins, small ones further out
        side = rng.choice([-1.0, 1.0])
        gap = rng.uniform(0.0, 0.07)
        big = gap < 0.03
        p.cysts.append(
            Blob(
                p.fovea + side * (base * 0.9 + gap),
                p.hole["z"] + rng.normal(0, 0.4),
                rng.uniform(0.012, 0.03) if big else rng.uniform(0.005, 0.015),
                rng.uniform(0.3, 0.7),
                rng.uniform(10, 22) if big else rng.uniform(4, 10),
                rng.uniform(0.35, 0.75),
            )
        )


# ------------------------------------------------------------------------------------------- drawing


def _dome(t: np.ndarray, power: float = 1.5) -> np.ndarray:
    return np.where(np.abs(t) < 1, (1 - np.minimum(t * t, 1)) ** power, 0.0)


def _blob_profile(
    blobs: list[Blob], z: float, u: np.ndarray, min_height: float, rough: np.ndarray | None = None, power: float = 1.5
) -> np.ndarray:
    """Height per column (max over the blobs cut at ``z``); heights under ``min_height`` are dropped."""
    height = np.zeros_like(u)
    for b in blobs:
        k = b.chord(z)
        if k <= 0:
            continue
        h = b.h * k * _dome((u - b.u) / (b.w * max(k, 0.3)), power)
        if rough is not None:
            h = h * rough
        height = np.maximum(height, h)
    return np.where(height >= min_height, height, 0.0)


@functools.lru_cache(maxsize=64)
def _kernel(sigma: float) -> tuple[np.ndarray, float]:
    sigma = max(sigma, 0.3)
    k = cv2.getGaussianKernel(2 * math.ceil(3 * sigma) + 1, sigma, cv2.CV_32F)
    return k, float(np.sum(k.astype(np.float64) ** 2))


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma: tuple[float, float]) -> np.ndarray:
    """Zero-mean, unit-variance correlated noise: uniform noise blurred by (sigma_y, sigma_x).

    After the blur the field is close to Gaussian; wide blurs are drawn at a lower resolution and resized (fast).
    """
    step = max(1, int(min(sigma) / 1.5))
    small = (-(-shape[0] // step), -(-shape[1] // step))
    ky, vy = _kernel(round(sigma[0] / step, 2))
    kx, vx = _kernel(round(sigma[1] / step, 2))
    noise = rng.random(small, dtype=np.float32)
    noise -= np.float32(0.5)
    out = cv2.sepFilter2D(noise, cv2.CV_32F, kx, ky, borderType=cv2.BORDER_REFLECT)
    out *= np.float32(math.sqrt(12 / (vx * vy)))
    if step > 1:
        out = cv2.resize(out, (shape[1], shape[0]), interpolation=cv2.INTER_LINEAR)
    return out


def render_scan(
    disease: str,
    seed: int,
    patient: int,
    scan: int,
    scans_per_patient: int,
    size: int | Sequence[int] | None = None,
    lesion_scale: float = 1.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Draw B-scan ``scan`` of synthetic ``patient``: (uint8 (H, W) image, uint8 (H, W) class-index mask)."""
    p = make_patient(disease, seed, patient, scans_per_patient, _size_of(size), lesion_scale)
    if not 0 <= scan < len(p.z):
        raise OctSamError(f"scan index {scan} out of range for {len(p.z)} B-scans per patient")
    rng = np.random.default_rng([seed, _DISEASE_CODE[disease], patient, 1 + scan])
    H, W, s = p.height, p.width, p.px
    z = float(p.z[scan])
    u = (np.arange(W) + 0.5) / W
    ys = (np.arange(H, dtype=np.float32) + 0.5)[:, None]

    # --- Bruch's membrane: curvature, tilt, wobble, small per-scan jitter
    amp, freq, phase = p.wobble
    bm = p.y0 * H + s * (
        -p.curvature * (2 * u - 1) ** 2
        + (p.tilt + rng.normal(0, 3)) * (u - 0.5)
        + amp * np.sin(2 * np.pi * freq * u + phase)
        + rng.normal(0, 3)
    )

    # --- lesions that change the geometry (heights in reference pixels)
    min_h = 1.5 / s + 0.5
    drusen = _blob_profile(p.drusen, z, u, min_h, power=0.8)
    rough = np.clip(1 + 0.25 * np.interp(u, np.linspace(0, 1, 24), rng.normal(0, 1, 24)), 0.6, 1.4)
    scar = _blob_profile(p.scars, z, u, min_h, rough=rough)
    srf = _blob_profile(p.srf, z, u, min_h)

    # --- layer thicknesses (reference pixels): foveal pit, parafoveal rim, nasal nerve fibre layer, swelling
    d = np.abs(u - p.fovea)
    pit_amp = p.pit_depth * math.exp(-((z / 0.38) ** 2))
    g = pit_amp * np.exp(-((d / (p.pit_width * (1 + 0.4 * abs(z)))) ** 2))
    rim = pit_amp * np.exp(-(((d - 1.8 * p.pit_width) / p.pit_width) ** 2))
    nasal = 1 / (1 + np.exp(-(u - p.fovea) * p.side * 14))
    swell = np.zeros_like(u)
    if p.hole is not None:
        hz = max(0.0, 1 - ((z - p.hole["z"]) / (p.hole["rz"] * 1.6)) ** 2)
        swell = p.hole["rim"] * hz * np.exp(-(((d - p.hole["base"] * 1.3) / p.hole["rim_width"]) ** 2))
        g = 0.6 * hz * np.exp(-((d / p.hole["base"]) ** 2)) + (1 - hz) * g
        rim = rim * (1 - hz)
    for c in p.cysts:  # the retina swells over cysts
        k = c.chord(z)
        if k > 0:
            swell = swell + 1.2 * c.h * k * _dome((u - c.u) / (c.w * 4))
    over_scar = np.clip(scar / 8.0, 0, 1) ** 0.7  # photoreceptors fade out over the scar
    # elevations below the retina are absorbed by the outer nuclear layer, so the inner surface stays smooth
    t = p.thickness
    onl = t * (22 + 14 * g)
    onl = np.maximum(onl - 0.8 * drusen - 0.4 * srf, 0.3 * onl)
    thick = [  # top to bottom: rnfl, gcl, ipl, inl, opl, onl, elm, is, ez, os, iz (reference pixels)
        t * (4 + 16 * nasal) * (1 - g) + 1,
        t * (13 + 6 * rim) * (1 - 0.97 * g),
        t * 10 * (1 - 0.92 * g),
        t * 10 * (1 - 0.85 * g) + 0.45 * swell,
        t * 7 * (1 - 0.7 * g),
        onl + 0.55 * swell,
        t * 1.6 * (1 - over_scar),
        t * (6 + 2 * g) * (1 - over_scar),
        t * 3.2 * (1 - over_scar),
        t * (5 + 4 * g) * (1 - over_scar),
        t * 2.8 * (1 - over_scar),
    ]
    drusen_top = bm - drusen * s
    rpe_top = drusen_top - 6.0 * s
    scar_top = rpe_top - scar * s
    srf_top = scar_top - srf * s
    bounds = [srf_top]
    knots = np.linspace(0, 1, 20)
    for th in reversed(thick):  # each boundary also gets its own gentle undulation
        undulation = np.interp(u, knots, rng.normal(0, 0.6, knots.size)) * s
        bounds.append(bounds[-1] - np.maximum(th * s + undulation, 0))
    bounds = bounds[::-1]  # bounds[0] = ILM, bounds[i] = bottom of layer i (1 rnfl .. 11 iz)
    choroid_bottom = bm + s * (3 + p.choroid * (1 - 0.25 * (2 * u - 1) ** 2))
    edges = np.stack(bounds + [scar_top, rpe_top, drusen_top, bm, bm + 3 * s, choroid_bottom]).astype(np.float32)
    zone = np.zeros((H, W), dtype=np.uint8)
    for e in edges:  # zone index = number of boundaries above the pixel; compare only rows the boundary spans
        lo, hi = int(np.clip(math.floor(e.min() - 0.5), 0, H)), int(np.clip(math.ceil(e.max() - 0.5) + 1, 0, H))
        zone[lo:hi] += ys[lo:hi] >= e[None, :]
        zone[hi:] += 1
    refl = _REFLECTIVITY[zone]

    # --- texture: layer heterogeneity, choroidal vessels, sclera (computed on the rows that need it)
    top = int(np.clip(math.floor(edges[0].min()) - 2, 0, H - 1))
    small = _smooth_noise(rng, (H - top, W), (1.2 * s, 2.5 * s))
    refl[top:] *= np.exp(0.35 * small)  # vitreous stays at ~0
    r0 = int(np.clip(math.floor(bm.min()), 0, H - 1))
    depth = (ys[r0:] - bm[None, :].astype(np.float32)) / (choroid_bottom - bm)[None, :].astype(np.float32)
    large = _smooth_noise(rng, (H - r0, W), (4.0 * s, 9.0 * s))
    mix = np.clip(depth, 0, 1)
    lumen = (1 - mix) * small[r0 - top :] + mix * large
    stroma = (0.035 / (1 + np.exp(-2.5 * (lumen + 0.4))) + 0.002) * np.exp(-mix)  # bright stroma, dark lumens
    choroid_weight = 1 / (1 + np.exp(np.clip((depth - 1) * 8, -30, 30)))  # soft choroid-sclera junction
    sclera = 0.002 * np.exp(-2.0 * np.clip(depth - 1, 0, None) + 0.3 * large)
    deep = choroid_weight * stroma + (1 - choroid_weight) * sclera
    refl[r0:] = np.where(zone[r0:] >= _Z["choroid"], deep, refl[r0:])

    mask = np.zeros((H, W), dtype=np.uint8)
    if disease == "amd":
        mask[zone == _Z["drusen"]] = 1
        mask[zone == _Z["srf"]] = 3
        _paint_scar(p, z, u, ys, rpe_top, scar_top, scar, s, rng, refl, mask)
        _paint_cysts(p, z, u, ys, bounds, s, refl, mask, label=3)
    else:
        _paint_cysts(p, z, u, ys, bounds, s, refl, mask, label=0)
        _paint_hole(p, z, u, ys, bounds[0], rpe_top, s, refl, mask)

    _paint_foci(rng, bounds, s, refl, mask)
    _paint_vessels(p, z, ys, bounds, rpe_top, scar, s, refl, mask)
    return _display(p, refl, rng), mask


def _paint_foci(rng, bounds, s, refl, mask) -> None:
    """A few hyper-reflective foci (unlabelled bright dots) in the inner and outer nuclear layers."""
    H, W = refl.shape
    for _ in range(int(rng.integers(0, 12))):
        x = int(rng.integers(0, W))
        y = int(bounds[3][x] + rng.uniform(0, 1) * (bounds[6][x] - bounds[3][x]))
        r = max(1, int(round(rng.uniform(0.8, 1.6) * s)))
        box = (slice(max(y - r, 0), min(y + r + 1, H)), slice(max(x - r, 0), min(x + r + 1, W)))
        refl[box] = np.where(mask[box] == 0, 0.15, refl[box])


def _paint_vessels(p, z, ys, bounds, rpe_top, scar, s, refl, mask) -> None:
    """Retinal vessels in the nerve fibre layer and the shadows they (and scars) cast on everything below."""
    H, W = refl.shape
    x = np.arange(W) + 0.5
    shade = np.ones(W, dtype=np.float32)
    for vu, vr, drift in p.vessels:
        cx, r = (vu + drift * z) * W, vr * s
        xi = int(np.clip(cx, 0, W - 1))
        yc = bounds[0][xi] + 0.7 * (bounds[1][xi] - bounds[0][xi]) + r
        shade *= (1 - 0.55 * np.exp(-(((x - cx) / (1.3 * r)) ** 2))).astype(np.float32)
        y0, y1 = max(int(yc - r) - 1, 0), min(int(yc + r) + 2, H)
        x0, x1 = max(int(cx - r) - 1, 0), min(int(cx + r) + 2, W)
        if y1 <= y0 or x1 <= x0:
            continue
        disc = ((ys[y0:y1] - yc) / r) ** 2 + ((x[None, x0:x1] - cx) / r) ** 2 < 1
        box = refl[y0:y1, x0:x1]
        box[disc & (mask[y0:y1, x0:x1] == 0)] = 0.1
    below = ys > (bounds[1][None, :] + 2 * s)
    refl[below] *= np.broadcast_to(shade[None, :], refl.shape)[below]
    if scar.any():  # fibrosis blocks light: the choroid below it is dark
        under = (scar[None, :] > 0) & (ys > (rpe_top[None, :] + 6 * s)) & (mask != 2)
        refl[under] *= 0.3


def _paint_scar(p, z, u, ys, rpe_top, scar_top, scar, s, rng, refl, mask) -> None:
    if not scar.any():
        return
    pen = np.zeros_like(u)
    for b in p.scars:
        k = b.chord(z)
        if k > 0:
            pen = np.maximum(pen, b.depth * k * _dome((u - b.u) / (b.w * max(k, 0.3))))
    bottom = (rpe_top + (pen + 4) * s).astype(np.float32)
    region = (scar[None, :] > 0) & (ys >= scar_top[None, :].astype(np.float32)) & (ys < bottom[None, :])
    texture = _smooth_noise(rng, refl.shape, (1.5 * s, 3.0 * s))[region]
    refl[region] = 0.6 * np.exp(0.45 * texture)
    mask[region] = 2


def _paint_cysts(p, z, u, ys, bounds, s, refl, mask, label: int) -> None:
    H, W = refl.shape
    for c in p.cysts:
        k = c.chord(z)
        if k <= 0:
            continue
        xi = int(np.clip(c.u * W, 0, W - 1))
        top, bottom = bounds[3][xi], bounds[6][xi]  # INL top .. ONL bottom
        yc = top + (bottom - top) * c.depth
        ry = max(c.h * k * s * 0.5, 1.5)
        rx = max(c.w * max(k, 0.4), 1.5 / W)
        y0, y1 = max(int(yc - ry) - 1, 0), min(int(yc + ry) + 2, H)
        x0, x1 = max(int((c.u - rx) * W) - 1, 0), min(int((c.u + rx) * W) + 2, W)
        if y1 <= y0 or x1 <= x0:
            continue
        yy = ys[y0:y1]
        inside = ((yy - yc) / ry) ** 2 + (((u[x0:x1] - c.u) / rx)[None, :]) ** 2 < 1
        inside &= (yy > (bounds[2][x0:x1] + s)[None, :]) & (yy < bounds[6][x0:x1][None, :])
        refl[y0:y1, x0:x1][inside] = _DARK
        if label:
            mask[y0:y1, x0:x1][inside] = label


def _paint_hole(p, z, u, ys, ilm, rpe_top, s, refl, mask) -> None:
    h = p.hole
    H, W = refl.shape
    d = np.abs(u - p.fovea)
    if h["hyaloid"]:  # faint, partly detached posterior hyaloid over the macula
        line = np.abs(ys - (ilm - (12 + 60 * d) * s)[None, :].astype(np.float32)) < 0.9 * s
        refl[line & (d > h["base"] * 0.8)[None, :] & (mask == 0)] = 0.004
    k = 1.0 - ((z - h["z"]) / h["rz"]) ** 2
    if k <= 0:
        return
    scale = math.sqrt(k)
    xi = int(np.clip(p.fovea * W, 0, W - 1))
    height = max(float(rpe_top[xi] - ilm[xi]), 10 * s)
    v = (rpe_top[None, :].astype(np.float32) - ys) / np.float32(height)  # 0 at the RPE, 1 at the inner surface
    narrow = np.clip(1 - v / 0.8, 0, 1) ** 2
    hw = scale * (h["min"] + (h["base"] - h["min"]) * narrow + h["flare"] * np.clip(v - 0.7, 0, None))
    gap = (d[None, :] < hw) & (v > 0)
    # the rims: the nearest columns left and right of the centre whose inner surface is not cut by the gap
    rows = np.clip(np.floor(ilm).astype(int), 0, H - 1)
    cut = gap[rows, np.arange(W)]
    left, right = xi, xi
    while left > 0 and cut[left]:
        left -= 1
    while right < W - 1 and cut[right]:
        right += 1
    xs = np.arange(W, dtype=np.float64)
    top_line = (ilm[left] + (ilm[right] - ilm[left]) * (xs - left) / max(right - left, 1)).astype(np.float32)
    cavity = gap & (ys >= top_line[None, :])
    refl[gap & (ys >= ilm[None, :].astype(np.float32))] = _DARK
    refl[cavity] = _DARK
    mask[cavity] = 1
    if h["operculum"]:
        oy = min(ilm[left], ilm[right]) - 28 * s
        blob = ((ys - oy) / (3.5 * s)) ** 2 + (((u - p.fovea) / (h["min"] * 1.3))[None, :]) ** 2 < 1
        refl[blob & (mask == 0)] = 0.03


def _display(p: Patient, refl: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Point-spread blur, correlated speckle, log compression into the vendor's display window."""
    v = p.vendor
    H, W = refl.shape
    refl = cv2.GaussianBlur(refl, (0, 0), sigmaX=1.0, sigmaY=0.8)
    grain = (v.grain[0] * H / v.height, v.grain[1] * W / max(v.widths))
    re = _smooth_noise(rng, (H, W), grain)
    im = _smooth_noise(rng, (H, W), grain)
    speckle = np.float32(1 - v.speckle) + np.float32(0.5 * v.speckle) * (re * re + im * im)
    intensity = (refl + np.float32(v.floor)) * speckle
    lo, hi = v.db_range
    lo, hi = lo + p.gain + rng.normal(0, 0.5), hi + 0.5 * p.gain
    out = cv2.log(np.maximum(intensity, np.float32(1e-9)))  # natural log; dB = 10 / ln(10) * log
    out *= np.float32(10 / math.log(10) / (hi - lo))
    out -= np.float32(lo / (hi - lo))
    np.clip(out, 0, 1, out=out)
    if v.gamma != 1.0:
        out **= np.float32(v.gamma)
    out *= np.linspace(255.0, 225.0, H, dtype=np.float32)[:, None]  # signal roll-off with depth
    img = np.clip(out, 0, 255).astype(np.uint8)
    if rng.random() < v.wedge:  # black wedge left by eye-motion registration (top rows only: always vitreous)
        depth = rng.uniform(0.02, 0.06) * H
        ramp = np.linspace(depth, 0, W) if rng.random() < 0.5 else np.linspace(0, depth, W)
        img[np.arange(H)[:, None] < ramp[None, :]] = 0
    return img


# ------------------------------------------------------------------------------------------- records


def synthetic_records(
    disease: str,
    num_patients: int,
    scans_per_patient: int,
    seed: int = 0,
    size: int | Sequence[int] | None = None,
    lesion_scale: float = 1.0,
) -> list[ScanRecord]:
    """One ``ScanRecord`` per synthetic B-scan; nothing is drawn until a record's ``load()`` is called."""
    if disease not in LABELS:
        raise OctSamError(f"unknown synthetic disease {disease!r}; choose one of {', '.join(LABELS)}.")
    if num_patients < 1 or scans_per_patient < 1:
        raise OctSamError("--num-patients and --scans-per-patient must be at least 1.")
    fixed = _size_of(size)
    records = []
    for i in range(num_patients):
        p = make_patient(disease, seed, i, scans_per_patient, fixed, lesion_scale)
        pid = f"{disease}_p{i:04d}"
        for j in range(scans_per_patient):
            bscan = int(round((p.z[j] + 1) / 2 * 48))  # position in a 49-B-scan volume
            records.append(
                ScanRecord(
                    scan_id=f"{pid}_s{j:02d}_b{bscan:02d}",
                    patient_id=pid,
                    load=functools.partial(render_scan, disease, seed, i, j, scans_per_patient, fixed, lesion_scale),
                    disease=disease,
                    source=f"synthetic ({p.vendor.name}, {p.width}x{p.height})",
                    classes=p.classes,
                )
            )
    return records


def build_synthetic(
    disease: str,
    num_patients: int,
    scans_per_patient: int,
    seed: int = 0,
    output: str | Path | None = None,
    size: int | Sequence[int] | None = None,
    *,
    lesion_scale: float = 1.0,
    split: tuple[float, float, float] = (0.7, 0.15, 0.15),
    split_file: str | Path | None = None,
    folds: tuple[int, int] | None = None,
    overwrite: bool = False,
    push_to_hub: str | None = None,
    private: bool = False,
    command: str = "",
) -> BuildResult:
    """Build a synthetic OCT dataset folder (and/or Hub repo); see the module docstring for what is drawn.

    ``size`` None keeps vendor-like sizes (496 x 512/768, 1024 x 512, 885 x 512, height x width); an int is the
    height of every B-scan (width = height * 512 / 496, e.g. 128 -> 132 x 128); a pair is (width, height).
    """
    if not 0.25 <= lesion_scale <= 4:
        raise OctSamError(f"--lesion-scale {lesion_scale} is outside 0.25..4.")
    records = synthetic_records(disease, num_patients, scans_per_patient, seed, size, lesion_scale)
    names = {"amd": "age-related macular degeneration", "macular_hole": "macular hole"}
    meta = DatasetMeta(
        pretty_name=f"Synthetic OCT B-scans: {names[disease]}",
        description=(
            f"Synthetic retinal OCT B-scans of {names[disease]} drawn by octsam's dataset_builder "
            f"({num_patients} patients x {scans_per_patient} B-scans, seed {seed}). Layered retina with curvature "
            "and tilt, bright RPE band, choroid, speckle, vendor-like sizes and contrast; masks are exactly the "
            "painted lesion pixels. For demos and tests, not for clinical conclusions."
        ),
        source="Generated by `python -m dataset_builder synthetic` (octsam); no patient data.",
        license="cc0-1.0",
        command=command,
    )
    return build_dataset(
        records,
        LABELS[disease],
        output,
        meta,
        split=split,
        seed=seed,
        split_file=split_file,
        folds=folds,
        overwrite=overwrite,
        push_to_hub=push_to_hub,
        private=private,
    )
