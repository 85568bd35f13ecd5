"""Synthetic H&E-like whole-slide images with ground-truth masks.

:func:`make_synthetic_slide` writes a pyramidal, tiled, JPEG-compressed TIFF that
OpenSlide and tiffslide both read (Aperio SVS layout by default, or a generic tiled
TIFF), drawn procedurally: pink stroma with fibre texture, purple nuclei, denser and
darker "tumour" regions, an off-white background and a few small debris specks.

The content is defined by smooth low-resolution fields sampled at ``mask_mpp`` (µm/px),
so any region of the slide can be rendered on its own: the writer renders level 0 one
strip of tiles at a time, streams the tiles to the TIFF writer, and builds each coarser
level by box-averaging the level above, spooled through a temporary raw file. Memory
therefore stays bounded (a few hundred MB) whatever the slide size, and slides of
several gigapixels can be written.

The returned masks are the thresholded fields at ``mask_mpp``; mask pixel ``(r, c)``
covers level-0 pixels ``[c * s, (c + 1) * s) x [r * s, (r + 1) * s)`` with
``s = mask_mpp / mpp``.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Literal, NamedTuple

import numpy as np
from numpy.typing import NDArray

from wsi_mil.errors import ConfigError
from wsi_mil.outputs import atomic_path

__all__ = ["BACKGROUND_RGB", "SyntheticSlide", "make_synthetic_slide"]

#: Colour of the glass around the tissue (also drawn by ``wsi._render``).
BACKGROUND_RGB = (241, 240, 238)

_CHUNK_PX = 1024  # render level 0 in chunks of this width ...
_CHUNK_ROWS = 256  # ... and height


class SyntheticSlide(NamedTuple):
    """A written synthetic slide and its ground truth.

    Attributes:
        path: The TIFF file written.
        tissue_mask: bool (rows, cols) at ``mask_mpp``; True where there is tissue.
        tumour_mask: bool (rows, cols) at ``mask_mpp``; True where there is tumour
            (always inside ``tissue_mask``).
        mask_mpp: µm per mask pixel.
    """

    path: Path
    tissue_mask: NDArray[np.bool_]
    tumour_mask: NDArray[np.bool_]
    mask_mpp: float


@dataclass(frozen=True)
class _Scene:
    """Procedural scene: low-resolution fields (at ``field_mpp``) and debris specks."""

    fields: NDArray[np.float32]  # (3, rows, cols): tissue, tumour, texture
    tissue_thr: float
    tumour_thr: float
    field_mpp: float
    debris: NDArray[np.float64]  # (n, 3): x_um, y_um, radius_um
    seed: int


def make_synthetic_slide(
    path: str | os.PathLike[str],
    width: int,
    height: int,
    *,
    mpp: float | None = 0.5,
    seed: int = 0,
    levels: int | None = None,
    level_factor: int = 4,
    tile_px: int = 256,
    quality: int = 85,
    mask_mpp: float = 8.0,
    resolution: Literal["mpp", "72dpi", "none"] = "mpp",
    flavour: Literal["aperio", "generic"] = "aperio",
    associated: bool = True,
    tumour_fraction: float = 0.3,
    tumour_layout: Literal["field", "region"] = "field",
    speck_fraction: float = 0.0,
) -> SyntheticSlide:
    """Write a synthetic pyramidal whole-slide image and return its ground truth.

    Args:
        path: Output file (``.svs`` or ``.tif``); written atomically.
        width: Level-0 width in pixels.
        height: Level-0 height in pixels.
        mpp: µm per level-0 pixel of the drawn content. ``None`` writes no resolution
            information at all (the slide then needs an explicit ``mpp`` to open);
            content is drawn as if at 0.5 µm/px.
        seed: Seed of the procedural content.
        levels: Number of pyramid levels; default: down to a level whose longer side
            is at most 1024 px.
        level_factor: Downsample between consecutive levels (2 or 4).
        tile_px: TIFF tile side (multiple of 16).
        quality: JPEG quality.
        mask_mpp: µm per pixel of the returned masks (and of the content fields).
        resolution: ``"mpp"`` stores the resolution (Aperio ``MPP`` and TIFF
            resolution in cm), ``"72dpi"`` stores only a 72-dpi placeholder TIFF
            resolution (as many converters do), ``"none"`` stores none. ``mpp=None``
            implies ``"none"``.
        flavour: ``"aperio"`` writes an SVS-like file (OpenSlide vendor ``aperio``);
            ``"generic"`` a plain pyramidal tiled TIFF (vendor ``generic-tiff``).
        associated: Also write small ``label`` and ``macro`` images (Aperio only).
        tumour_fraction: Share of the tissue area drawn as tumour (0–1).
        tumour_layout: ``"field"`` scatters tumour as smooth patches over the tissue;
            ``"region"`` draws it as one contiguous region around a random point
            inside the tissue (a planted signal of known size and place), covering
            about ``tumour_fraction`` of the tissue (less where it reaches the tissue
            border; the returned mask is exact).
        speck_fraction: With ``"region"``: share of the tissue also drawn as small
            scattered specks of the same tissue kind (about 100 µm across), a
            distractor that is not contiguous.

    Returns:
        The path and the tissue / tumour masks at ``mask_mpp``.

    Raises:
        ConfigError: On an invalid argument.
    """
    _check_args(width, height, mpp, levels, level_factor, tile_px, mask_mpp)
    draw_mpp = 0.5 if mpp is None else float(mpp)
    if mpp is None:
        resolution = "none"
    if not 0.0 <= tumour_fraction <= 1.0:
        raise ConfigError(f"tumour_fraction must lie in [0, 1], got {tumour_fraction}")
    if tumour_layout not in ("field", "region"):
        raise ConfigError(f"tumour_layout must be 'field' or 'region', got {tumour_layout!r}")
    if not 0.0 <= speck_fraction <= 0.5:
        raise ConfigError(f"speck_fraction must lie in [0, 0.5], got {speck_fraction}")
    region = (tumour_fraction, speck_fraction) if tumour_layout == "region" else None
    scene = _make_scene(width, height, draw_mpp, seed, mask_mpp, tumour_fraction, region)
    n_levels = levels if levels is not None else _auto_levels(width, height, level_factor)
    out = Path(path)
    with atomic_path(out) as tmp:
        _write_tiff(
            tmp, scene, width, height, draw_mpp, n_levels, level_factor, tile_px,
            quality, resolution, flavour, associated,
        )  # fmt: skip
    tissue, tumour = _scene_masks(scene, width, height, draw_mpp)
    return SyntheticSlide(out, tissue, tumour, float(mask_mpp))


def _check_args(
    width: int,
    height: int,
    mpp: float | None,
    levels: int | None,
    level_factor: int,
    tile_px: int,
    mask_mpp: float,
) -> None:
    if width < 16 or height < 16:
        raise ConfigError(f"synthetic slide size {width}x{height}: need at least 16x16 px")
    if mpp is not None and not (0.05 <= mpp <= 20):
        raise ConfigError(f"synthetic slide mpp={mpp}: pass a value in 0.05-20 µm/px or None")
    if levels is not None and levels < 1:
        raise ConfigError(f"synthetic slide levels={levels}: need at least 1")
    if level_factor not in (2, 4):
        raise ConfigError(f"synthetic slide level_factor={level_factor}: use 2 or 4")
    if tile_px < 16 or tile_px % 16:
        raise ConfigError(f"synthetic slide tile_px={tile_px}: use a multiple of 16")
    if mask_mpp <= 0:
        raise ConfigError(f"synthetic slide mask_mpp={mask_mpp}: must be positive")


def _auto_levels(width: int, height: int, factor: int) -> int:
    n, side = 1, max(width, height)
    while side > 1024 and min(width, height) // factor**n >= 64:
        side //= factor
        n += 1
    return n


# --------------------------------------------------------------------------- scene


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], scale: float) -> NDArray:
    """Smooth zero-mean unit-variance noise with features about ``scale`` px across."""
    coarse = (max(2, math.ceil(shape[0] / scale) + 2), max(2, math.ceil(shape[1] / scale) + 2))
    grid = rng.standard_normal(coarse)
    ys = np.linspace(1.0, coarse[0] - 2.0, shape[0])
    xs = np.linspace(1.0, coarse[1] - 2.0, shape[1])
    out = (_bspline_matrix(ys, coarse[0]) @ grid @ _bspline_matrix(xs, coarse[1]).T).astype(
        np.float32
    )
    out -= out.mean()
    out /= out.std() + 1e-9
    return out


def _make_scene(
    width: int,
    height: int,
    mpp: float,
    seed: int,
    field_mpp: float,
    tumour_fraction: float = 0.3,
    region: tuple[float, float] | None = None,
) -> _Scene:
    rng = np.random.default_rng(seed)
    rows = max(2, math.ceil(height * mpp / field_mpp))
    cols = max(2, math.ceil(width * mpp / field_mpp))
    yy = ((np.arange(rows, dtype=np.float32) + 0.5) / rows)[:, None]
    xx = ((np.arange(cols, dtype=np.float32) + 0.5) / cols)[None, :]
    fields = np.empty((3, rows, cols), dtype=np.float32)
    tissue = fields[0]
    tissue[:] = -1.0
    # A few elliptical tissue pieces with ragged, noisy borders.
    for _ in range(int(rng.integers(1, 4))):
        cy, cx = rng.uniform(0.3, 0.7, 2)
        ry, rx = rng.uniform(0.18, 0.32, 2)
        ang = rng.uniform(0, np.pi)
        cos, sin = np.float32(np.cos(ang)), np.float32(np.sin(ang))
        dy, dx = yy - np.float32(cy), xx - np.float32(cx)
        u = (dx * cos + dy * sin) / np.float32(rx)
        v = (dy * cos - dx * sin) / np.float32(ry)
        np.maximum(tissue, 1.0 - np.sqrt(u * u + v * v), out=tissue)
        del u, v
    span = max(rows, cols)
    tissue += 0.12 * _smooth_noise(rng, (rows, cols), span / 6)
    fields[1] = _smooth_noise(rng, (rows, cols), span / 4)
    fields[2] = _smooth_noise(rng, (rows, cols), 3.0)
    inside = tissue > 0
    if region is not None and inside.any():
        fields[1] = _region_field(rng, tissue, fields[1], *region, field_mpp)
        tumour_thr = 0.0
    else:
        tumour_thr = (
            float(np.quantile(fields[1][inside], 1.0 - tumour_fraction)) if inside.any() else 0.0
        )
    debris = _place_debris(rng, tissue, field_mpp)
    return _Scene(fields, 0.0, tumour_thr, field_mpp, debris, seed)


def _region_field(
    rng: np.random.Generator,
    tissue: NDArray,
    noise: NDArray,
    share: float,
    speck_share: float,
    field_mpp: float,
) -> NDArray:
    """A field positive on one disc of ``share`` of the tissue area around a random point
    well inside the tissue (with a little of ``noise`` for a ragged border), and on small
    scattered specks covering about ``speck_share``; negative elsewhere. Scaled so the
    renderer's soft edge is narrow."""
    rows, cols = tissue.shape
    inside = tissue > 0
    n_inside = int(inside.sum())
    span = float(max(rows, cols))
    yy = np.arange(rows, dtype=np.float32)[:, None]
    xx = np.arange(cols, dtype=np.float32)[None, :]
    out = np.full((rows, cols), -10.0, dtype=np.float32)

    def disc(r: int, c: int, radius: float) -> NDArray:
        dist = np.sqrt((yy - r) ** 2 + (xx - c) ** 2)
        return (10.0 / span) * (radius - dist)

    if share > 0:
        deep = np.flatnonzero(tissue > np.quantile(tissue[inside], 0.5))
        r, c = divmod(int(rng.choice(deep)), cols)
        np.maximum(out, disc(r, c, math.sqrt(share * n_inside / math.pi)) + 0.06 * noise, out=out)
    speck_radius = max(1.0, 50.0 / field_mpp)
    n_specks = round(speck_share * n_inside / (math.pi * speck_radius**2))
    for flat in rng.choice(np.flatnonzero(inside), size=n_specks):
        r, c = divmod(int(flat), cols)
        np.maximum(out, disc(r, c, speck_radius), out=out)
    return out


