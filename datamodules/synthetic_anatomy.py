"""Pixel content of synthetic mammograms: breast outline, tissue texture, pectoral muscle, labels, lesions.

Everything here works on a float "brightness" image in [0, 1] (bright = dense, as a MONOCHROME2 display)
at the native spacing of the synthetic set; `datamodules.synthetic` turns it into DDSM optical densities
or CBIS-DDSM DICOM values. Every function takes a `numpy.random.Generator`, so a seed fixes every pixel.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import cv2
import numpy as np
from scipy import fft as sp_fft

#: Fraction of the breast that is fibroglandular tissue per BI-RADS density category 1-4.
FIBROGLANDULAR_FRACTION = {1: 0.12, 2: 0.3, 3: 0.5, 4: 0.72}

#: Mass contrast: brightness of the mass tissue above the mean brightness of its neighbourhood (the mass
#: replaces the local texture, `add_mass`). Tuned so that the smoothed-intensity baseline gives a pixel AUC
#: in [0.6, 0.8] on the mass sets (quick set: 0.72; real mini-MIAS: about 0.78).
MASS_CONTRAST = (0.2, 0.28)


@dataclass
class BreastImage:
    """One synthetic view: brightness in [0, 1], the true breast mask, and what was drawn into it."""

    brightness: np.ndarray  # float32 H x W
    breast_mask: np.ndarray  # bool H x W (includes the pectoral muscle)
    fibroglandular: np.ndarray  # float32 H x W in [0, 1], 0 outside the breast
    thickness: np.ndarray  # float32 H x W in [0, 1], relative compressed thickness
    side: str
    view: str
    density: int
    pectoral: np.ndarray | None = None  # bool H x W on MLO views
    lesions: list[LesionDraw] = field(default_factory=list)


@dataclass
class LesionDraw:
    """A lesion drawn into an image: its kind, CBIS-DDSM descriptors and its filled native-size mask."""

    kind: str  # "mass" | "calcification"
    mask: np.ndarray  # bool H x W
    descriptors: dict[str, str]
    diameter_mm: float


def power_law_noise(
    shape: tuple[int, int], beta: float, rng: np.random.Generator, f_min: float = 1.0, downsample: int = 2
) -> np.ndarray:
    """Zero-mean, unit-variance noise whose power spectrum falls off as 1/f**beta (f in cycles per image).

    Mammographic texture has beta close to 3; ``f_min`` caps the lowest frequencies so the DC term
    does not dominate. Such a spectrum has almost no energy at the finest scales, so the field is
    drawn on a grid ``downsample`` times coarser (FFT-friendly size) and interpolated up.
    """
    h, w = shape
    ch, cw = max(8, -(-h // downsample)), max(8, -(-w // downsample))
    fh, fw = sp_fft.next_fast_len(ch, real=True), sp_fft.next_fast_len(cw, real=True)
    white = rng.standard_normal((fh, fw), dtype=np.float32)
    spectrum = sp_fft.rfft2(white)
    fy = np.fft.fftfreq(fh).astype(np.float32)[:, None] * ch
    fx = np.fft.rfftfreq(fw).astype(np.float32)[None, :] * cw
    f = np.sqrt(fx**2 + (fy * (cw / ch)) ** 2)
    spectrum *= np.maximum(f, f_min) ** (-beta / 2.0)
    spectrum[0, 0] = 0.0
    field_ = sp_fft.irfft2(spectrum, s=(fh, fw))[:ch, :cw].astype(np.float32)
    field_ -= field_.mean()
    std = field_.std()
    field_ = field_ / std if std > 0 else field_
    if (ch, cw) != (h, w):
        field_ = cv2.resize(field_, (w, h), interpolation=cv2.INTER_LINEAR)
    return field_


def _smoothstep(x: np.ndarray) -> np.ndarray:
    x = np.clip(x, 0.0, 1.0)
    return x * x * (3.0 - 2.0 * x)


def _angular_perturbation(theta: np.ndarray, rng: np.random.Generator, harmonics: range, amplitude: float) -> np.ndarray:
    """1 + a smooth random function of the angle, used to make outlines irregular."""
    out = np.ones_like(theta)
    for k in harmonics:
        out += rng.uniform(0.3, 1.0) * amplitude / k**0.5 * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
    return out


def breast_view(
    shape: tuple[int, int], side: str, view: str, density: int, spacing_mm: float, rng: np.random.Generator
) -> BreastImage:
    """Draw one healthy view (chest wall at column 0 for RIGHT, at the last column for LEFT)."""
    h, w = shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    # --- outline: half ellipse against the chest wall, perturbed
    depth = w * rng.uniform(0.68, 0.86)
    if view == "CC":
        yc = h * rng.uniform(0.46, 0.54)
        half_height = h * rng.uniform(0.36, 0.44)
    else:  # MLO: the breast reaches up into the axilla along the chest wall
        yc = h * rng.uniform(0.5, 0.56)
        half_height = h * rng.uniform(0.5, 0.56)
    theta = np.arctan2((yy - yc) / half_height, xx / depth)
    radius = np.sqrt((xx / depth) ** 2 + ((yy - yc) / half_height) ** 2)
    radius = radius / _angular_perturbation(theta, rng, range(2, 6), 0.035)
    if view == "MLO":
        # sag: the lower half bulges a little more than the upper
        radius = radius * (1.0 + 0.08 * np.clip((yc - yy) / half_height, 0, 1))
    breast = radius < 1.0
    # keep the largest component touching the chest wall
    breast_u8 = breast.astype(np.uint8)
    n, labels, stats, _ = cv2.connectedComponentsWithStats(breast_u8, connectivity=4)
    if n > 2:
        biggest = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
        breast = labels == biggest
    dist_mm = cv2.distanceTransform(breast.astype(np.uint8), cv2.DIST_L2, 5).astype(np.float32) * spacing_mm
    # relative compressed thickness: falls off over the last ~1-2 cm before the skin
    # (scaled with the breast size: a small breast has a proportionally narrower fall-off zone)
    edge_scale = rng.uniform(6.0, 11.0) * float(np.clip(h * spacing_mm / 100.0, 0.5, 1.5))
    thickness = np.where(breast, 1.0 - np.exp(-dist_mm / edge_scale), 0.0).astype(np.float32)

    # --- fibroglandular tissue: power-law field + blobs, concentrated behind the nipple
    # texture statistics are physical: the spectrum's low-frequency cap is a fixed length (50 mm coarse,
    # 12.5 mm fine), so a smaller film shows the same tissue, not a shrunken copy of a larger breast
    extent_mm = h * spacing_mm
    coarse = power_law_noise(shape, 3.0, rng, f_min=max(1.0, extent_mm / 50.0))
    n_blobs = int(rng.integers(6, 14))
    blobs = np.zeros(shape, np.float32)
    for _ in range(n_blobs):
        r_b = rng.uniform(0.1, 0.7)
        t_b = rng.uniform(-1.2, 1.2)
        by = yc + half_height * r_b * np.sin(t_b)
        bx = depth * r_b * np.cos(t_b)
        sigma = rng.uniform(4.0, 12.0) / spacing_mm
        y0, y1 = max(0, int(by - 3 * sigma)), min(h, int(by + 3 * sigma) + 1)
        x0, x1 = max(0, int(bx - 3 * sigma)), min(w, int(bx + 3 * sigma) + 1)
        if y1 > y0 and x1 > x0:
            gy = np.exp(-((np.arange(y0, y1, dtype=np.float32) - by) ** 2) / (2 * sigma**2))
            gx = np.exp(-((np.arange(x0, x1, dtype=np.float32) - bx) ** 2) / (2 * sigma**2))
            blobs[y0:y1, x0:x1] += np.outer(gy, gx)
    centrality = np.clip(1.0 - radius, 0.0, 1.0) ** 0.7
    z = coarse + 0.9 * blobs + 2.2 * centrality
    inside = breast & (dist_mm > 2.0)
    fraction = FIBROGLANDULAR_FRACTION[density] * rng.uniform(0.85, 1.15)
    threshold = np.quantile(z[inside], 1.0 - fraction) if inside.any() else 0.0
    softness = 0.35
    fibro = (1.0 / (1.0 + np.exp(-(z - threshold) / softness))).astype(np.float32)
    fibro *= breast

    fine = power_law_noise(shape, 3.0, rng, f_min=max(1.0, extent_mm / 12.5))
    fat_level = rng.uniform(0.30, 0.36)
    dense_level = 0.2 + 0.04 * density
    texture_amp = 0.025 + 0.01 * density
    tissue = fat_level + dense_level * fibro + texture_amp * fine * (0.4 + fibro)
    bright = np.where(breast, 0.12 + thickness * (tissue - 0.12), 0.0)
    # skin line: a thin brighter band
    skin_mm = rng.uniform(0.8, 1.6)
    skin = breast & (dist_mm < skin_mm)
    bright = np.where(skin, bright + 0.1, bright)

    # --- pectoral muscle on MLO views: bright triangle in the upper chest-wall corner
    if view == "MLO":
        px = w * rng.uniform(0.25, 0.42)
        py = h * rng.uniform(0.35, 0.55)
        bow = rng.uniform(-0.08, 0.12)
        u = xx / px + yy / py
        edge = 1.0 + bow * np.sin(np.pi * np.clip(yy / py, 0, 1))
        pect = breast & (u < edge)
        pect_soft = _smoothstep((edge - u) / 0.04) * breast
        # brighter towards the corner (thicker muscle), with a faint fibrous texture
        pect_level = rng.uniform(0.62, 0.72) + 0.1 * np.clip(1.0 - u / edge, 0.0, 1.0) + 0.025 * fine
        bright = bright * (1 - pect_soft) + pect_soft * pect_level * (0.85 + 0.15 * thickness)
    else:
        pect = np.zeros(shape, bool)

    # --- background and film labels
    background = 0.035 + 0.012 * power_law_noise(shape, 2.0, rng, f_min=4.0)
    bright = np.where(breast, bright, background)
    _film_labels(bright, breast, rng, spacing_mm)
    bright = bright + rng.normal(0.0, 0.006, size=shape)
    bright = np.clip(bright, 0.0, 1.0).astype(np.float32)

    if side == "LEFT":
        bright, breast, fibro, thickness, pect = (
            np.ascontiguousarray(a[:, ::-1]) for a in (bright, breast, fibro, thickness, pect)
        )
    return BreastImage(bright, breast, fibro, thickness, side, view, density, pectoral=pect)


def _film_labels(bright: np.ndarray, breast: np.ndarray, rng: np.random.Generator, spacing_mm: float) -> None:
    """Bright rectangles (patient labels, view markers) with dark glyph strokes, outside the breast."""
    h, w = bright.shape
    grown = cv2.dilate(breast.astype(np.uint8), np.ones((9, 9), np.uint8), iterations=2).astype(bool)
    for _ in range(int(rng.integers(1, 3))):
        for _attempt in range(20):
            rh = int(rng.uniform(4, 9) / spacing_mm)
            rw = int(rng.uniform(10, 22) / spacing_mm)
            if rh >= h // 3 or rw >= w:
                rh, rw = max(4, h // 12), max(8, w // 4)
            y0 = int(rng.integers(0, max(1, h - rh)))
            x0 = int(rng.integers(0, max(1, w - rw)))
            if not grown[y0 : y0 + rh, x0 : x0 + rw].any():
                bright[y0 : y0 + rh, x0 : x0 + rw] = rng.uniform(0.85, 0.95)
                n_glyphs = int(rng.integers(2, 6))
                for g in range(n_glyphs):
                    gx = x0 + int((g + 0.5) * rw / (n_glyphs + 0.5))
                    gw = max(1, int(0.4 / spacing_mm))
                    bright[y0 + rh // 4 : y0 + 3 * rh // 4, gx : gx + gw] = 0.2
                break


def _mass_profile(
    shape: tuple[int, int], center: tuple[float, float], radius_px: float, style: str, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Soft mass body (0..1), its mask (body >= 0.5) and the spicule image, within a local window."""
    h, w = shape
    cy, cx = center
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    dy, dx = yy - cy, xx - cx
    angle = rng.uniform(0, np.pi)
    ca, sa = np.cos(angle), np.sin(angle)
    u = ca * dx + sa * dy
    v = -sa * dx + ca * dy
    elong = 1.0 if style == "round" else rng.uniform(0.55, 0.85)
    rho = np.sqrt(u**2 + (v / elong) ** 2) / radius_px
    theta = np.arctan2(v, u)
    if style == "lobulated":
        rho = rho / _angular_perturbation(theta, rng, range(3, 6), 0.16)
    elif style == "spiculated":
        rho = rho / _angular_perturbation(theta, rng, range(3, 9), 0.12)
    else:
        rho = rho / _angular_perturbation(theta, rng, range(2, 4), 0.04)
    edge = 0.22 if style != "round" else 0.15
    body = _smoothstep((1.0 + edge / 2 - rho) / edge).astype(np.float32)
    mask = rho <= 1.0
    spicules = np.zeros(shape, np.float32)
    if style == "spiculated":
        canvas = np.zeros(shape, np.uint8)
        for _ in range(int(rng.integers(8, 16))):
            a = rng.uniform(0, 2 * np.pi)
            length = radius_px * rng.uniform(1.6, 2.8)
            x1 = int(cx + np.cos(a) * length)
            y1 = int(cy + np.sin(a) * length)
            cv2.line(canvas, (int(cx), int(cy)), (x1, y1), 255, thickness=max(1, int(radius_px / 14)), lineType=cv2.LINE_AA)
        fade = np.clip(1.0 - np.sqrt(dx**2 + dy**2) / (radius_px * 2.8), 0.0, 1.0)
        spicules = (canvas.astype(np.float32) / 255.0) * fade
    return body, mask, spicules


