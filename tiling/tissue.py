"""Tissue detection on a low-resolution RGB thumbnail (numba kernels).

The method (``"sat-hysteresis/1"``) works on a thumbnail at ``mask_mpp`` µm/px:

1. Per pixel: HSV saturation of the 3×3 box-blurred image and, on the raw pixels, an
   *excluded* flag for pen/ink marks (green, teal and blue ink: green clearly above red,
   or blue far above red while green is not below red — H&E never looks like that) and
   black or dark-grey pixels (scanner borders, black marker).
2. Per slide thresholds: Otsu's threshold of the saturation histogram of the
   non-excluded pixels, clamped to ``[sat_floor, sat_ceiling]`` (so a slide with no
   tissue does not split its background noise, and a slide full of tissue does not split
   eosin from haematoxylin). Pixels at or above it are *strong*; pixels above
   ``weak_ratio`` times it are *weak*, and weak regions are kept when they touch a strong
   pixel (hysteresis), which keeps faint tissue attached to tissue.
3. Morphology in physical units: closing with a square of side ``2 * close_um``, filling
   of holes smaller than ``max_hole_um2``, removal of ink/black pixels and a one-pixel
   halo around them (ink enclosed by tissue is never tissue, even after hole filling),
   then removal of connected components (8-connected) smaller than ``min_area_um2``.

All kernels are compiled with ``numba`` (``cache=True``), run in a single thread and are
deterministic: the result depends only on the pixels, ``mpp`` and the parameters.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from numba import njit

from wsi_mil.errors import SlideTooLargeError

__all__ = [
    "MASK_PIXEL_BUDGET",
    "METHOD",
    "TissueParams",
    "check_mask_budget",
    "detect_tissue",
    "label_components",
    "otsu_threshold",
]

#: Name and version of the detection method, stored in tile stores.
METHOD = "sat-hysteresis/1"

#: Most pixels tissue masking may decode from the pyramid level it reads, or hold in
#: its thumbnail: 2**30 (about 1.07 gigapixels, e.g. 32768 x 32768, some seconds of
#: decoding). A pyramidal slide needs far less (a 200k x 100k scan at 0.25 µm/px reads
#: at most ~0.3 gigapixels for an 8 µm/px mask); a single-level 200k x 200k image needs
#: 37 times the budget and is refused instead of decoding for minutes.
MASK_PIXEL_BUDGET = 2**30


def check_mask_budget(slide: Any, mask_mpp: float, budget: int | None = None) -> None:
    """Refuse a slide whose tissue mask at ``mask_mpp`` would cost too many pixels.

    Counts the pixels of the pyramid level that ``slide.get_thumbnail(mpp=mask_mpp)``
    reads and of the thumbnail it returns; either above the budget is refused.

    Args:
        slide: An open :class:`wsi_mil.wsi.Slide`.
        mask_mpp: Resolution of the thumbnail and mask in µm/px.
        budget: Pixel budget; default :data:`MASK_PIXEL_BUDGET`.

    Raises:
        SlideTooLargeError: Naming the slide, the pixels needed and the budget.
    """
    budget = MASK_PIXEL_BUDGET if budget is None else int(budget)
    width, height = (int(v) for v in slide.dimensions)
    scale = mask_mpp / float(slide.mpp)
    thumb = (math.ceil(width / scale), math.ceil(height / scale))
    level = int(slide.best_level_for_mpp(mask_mpp))
    read = tuple(int(v) for v in slide.level_dimensions[level])
    if max(read[0] * read[1], thumb[0] * thumb[1]) <= budget:
        return
    if read[0] * read[1] >= thumb[0] * thumb[1]:
        needed, what = read[0] * read[1], f"decoding level {level} ({read[0]} x {read[1]} px)"
        fix = (
            f"the slide has no pyramid level near {mask_mpp:g} µm/px; convert it to a "
            "pyramidal TIFF (e.g. `vips tiffsave IN OUT.tif --tile --pyramid`)"
        )
    else:
        needed, what = thumb[0] * thumb[1], f"a {thumb[0]} x {thumb[1]} px thumbnail"
        fix = f"check --mpp ({float(slide.mpp):g} µm/px) and --mask-mpp"
    raise SlideTooLargeError(
        f"{slide.path}: tissue masking at {mask_mpp:g} µm/px needs {what}, {needed:,} "
        f"pixels, over the budget of {budget:,} pixels; {fix}"
    )


@dataclass(frozen=True)
class TissueParams:
    """Parameters of :func:`detect_tissue` (sizes are physical, not pixels).

    Attributes:
        sat_floor: Lowest allowed strong saturation threshold (0–1).
        sat_ceiling: Highest allowed strong saturation threshold (0–1).
        weak_ratio: Weak threshold as a fraction of the strong one (hysteresis).
        black_value: Pixels whose brightest channel is below this (0–255) are excluded.
        dark_grey_value: Pixels darker than this with saturation below ``dark_grey_sat``
            are excluded (black/grey marker, dirt).
        dark_grey_sat: See ``dark_grey_value``.
        pen_margin: Green ink: G > R + margin (0–255).
        blue_margin: Blue ink: B > R + margin while G >= R - 5.
        close_um: Radius of the closing, in µm.
        max_hole_um2: Holes smaller than this (µm²) are filled.
        min_area_um2: Tissue pieces smaller than this (µm²) are removed as debris.
    """

    sat_floor: float = 0.06
    sat_ceiling: float = 0.22
    weak_ratio: float = 0.5
    black_value: int = 50
    dark_grey_value: int = 100
    dark_grey_sat: float = 0.2
    pen_margin: int = 12
    blue_margin: int = 70
    close_um: float = 12.0
    max_hole_um2: float = 40_000.0
    min_area_um2: float = 20_000.0

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (for store attributes and config files)."""
        return asdict(self)