def _place_debris(rng: np.random.Generator, tissue: NDArray, field_mpp: float) -> NDArray:
    """A few small specks on background, well away from tissue."""
    rows, cols = tissue.shape
    specks: list[tuple[float, float, float]] = []
    for _ in range(200):
        if len(specks) >= 6:
            break
        r, c = int(rng.integers(0, rows)), int(rng.integers(0, cols))
        if tissue[r, c] < -0.15:
            radius = float(rng.uniform(3.0, 8.0))
            specks.append(((c + 0.5) * field_mpp, (r + 0.5) * field_mpp, radius))
    return np.array(specks, dtype=np.float64).reshape(-1, 3)


def _scene_masks(
    scene: _Scene, width: int, height: int, mpp: float
) -> tuple[NDArray[np.bool_], NDArray[np.bool_]]:
    rows = math.ceil(height * mpp / scene.field_mpp)
    cols = math.ceil(width * mpp / scene.field_mpp)
    tissue = scene.fields[0, :rows, :cols] > scene.tissue_thr
    tumour = tissue & (scene.fields[1, :rows, :cols] > scene.tumour_thr)
    return tissue, tumour


# ------------------------------------------------------------------------ rendering


def _bspline_matrix(coords: NDArray, n: int) -> NDArray[np.float64]:
    """Matrix (len(coords), n) of cubic B-spline weights (smooth approximation)."""
    i = np.floor(coords).astype(np.int64)
    t = coords - i
    weights = (
        (1 - t) ** 3 / 6,
        (3 * t**3 - 6 * t**2 + 4) / 6,
        (-3 * t**3 + 3 * t**2 + 3 * t + 1) / 6,
        t**3 / 6,
    )
    m = np.zeros((len(coords), n))
    rows = np.arange(len(coords))
    for k, w in enumerate(weights):
        np.add.at(m, (rows, np.clip(i + k - 1, 0, n - 1)), w)
    return m