MASS_STYLES = {
    # style: (CBIS mass shape choices, CBIS margin choices)
    "round": (("ROUND",), ("CIRCUMSCRIBED", "OBSCURED")),
    "oval": (("OVAL",), ("CIRCUMSCRIBED", "ILL_DEFINED", "OBSCURED")),
    "lobulated": (("LOBULATED", "IRREGULAR"), ("MICROLOBULATED", "ILL_DEFINED", "OBSCURED")),
    "spiculated": (("IRREGULAR",), ("SPICULATED", "ILL_DEFINED-SPICULATED")),
}


def lesion_site(image: BreastImage, rng: np.random.Generator, margin_px: int, avoid: np.ndarray | None) -> tuple[int, int]:
    """A lesion centre inside the breast, preferring fibroglandular tissue, away from skin and pectoral."""
    h, w = image.breast_mask.shape
    candidates = image.breast_mask & (image.thickness > 0.6)
    if image.pectoral is not None and image.pectoral.any():
        # lesions lie in the breast tissue, clear of the pectoral muscle
        clear = cv2.dilate(image.pectoral.astype(np.uint8), np.ones((3, 3), np.uint8), iterations=margin_px)
        candidates &= ~clear.astype(bool)
    if avoid is not None:
        candidates &= ~avoid
    border = np.zeros_like(candidates)
    border[margin_px : h - margin_px, margin_px : w - margin_px] = True
    candidates &= border
    if not candidates.any():
        candidates = image.breast_mask & border
    if not candidates.any():
        candidates = image.breast_mask
    ys, xs = np.nonzero(candidates)
    weights = 0.3 + image.fibroglandular[ys, xs]
    k = int(rng.choice(len(ys), p=weights / weights.sum()))
    return int(ys[k]), int(xs[k])