# --------------------------------------------------------------------------- kernels


@njit(cache=True)
def _pixel_features(
    rgb: np.ndarray,
    black_value: int,
    dark_grey_value: int,
    dark_grey_sat: int,
    pen_margin: int,
    blue_margin: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Saturation of the 3×3-blurred image and the excluded flag of the raw pixels.

    Args:
        rgb: uint8 (h, w, 3).

    Returns:
        ``sat`` uint8 (h, w) (0–255) and ``excl`` bool (h, w).
    """
    h, w = rgb.shape[0], rgb.shape[1]
    rows = np.empty((h, w, 3), np.uint16)  # horizontal 3-sums
    for i in range(h):
        for j in range(w):
            for k in range(3):
                acc = np.uint16(rgb[i, j, k])
                if j > 0:
                    acc += rgb[i, j - 1, k]
                if j + 1 < w:
                    acc += rgb[i, j + 1, k]
                rows[i, j, k] = acc
    sat = np.empty((h, w), np.uint8)
    excl = np.zeros((h, w), np.bool_)
    for i in range(h):
        for j in range(w):
            # saturation is scale invariant: use the 3×3 sums, no per-channel division
            s0 = np.int32(rows[i, j, 0])
            s1 = np.int32(rows[i, j, 1])
            s2 = np.int32(rows[i, j, 2])
            if i > 0:
                s0 += rows[i - 1, j, 0]
                s1 += rows[i - 1, j, 1]
                s2 += rows[i - 1, j, 2]
            if i + 1 < h:
                s0 += rows[i + 1, j, 0]
                s1 += rows[i + 1, j, 1]
                s2 += rows[i + 1, j, 2]
            mx = max(s0, max(s1, s2))
            mn = min(s0, min(s1, s2))
            sat[i, j] = 0 if mx == 0 else (255 * (mx - mn) + mx // 2) // mx
            r = np.int32(rgb[i, j, 0])
            g = np.int32(rgb[i, j, 1])
            b = np.int32(rgb[i, j, 2])
            vmx = max(r, max(g, b))
            vmn = min(r, min(g, b))
            vs = 0 if vmx == 0 else (255 * (vmx - vmn) + vmx // 2) // vmx
            if vmx < black_value or (vmx < dark_grey_value and vs < dark_grey_sat):
                excl[i, j] = True
            elif g > r + pen_margin and vmx - vmn > 25:
                excl[i, j] = True
            elif b > r + blue_margin and g >= r - 5:
                excl[i, j] = True
    return sat, excl


@njit(cache=True)
def _histogram(values: np.ndarray, excl: np.ndarray) -> np.ndarray:
    """256-bin histogram of uint8 ``values`` (h, w) where ``excl`` is False."""
    hist = np.zeros(256, np.int64)
    h, w = values.shape
    for i in range(h):
        for j in range(w):
            if not excl[i, j]:
                hist[values[i, j]] += 1
    return hist


@njit(cache=True)
def _otsu(hist: np.ndarray) -> int:
    """Otsu's threshold of a 256-bin histogram: values >= threshold are foreground."""
    total = hist.sum()
    if total == 0:
        return 256
    sum_all = 0.0
    for k in range(256):
        sum_all += k * hist[k]
    w0 = 0.0
    sum0 = 0.0
    best = -1.0
    best_t = 0
    for t in range(1, 256):
        w0 += hist[t - 1]
        sum0 += (t - 1) * hist[t - 1]
        w1 = total - w0
        if w0 == 0 or w1 == 0:
            continue
        m0 = sum0 / w0
        m1 = (sum_all - sum0) / w1
        between = w0 * w1 * (m0 - m1) ** 2
        if between > best:
            best = between
            best_t = t
    return best_t


@njit(cache=True)
def _find(parent: np.ndarray, x: int) -> int:
    root = x
    while parent[root] != root:
        root = parent[root]
    while parent[x] != root:
        nxt = parent[x]
        parent[x] = root
        x = nxt
    return root


@njit(cache=True)
def _union(parent: np.ndarray, a: int, b: int) -> None:
    ra = _find(parent, a)
    rb = _find(parent, b)
    if ra < rb:
        parent[rb] = ra
    elif rb < ra:
        parent[ra] = rb


@njit(cache=True)
def _new_label(parent: np.ndarray, n: int) -> tuple[np.ndarray, int]:
    n += 1
    if n >= parent.shape[0]:
        grown = np.zeros(parent.shape[0] * 2, np.int32)
        grown[: parent.shape[0]] = parent
        parent = grown
    parent[n] = n
    return parent, n


@njit(cache=True)
def label_components(mask: np.ndarray, eight: bool) -> tuple[np.ndarray, np.ndarray]:
    """Label connected components of a bool mask (two-pass union–find).

    The first pass uses the usual decision tree (a labelled north neighbour already
    shares a component with its west/north-east neighbours), so few unions are needed.

    Args:
        mask: bool (h, w).
        eight: 8-connectivity when True, else 4-connectivity.

    Returns:
        ``labels`` int32 (h, w) with 0 = background and 1..n in raster order of first
        pixel, and ``areas`` int64 (n + 1,) pixel counts (``areas[0]`` = 0).
    """
    h, w = mask.shape
    prov = np.zeros((h, w), np.int32)
    parent = np.zeros(max(16, h * w // 4 + 2), np.int32)
    n = 0
    for i in range(h):
        for j in range(w):
            if not mask[i, j]:
                continue
            wl = prov[i, j - 1] if j > 0 else 0
            nl = prov[i - 1, j] if i > 0 else 0
            if eight:
                nw = prov[i - 1, j - 1] if i > 0 and j > 0 else 0
                ne = prov[i - 1, j + 1] if i > 0 and j + 1 < w else 0
                if nl != 0:
                    cur = nl
                elif wl != 0:
                    cur = wl
                    if ne != 0:
                        _union(parent, wl, ne)
                elif nw != 0:
                    cur = nw
                    if ne != 0:
                        _union(parent, nw, ne)
                elif ne != 0:
                    cur = ne
                else:
                    parent, n = _new_label(parent, n)
                    cur = n
            else:
                if nl != 0:
                    cur = nl
                    if wl != 0:
                        _union(parent, nl, wl)
                elif wl != 0:
                    cur = wl
                else:
                    parent, n = _new_label(parent, n)
                    cur = n
            prov[i, j] = cur
    # compact roots into consecutive labels in order of first appearance
    final = np.zeros(n + 1, np.int32)
    count = 0
    for lab in range(1, n + 1):
        root = _find(parent, lab)
        if final[root] == 0:
            count += 1
            final[root] = count
        final[lab] = final[root]
    areas = np.zeros(count + 1, np.int64)
    for i in range(h):
        for j in range(w):
            lab = prov[i, j]
            if lab != 0:
                new = final[lab]
                prov[i, j] = new
                areas[new] += 1
    return prov, areas


@njit(cache=True)
def _hysteresis(sat: np.ndarray, excl: np.ndarray, strong_t: int, weak_t: int) -> np.ndarray:
    """Weak regions (sat >= weak_t) that contain a strong pixel (sat >= strong_t)."""
    h, w = sat.shape
    weak = np.zeros((h, w), np.bool_)
    for i in range(h):
        for j in range(w):
            weak[i, j] = (not excl[i, j]) and sat[i, j] >= weak_t
    labels, areas = label_components(weak, True)
    has_strong = np.zeros(areas.shape[0], np.bool_)
    for i in range(h):
        for j in range(w):
            if labels[i, j] != 0 and sat[i, j] >= strong_t:
                has_strong[labels[i, j]] = True
    out = np.zeros((h, w), np.bool_)
    for i in range(h):
        for j in range(w):
            out[i, j] = has_strong[labels[i, j]]
    return out


@njit(cache=True)
def _count_window_rows(src: np.ndarray, r: int, outside: int) -> np.ndarray:
    """Per pixel, number of True values in the horizontal window [j-r, j+r].

    Pixels outside the image count as ``outside`` (0 or 1).
    """
    h, w = src.shape
    out = np.zeros((h, w), np.int32)
    for i in range(h):
        acc = 0
        for j in range(-r, r + 1):
            acc += (1 if src[i, j] else 0) if 0 <= j < w else outside
        for j in range(w):
            out[i, j] = acc
            jo = j - r
            ji = j + r + 1
            acc -= (1 if src[i, jo] else 0) if 0 <= jo < w else outside
            acc += (1 if src[i, ji] else 0) if 0 <= ji < w else outside
    return out


@njit(cache=True)
def _square_filter(mask: np.ndarray, r: int, erode: bool) -> np.ndarray:
    """Dilation (or erosion) of a bool mask by a (2r+1)² square, separable, O(h·w).

    Erosion treats pixels outside the image as foreground, so a closing does not eat
    tissue that touches the image border. The vertical pass keeps one running sum per
    column and walks the image row by row (cache friendly).
    """
    h, w = mask.shape
    side = 2 * r + 1
    outside = 1 if erode else 0
    rows = _count_window_rows(mask, r, outside)
    full = side * side
    acc = np.zeros(w, np.int32)
    for i in range(-r, r + 1):
        if 0 <= i < h:
            for j in range(w):
                acc[j] += rows[i, j]
        else:
            for j in range(w):
                acc[j] += outside * side
    out = np.zeros((h, w), np.bool_)
    for i in range(h):
        if erode:
            for j in range(w):
                out[i, j] = acc[j] == full
        else:
            for j in range(w):
                out[i, j] = acc[j] > 0
        io = i - r
        ii = i + r + 1
        for j in range(w):
            add = rows[ii, j] if ii < h else outside * side
            sub = rows[io, j] if io >= 0 else outside * side
            acc[j] += add - sub
    return out


@njit(cache=True)
def _fill_small_holes(mask: np.ndarray, max_hole_px: int) -> np.ndarray:
    """Fill background regions not touching the border with area <= ``max_hole_px``."""
    h, w = mask.shape
    bg = ~mask
    labels, areas = label_components(bg, False)
    touches = np.zeros(areas.shape[0], np.bool_)
    for j in range(w):
        touches[labels[0, j]] = True
        touches[labels[h - 1, j]] = True
    for i in range(h):
        touches[labels[i, 0]] = True
        touches[labels[i, w - 1]] = True
    out = mask.copy()
    for i in range(h):
        for j in range(w):
            lab = labels[i, j]
            if lab != 0 and not touches[lab] and areas[lab] <= max_hole_px:
                out[i, j] = True
    return out


@njit(cache=True)
def _remove_small(mask: np.ndarray, min_area_px: int) -> np.ndarray:
    """Drop 8-connected components with fewer than ``min_area_px`` pixels."""
    labels, areas = label_components(mask, True)
    h, w = mask.shape
    out = np.zeros((h, w), np.bool_)
    for i in range(h):
        for j in range(w):
            lab = labels[i, j]
            out[i, j] = lab != 0 and areas[lab] >= min_area_px
    return out


# ------------------------------------------------------------------------ public API


def otsu_threshold(values: np.ndarray, excluded: np.ndarray | None = None) -> int:
    """Otsu's threshold of a uint8 image (values >= threshold are foreground).

    Args:
        values: uint8 (h, w).
        excluded: Optional bool (h, w); True pixels are ignored.

    Returns:
        The threshold in 0..256 (256 when every pixel is excluded).
    """
    values = np.ascontiguousarray(values, dtype=np.uint8)
    if excluded is None:
        excluded = np.zeros(values.shape, np.bool_)
    return int(_otsu(_histogram(values, np.ascontiguousarray(excluded, dtype=np.bool_))))


def detect_tissue(
    rgb: np.ndarray,
    mpp: float,
    params: TissueParams | None = None,
    **overrides: Any,
) -> np.ndarray:
    """Tissue mask of an RGB thumbnail.

    Args:
        rgb: uint8 (h, w, 3) thumbnail of the slide.
        mpp: Its resolution in µm/px (physical sizes in ``params`` are converted with it).
        params: Detection parameters (defaults: :class:`TissueParams`).
        **overrides: Individual parameters replacing those of ``params``.

    Returns:
        bool (h, w), True on tissue.

    Raises:
        ValueError: ``rgb`` is not (h, w, 3) uint8-compatible or ``mpp`` is not positive.
    """
    params = TissueParams(**{**(params or TissueParams()).to_dict(), **overrides})
    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[2] < 3:
        raise ValueError(f"detect_tissue needs an RGB image (h, w, 3), got shape {rgb.shape}")
    if not mpp or mpp <= 0 or not np.isfinite(mpp):
        raise ValueError(f"detect_tissue needs a positive mpp (µm/px), got {mpp!r}")
    h, w = rgb.shape[:2]
    if h == 0 or w == 0:
        return np.zeros((h, w), np.bool_)
    rgb = np.ascontiguousarray(rgb[..., :3], dtype=np.uint8)
    colour = (
        int(params.black_value),
        int(params.dark_grey_value),
        round(params.dark_grey_sat * 255),
        int(params.pen_margin),
        int(params.blue_margin),
    )
    sat, excl = _pixel_features(rgb, *colour)
    t = _otsu(_histogram(sat, excl))
    strong = int(np.clip(t, round(params.sat_floor * 255), round(params.sat_ceiling * 255)))
    weak = max(round(params.sat_floor * 255 * 0.5), round(strong * params.weak_ratio))
    mask = _hysteresis(sat, excl, strong, weak)
    px_area = mpp * mpp
    r = round(params.close_um / mpp)
    if r > 0:
        mask = _square_filter(_square_filter(mask, r, False), r, True)
    mask = _fill_small_holes(mask, int(params.max_hole_um2 / px_area))
    mask &= ~_square_filter(excl, 1, False) | (sat >= strong) & ~excl
    return _remove_small(mask, max(1, int(np.ceil(params.min_area_um2 / px_area))))