def render_region(
    scene: _Scene, x0: int, y0: int, width: int, height: int, mpp: float
) -> NDArray[np.uint8]:
    """Render level-0 pixels ``[x0, x0 + width) x [y0, y0 + height)`` of a scene.

    Any region can be rendered on its own; the result does not depend on how a
    larger area is split into regions.

    Returns:
        uint8 (height, width, 3) RGB.
    """
    from wsi_mil.wsi._render import EDGE, render_kernel

    out = np.empty((height, width, 3), dtype=np.uint8)
    fm = scene.field_mpp
    r0, r1 = int(y0 * mpp / fm) - 1, int((y0 + height) * mpp / fm) + 2
    c0, c1 = int(x0 * mpp / fm) - 1, int((x0 + width) * mpp / fm) + 2
    block = scene.fields[0, max(r0, 0) : max(r1, 1), max(c0, 0) : max(c1, 1)]
    if (
        block.size
        and block.max() <= scene.tissue_thr - EDGE
        and not _specks_near(
            scene.debris, x0 * mpp, y0 * mpp, (x0 + width) * mpp, (y0 + height) * mpp
        )
    ):
        out[:] = BACKGROUND_RGB
        return out
    render_kernel(
        out, int(x0), int(y0), float(mpp), scene.fields, fm, float(scene.tissue_thr),
        float(scene.tumour_thr), scene.debris, int(scene.seed),
    )  # fmt: skip
    return out