def add_mass(image: BreastImage, rng: np.random.Generator, spacing_mm: float, diameter_mm: float | None = None) -> LesionDraw:
    """Draw a mass (round, oval, lobulated or spiculated): tissue of its own, denser than its surroundings."""
    style = str(rng.choice(["round", "oval", "lobulated", "spiculated"], p=[0.2, 0.3, 0.25, 0.25]))
    if diameter_mm is None:
        # mostly 6-24 mm (mini-MIAS masses: radii of 17-70 px at 0.2 mm, 7-28 mm across); where the breast is
        # big enough, a few (~8 %) large ones of 30-38 mm that fail
        # the 4-patch-area rule (area >= 4 * 64 * 64 px at 0.2 mm, i.e. a disc wider than ~29 mm)
        diameter_mm = float(np.clip(rng.normal(13.0, 4.0), 6.0, 24.0))
        large = float(rng.uniform(30.0, 38.0))
        if rng.random() < 0.08 and large < 0.4 * image.brightness.shape[0] * spacing_mm:
            diameter_mm = large
    radius_px = diameter_mm / 2.0 / spacing_mm
    taken = None
    if image.lesions:
        taken = np.any([les.mask for les in image.lesions], axis=0)
        taken = cv2.dilate(taken.astype(np.uint8), np.ones((3, 3), np.uint8), iterations=int(radius_px * 2)).astype(bool)
    cy, cx = lesion_site(image, rng, int(radius_px * 1.5), taken)
    # work in a window around the mass for speed
    half = int(radius_px * 3.2) + 4
    h, w = image.brightness.shape
    y0, y1 = max(0, cy - half), min(h, cy + half)
    x0, x1 = max(0, cx - half), min(w, cx + half)
    body, mask_w, spicules = _mass_profile((y1 - y0, x1 - x0), (cy - y0, cx - x0), radius_px, style, rng)
    contrast = rng.uniform(*MASS_CONTRAST)
    texture = power_law_noise((y1 - y0, x1 - x0), 3.0, rng, f_min=3.0)
    window = image.brightness[y0:y1, x0:x1]
    inside = image.breast_mask[y0:y1, x0:x1]
    thick = image.thickness[y0:y1, x0:x1]
    # a mass is tissue of its own, not a brighter copy of what it displaces: inside its body the local
    # fibroglandular texture gives way to a homogeneous density (the neighbourhood's mean brightness plus the
    # contrast) with the mass's own faint texture, blending into the surroundings at its margin
    local = cv2.GaussianBlur(window, (0, 0), sigmaX=max(radius_px, 1.0))
    mass_tissue = local + thick * contrast * (1.0 + 0.15 * texture)
    mixed = (1.0 - body) * window + body * mass_tissue + thick * 0.45 * contrast * spicules
    window[...] = np.where(inside, np.clip(mixed, 0.0, 1.0), window)
    mask = np.zeros((h, w), bool)
    mask[y0:y1, x0:x1] = mask_w & inside
    shapes, margins = MASS_STYLES[style]
    descriptors = {"mass shape": str(rng.choice(shapes)), "mass margins": str(rng.choice(margins))}
    lesion = LesionDraw("mass", mask, descriptors, diameter_mm)
    image.lesions.append(lesion)
    return lesion