def _specks_near(debris: NDArray, x0: float, y0: float, x1: float, y1: float) -> bool:
    if not len(debris):
        return False
    x, y, r = debris.T
    return bool(((x + r > x0) & (x - r < x1) & (y + r > y0) & (y - r < y1)).any())


# -------------------------------------------------------------------------- writing


def _level0_strips(
    scene: _Scene, width: int, height: int, mpp: float, strip_px: int
) -> Iterator[NDArray[np.uint8]]:
    """Level-0 strips of ``strip_px`` rows (the last may be shorter)."""
    for y in range(0, height, strip_px):
        h = min(strip_px, height - y)
        strip = np.empty((h, width, 3), dtype=np.uint8)
        for dy in range(0, h, _CHUNK_ROWS):
            rows = min(_CHUNK_ROWS, h - dy)
            for x in range(0, width, _CHUNK_PX):
                w = min(_CHUNK_PX, width - x)
                strip[dy : dy + rows, x : x + w] = render_region(scene, x, y + dy, w, rows, mpp)
        yield strip


def _spooled_strips(
    spool: IO[bytes], width: int, height: int, strip_px: int
) -> Iterator[NDArray[np.uint8]]:
    """Read back a raw (height, width, 3) uint8 image from a file in strips."""
    spool.seek(0)
    row_bytes = width * 3
    for y in range(0, height, strip_px):
        h = min(strip_px, height - y)
        buf = spool.read(h * row_bytes)
        yield np.frombuffer(buf, dtype=np.uint8).reshape(h, width, 3)


def _box_downsample(img: NDArray[np.uint8], factor: int) -> NDArray[np.uint8]:
    """Mean of each ``factor x factor`` block (rounded), without a full-size temporary.

    Args:
        img: uint8 (rows, cols, 3), rows and cols multiples of ``factor``.

    Returns:
        uint8 (rows // factor, cols // factor, 3).
    """
    acc = np.zeros((img.shape[0] // factor, img.shape[1] // factor, 3), dtype=np.uint16)
    for dy in range(factor):
        for dx in range(factor):
            acc += img[dy::factor, dx::factor]
    n = factor * factor
    return ((acc + n // 2) // n).astype(np.uint8)


def _tiles_and_spool(
    strips: Iterator[NDArray[np.uint8]],
    width: int,
    tile_px: int,
    factor: int,
    spool: IO[bytes] | None,
) -> Iterator[NDArray[np.uint8]]:
    """Yield the tiles of each strip in row-major order; box-downsample into ``spool``."""
    out_w = width // factor
    for strip in strips:
        if spool is not None:
            h = strip.shape[0] // factor * factor
            spool.write(_box_downsample(strip[:h, : out_w * factor], factor).tobytes())
        for y in range(0, strip.shape[0], tile_px):
            for x in range(0, width, tile_px):
                tile = strip[y : y + tile_px, x : x + tile_px]
                if tile.shape[:2] != (tile_px, tile_px):
                    full = np.empty((tile_px, tile_px, 3), dtype=np.uint8)
                    full[:] = BACKGROUND_RGB
                    full[: tile.shape[0], : tile.shape[1]] = tile
                    tile = full
                yield tile


def _aperio_description(
    width: int, height: int, tile_px: int, quality: int, mpp: float | None
) -> str:
    desc = (
        f"Aperio Image Library v12.0.15 \r\n{width}x{height} [0,0 {width}x{height}] "
        f"({tile_px}x{tile_px}) JPEG/RGB Q={quality}|AppMag = "
    )
    power = 20 if mpp is None else round(10.0 / mpp, 1)
    desc += f"{power:g}|Filename = synthetic|ScanScope ID = WSI-MIL-SYNTHETIC"
    if mpp is not None:
        desc += f"|MPP = {mpp:.4f}"
    return desc


def _write_tiff(
    path: Path,
    scene: _Scene,
    width: int,
    height: int,
    mpp: float,
    n_levels: int,
    factor: int,
    tile_px: int,
    quality: int,
    resolution: str,
    flavour: str,
    associated: bool,
) -> None:
    import tifffile

    bigtiff = width * height * 3 > 2**31
    strip_px = tile_px  # one row of tiles; a multiple of the level factor
    common: dict = {
        "photometric": "rgb",
        "compression": "jpeg",
        "compressionargs": {"level": quality},
        "tile": (tile_px, tile_px),
        "metadata": None,
    }
    w, h = width, height
    strips: Iterator[NDArray[np.uint8]] = _level0_strips(scene, width, height, mpp, strip_px)
    spool_dir = path.parent
    with tifffile.TiffWriter(path, bigtiff=bigtiff) as tif:
        prev: IO[bytes] | None = None
        for level in range(n_levels):
            last = level == n_levels - 1
            spool = None if last else tempfile.TemporaryFile(dir=spool_dir)
            kwargs = dict(common)
            kwargs.update(_resolution_tags(resolution, mpp * width / w))
            if level == 0 and flavour == "aperio":
                desc_mpp = mpp if resolution == "mpp" else None
                kwargs["description"] = _aperio_description(
                    width, height, tile_px, quality, desc_mpp
                )
            elif level == 0:
                kwargs["description"] = "wsi-mil synthetic slide"
            elif flavour == "generic":
                kwargs["subfiletype"] = 1  # reduced-resolution page
            tif.write(
                _tiles_and_spool(strips, w, tile_px, factor, spool),
                shape=(h, w, 3),
                dtype=np.uint8,
                **kwargs,
            )
            if level == 0 and flavour == "aperio":
                _write_thumbnail(tif, scene, width, height, mpp)
            if prev is not None:
                prev.close()
            if spool is not None:
                w, h = w // factor, h // factor
                spool.flush()
                strips = _spooled_strips(spool, w, h, strip_px)
            prev = spool
        if associated and flavour == "aperio":
            _write_associated(tif, scene)


def _write_thumbnail(tif, scene: _Scene, width: int, height: int, mpp: float) -> None:
    """Aperio's second page: a small stripped (untiled) overview image."""
    scale = max(width, height) / 768
    tw, th = max(1, round(width / scale)), max(1, round(height / scale))
    thumb = render_region(scene, 0, 0, tw, th, mpp * scale)
    tif.write(
        thumb,
        photometric="rgb",
        compression="jpeg",
        metadata=None,
        description=f"Aperio Image Library v12.0.15\r\n{width}x{height} -> {tw}x{th}",
    )


def _resolution_tags(resolution: str, level_mpp: float) -> dict:
    if resolution == "mpp":
        return {"resolution": (1e4 / level_mpp, 1e4 / level_mpp), "resolutionunit": "CENTIMETER"}
    if resolution == "72dpi":
        return {"resolution": (72.0, 72.0), "resolutionunit": "INCH"}
    return {"resolution": (1.0, 1.0), "resolutionunit": "NONE"}


def _write_associated(tif, scene: _Scene) -> None:
    """Small label (with a fake patient name barcode) and macro images, Aperio style."""
    label = np.full((240, 200, 3), 250, dtype=np.uint8)
    label[40:200:8, 30:170] = 20  # barcode-ish stripes
    tif.write(
        label,
        photometric="rgb",
        compression="lzw",
        description="Aperio Image Library v12.0.15\r\nlabel 200x240",
        subfiletype=1,
        metadata=None,
    )
    tissue = scene.fields[0] > scene.tissue_thr
    step = max(1, max(tissue.shape) // 300)
    small = tissue[::step, ::step]
    macro = np.full((small.shape[0] + 40, small.shape[1] + 40, 3), 230, dtype=np.uint8)
    macro[20:-20, 20:-20][small] = (200, 120, 180)
    tif.write(
        macro,
        photometric="rgb",
        compression="jpeg",
        description=f"Aperio Image Library v12.0.15\r\nmacro {macro.shape[1]}x{macro.shape[0]}",
        subfiletype=9,
        metadata=None,
    )