def add_calcification_cluster(image: BreastImage, rng: np.random.Generator, spacing_mm: float) -> LesionDraw:
    """Draw a cluster of bright specks (1-3 px at 0.2 mm) within ~5-10 mm; the mask covers the cluster."""
    cluster_mm = float(rng.uniform(5.0, 10.0))
    radius_px = cluster_mm / 2.0 / spacing_mm
    taken = None
    if image.lesions:
        taken = np.any([les.mask for les in image.lesions], axis=0)
        taken = cv2.dilate(taken.astype(np.uint8), np.ones((3, 3), np.uint8), iterations=int(radius_px * 2)).astype(bool)
    cy, cx = lesion_site(image, rng, int(radius_px * 1.5) + 2, taken)
    h, w = image.brightness.shape
    n = int(rng.integers(6, 22))
    # specks scattered around the centre (a gaussian cloud clipped to the cluster radius)
    offsets = rng.normal(0.0, radius_px / 2.0, size=(n, 2))
    norms = np.linalg.norm(offsets, axis=1, keepdims=True)
    offsets = np.where(norms > radius_px, offsets / np.maximum(norms, 1e-6) * radius_px * rng.uniform(0.6, 1.0, (n, 1)), offsets)
    points = np.column_stack([cy + offsets[:, 0], cx + offsets[:, 1]])
    points = np.clip(points, [1, 1], [h - 2, w - 2])
    half = int(radius_px) + 12
    y0, y1 = max(0, cy - half), min(h, cy + half)
    x0, x1 = max(0, cx - half), min(w, cx + half)
    yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
    specks = np.zeros((y1 - y0, x1 - x0), np.float32)
    for py, px in points:
        # speck diameter 1-3 px at 0.2 mm, i.e. 0.2-0.6 mm
        sigma = rng.uniform(0.1, 0.3) / spacing_mm / 1.2
        amp = rng.uniform(0.12, 0.3)
        specks = np.maximum(specks, amp * np.exp(-(((yy - py) ** 2 + (xx - px) ** 2) / (2 * sigma**2))))
    window = image.brightness[y0:y1, x0:x1]
    window[...] = np.clip(window + specks * image.breast_mask[y0:y1, x0:x1], 0.0, 1.0)
    hull = cv2.convexHull(np.round(points[:, ::-1]).astype(np.int32))
    mask_u8 = np.zeros((h, w), np.uint8)
    cv2.fillPoly(mask_u8, [hull], 1)
    grow = max(1, int(1.0 / spacing_mm))
    mask_u8 = cv2.dilate(mask_u8, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * grow + 1, 2 * grow + 1)))
    mask = mask_u8.astype(bool) & image.breast_mask
    descriptors = {
        "calc type": str(rng.choice(["PLEOMORPHIC", "AMORPHOUS", "PUNCTATE", "FINE_LINEAR_BRANCHING", "PUNCTATE-PLEOMORPHIC"])),
        "calc distribution": str(rng.choice(["CLUSTERED", "CLUSTERED", "CLUSTERED", "SEGMENTAL", "LINEAR"])),
    }
    lesion = LesionDraw("calcification", mask, descriptors, cluster_mm)
    image.lesions.append(lesion)
    return lesion
