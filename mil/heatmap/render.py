"""Rendering every heatmap format of one slide (``wsi-mil heatmap``).

Files in the output folder, named with the slide id (see DESIGN.md, Heatmaps):

* ``png``: ``<slide_id>_heatmap.png``, the plain slide beside the overlay, with a caption
  and the colour scale;
* ``tiff``: ``<slide_id>_overlay.tif``, the overlay as a pyramid aligned with level 0;
* ``dzi``: ``<slide_id>.dzi`` + ``_files/`` (the slide), ``<slide_id>_overlay.dzi`` +
  ``_files/``, ``<slide_id>_viewer.js``, and ``index.html`` + ``viewer/`` for the folder;
* ``geojson``: ``<slide_id>_attention.geojson``, QuPath tiles with measurements;
* ``topk``: ``topk/<slide_id>_top.png``, ``_bottom.png`` and ``topk/<slide_id>/*.png``;

and ``<slide_id>_heatmap.yaml`` with the options. Every file is written under a
temporary name and renamed when complete.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from wsi_mil.errors import ConfigError, OutputExistsError
from wsi_mil.mil.heatmap.match import check_slide
from wsi_mil.mil.heatmap.raster import ColourScale, Raster, rasterise
from wsi_mil.mil.heatmap.scores import (
    SlideScores,
    rank_normalise,
    scores_from_attention,
    scores_from_co_attention,
)
from wsi_mil.outputs import contained_path

__all__ = [
    "FORMATS",
    "HeatmapOptions",
    "colour_scale",
    "find_attention",
    "heatmap_slide",
    "load_scores",
    "parse_formats",
    "render_heatmap",
]

#: Every format, the default of ``--format``.
FORMATS = ("png", "tiff", "dzi", "geojson", "topk")

_MAX_RASTER_PX = 16 * 2**20  # overlay raster pixels (TIFF / DZI overlay)
#: The PNG's slide panel may enlarge a pyramid level up to this factor rather than
#: decode a finer level (e.g. 2048 px from a 1875 px level instead of a 7500 px one).
_PNG_MAX_UPSAMPLE = 1.5


@dataclass(frozen=True)
class HeatmapOptions:
    """How to draw the heatmaps (the options of ``wsi-mil heatmap``).

    Attributes:
        formats: Subset of :data:`FORMATS`.
        score: ``attention`` or ``contribution`` (default: contribution when the model
            has one, else attention).
        normalise: ``rank`` (rank within the slide; signed rank of the magnitude for
            contributions) or ``raw``.
        sigma_um: Gaussian smoothing σ in µm (0 = none).
        cmap: Matplotlib colormap (default ``inferno``, ``RdBu_r`` for contributions).
        alpha: Overlay opacity in the PNG (0-1).
        png_mpp: µm/px of the PNG panels (default: longest side ``max_size``).
        max_size: Longest side of a PNG panel when ``png_mpp`` is not given.
        overlay_mpp: µm/px of the score raster behind the TIFF and DZI overlays
            (default: a quarter of the tile side, at most 16 Mpx).
        dzi_mpp: Finest µm/px of the slide's Deep Zoom image (default: the tiles' µm/px).
        top_k: Tiles in each of the top and bottom galleries.
        mpp: Level-0 µm/px of the slide when its file has none.
    """

    formats: tuple[str, ...] = FORMATS
    score: str | None = None
    normalise: str = "rank"
    sigma_um: float = 0.0
    cmap: str | None = None
    alpha: float = 0.5
    png_mpp: float | None = None
    max_size: int = 2048
    overlay_mpp: float | None = None
    dzi_mpp: float | None = None
    top_k: int = 8
    mpp: float | None = None

    def check(self) -> HeatmapOptions:
        """Validate; return self.

        Raises:
            ConfigError: Naming the bad option.
        """
        bad = [f for f in self.formats if f not in FORMATS]
        if bad or not self.formats:
            raise ConfigError(f"--format {','.join(bad)}: choose from {','.join(FORMATS)}")
        if self.normalise not in ("rank", "raw"):
            raise ConfigError(f"--normalise must be rank or raw, got {self.normalise!r}")
        if not 0 <= self.alpha <= 1:
            raise ConfigError(f"--alpha must lie in [0, 1], got {self.alpha}")
        if self.sigma_um < 0:
            raise ConfigError(f"--sigma-um must be >= 0, got {self.sigma_um}")
        for name in ("png_mpp", "overlay_mpp", "dzi_mpp", "mpp"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be > 0, got {value}")
        if self.max_size < 16 or self.top_k < 0:
            raise ConfigError("--max-size must be >= 16 and --top-k >= 0")
        if self.cmap is not None:
            from matplotlib import colormaps

            if self.cmap not in colormaps:
                raise ConfigError(f"--cmap {self.cmap!r} is not a matplotlib colormap")
        return self


def parse_formats(text: str) -> tuple[str, ...]:
    """``"png,tiff"`` → ``("png", "tiff")`` (``all`` = every format).

    Raises:
        ConfigError: Unknown format.
    """
    names = [t.strip().lower() for t in text.split(",") if t.strip()]
    if names == ["all"]:
        return FORMATS
    bad = [n for n in names if n not in FORMATS]
    if bad or not names:
        raise ConfigError(f"--format {text!r}: choose from {','.join(FORMATS)} (or all)")
    return tuple(dict.fromkeys(names))


def find_attention(source: str | os.PathLike[str], slide_id: str) -> Path:
    """The attention file of ``slide_id``: ``source`` itself if it is a file, else
    ``<source>/attention/<slide_id>.h5`` (a run folder) or ``<source>/<slide_id>.h5``.

    Raises:
        ConfigError: No attention file found.
    """
    src = Path(source)
    if src.is_file():
        return src
    for candidate in (src / "attention" / f"{slide_id}.h5", src / f"{slide_id}.h5"):
        if candidate.is_file():
            return candidate
    raise ConfigError(
        f"no attention for slide {slide_id!r} under {src} (looked for attention/{slide_id}.h5); "
        "give a run folder of `wsi-mil train`/`predict` or an attention .h5"
    )


def find_co_attention(source: str | os.PathLike[str], slide_id: str) -> Path:
    """The co-attention file of ``slide_id``: ``source`` itself if it is a file, else
    ``<source>/co_attention/<slide_id>.h5`` (a fusion run folder).

    Raises:
        ConfigError: No co-attention file found.
    """
    src = Path(source)
    if src.is_file():
        return src
    candidate = src / "co_attention" / f"{slide_id}.h5"
    if candidate.is_file():
        return candidate
    raise ConfigError(
        f"--gene-group: no co-attention for slide {slide_id!r} under {src} (looked for "
        f"co_attention/{slide_id}.h5); give the run folder of a fusion model (dual_xattn) "
        "that predicted this slide out of fold, or its co-attention .h5"
    )


def load_scores(
    source: str | os.PathLike[str],
    slide_id: str,
    *,
    features: list[str] | None = None,
    fold: int | None = None,
    target_class: str | None = None,
    device: str = "cpu",
    gene_group: str | None = None,
) -> tuple[SlideScores, str]:
    """Scores of a slide from a run folder (scored from its bag) or an attention file.

    A run folder (with ``config.yaml``) scores the slide's feature bag, found in
    ``features`` or the run's own feature folders; without a bag it falls back to the
    run's ``attention/<slide_id>.h5``. Anything else is read as attention. With
    ``gene_group``, the scores are that context token's attention over the tiles from
    the fusion run's ``co_attention/<slide_id>.h5`` (or a co-attention ``.h5``).

    Returns:
        ``(scores, origin)`` where ``origin`` names what they came from.
    """
    from wsi_mil.mil.heatmap.scores import score_slide

    src = Path(source)
    if gene_group is not None:
        path = find_co_attention(src, slide_id)
        return scores_from_co_attention(path, gene_group), f"co-attention file {path}"
    if src.is_dir() and (src / "config.yaml").is_file():
        if features or fold is not None or _run_has_bag(src, slide_id):
            return score_slide(
                src, slide_id, features, fold=fold, target_class=target_class, device=device
            ), f"run {src}"
    path = find_attention(src, slide_id)
    return scores_from_attention(path), f"attention file {path}"


def _run_has_bag(run_dir: Path, slide_id: str) -> bool:
    from wsi_mil.mil.run import load_config

    dirs = load_config(run_dir).get("features") or []
    return bool(dirs) and all((Path(d) / f"{slide_id}.h5").is_file() for d in dirs)


def colour_scale(
    values: np.ndarray, score: str, opts: HeatmapOptions, target: str | None
) -> tuple[np.ndarray, ColourScale]:
    """Normalised values (N,) and their colour scale."""
    signed = score == "contribution"
    what = f"contribution to {target or 'the output'}" if signed else "attention"
    cmap = opts.cmap or ("RdBu_r" if signed else "inferno")
    if opts.normalise == "rank":
        norm = rank_normalise(values, signed)
        label = (
            f"{what}: signed rank within the slide (- against, + towards)"
            if signed
            else f"{what}: percentile within the slide"
        )
        return norm, ColourScale(cmap, -1.0 if signed else 0.0, 1.0, label)
    norm = np.asarray(values, np.float64)
    if signed:
        top = float(np.abs(norm).max()) if len(norm) else 1.0
        return norm, ColourScale(cmap, -top, top, f"{what} (raw)")
    lo, hi = (float(norm.min()), float(norm.max())) if len(norm) else (0.0, 1.0)
    return norm, ColourScale(cmap, lo, hi, f"{what} (raw)")


def render_heatmap(
    scores: SlideScores | str | os.PathLike[str],
    slide: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    options: HeatmapOptions | None = None,
    *,
    origin: str | None = None,
    **kwargs: Any,
) -> dict[str, Path]:
    """Write the chosen formats for one slide.

    Args:
        scores: :class:`SlideScores`, or an attention ``.h5``.
        slide: The whole-slide image the scores belong to.
        out_dir: Output folder.
        options: Drawing options; keyword arguments override its fields
            (e.g. ``max_size=512``).
        origin: What the scores came from, for messages.

    Returns:
        Paths by kind: ``png``, ``tiff``, ``dzi``, ``overlay_dzi``, ``viewer``,
        ``geojson``, ``topk``, ``bottomk`` (those of the chosen formats).

    Raises:
        SlideMismatchError: The scores belong to another slide (names both).
        ConfigError: Bad options.
    """
    from wsi_mil.wsi import open_slide

    opts = _merge(options, kwargs).check()
    if not isinstance(scores, SlideScores):
        origin = origin or f"attention file {scores}"
        scores = scores_from_attention(scores)
    origin = origin or f"the scores of slide {scores.slide_id!r}"
    score = opts.score or scores.default_score()
    raw = scores.values(score)
    norm, scale = colour_scale(raw, score, opts, scores.target)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    with open_slide(slide, mpp=opts.mpp) as s:
        check_slide(scores, s.slide_id, Path(slide), s.dimensions, origin)
        sid = scores.slide_id
        contained_path(out, f"{sid}_heatmap.png")  # refuses an unsafe id before any work
        if "png" in opts.formats:
            paths["png"] = _png(out, s, scores, norm, scale, opts, score)
        if "geojson" in opts.formats:
            from wsi_mil.mil.heatmap.qupath import write_geojson

            geo = contained_path(out, f"{sid}_attention.geojson")
            paths["geojson"] = write_geojson(geo, scores, raw, norm, scale)
        if "topk" in opts.formats and opts.top_k:
            from wsi_mil.mil.heatmap.gallery import write_gallery

            paths.update(write_gallery(out, s, scores, norm, opts.top_k))
        if {"tiff", "dzi"} & set(opts.formats):
            raster = _overlay_raster(s, scores, norm, opts)
            if "tiff" in opts.formats:
                paths["tiff"] = _tiff(out, s, scores, raster, scale, score)
            if "dzi" in opts.formats:
                from wsi_mil.mil.heatmap.viewer import write_slide_dzi

                paths.update(write_slide_dzi(out, s, scores, raw, norm, raster, scale, opts))
    return paths


def _merge(options: HeatmapOptions | None, kwargs: dict[str, Any]) -> HeatmapOptions:
    base = asdict(options or HeatmapOptions())
    unknown = set(kwargs) - set(base)
    if unknown:
        raise TypeError(f"render_heatmap: unknown option(s) {', '.join(sorted(unknown))}")
    base.update(kwargs)
    base["formats"] = tuple(base["formats"])
    return HeatmapOptions(**base)


def _caption(scores: SlideScores, score: str, opts: HeatmapOptions) -> list[str]:
    pred = ", ".join(f"{k} {v:.3g}" for k, v in scores.prediction.items()) or "n/a (attention file)"
    source = f"{scores.source} of " if scores.source else ""
    run = f"run {scores.run}, " if scores.run else ""
    smooth = f", Gaussian σ {opts.sigma_um:g} µm" if opts.sigma_um else ""
    return [
        f"slide {scores.slide_id} — prediction: {pred}",
        f"{run}model {source}{scores.model or 'unknown'}; {len(scores.coords)} tiles; "
        f"colour: {score}, {opts.normalise}{smooth}",
    ]


def _png(
    out: Path,
    s: Any,
    scores: SlideScores,
    norm: np.ndarray,
    scale: ColourScale,
    opts: HeatmapOptions,
    score: str,
) -> Path:
    from wsi_mil.mil.heatmap.png import write_png

    width, height = s.dimensions
    mpp = opts.png_mpp or s.mpp * max(1.0, max(width, height) / opts.max_size)
    plain = s.get_thumbnail(mpp=mpp, max_upsample=_PNG_MAX_UPSAMPLE)
    raster = _raster(s, scores, norm, mpp / s.mpp, opts)
    path = contained_path(out, f"{scores.slide_id}_heatmap.png")
    return write_png(path, plain, raster, scale, opts.alpha, _caption(scores, score, opts))


def _raster(
    s: Any, scores: SlideScores, norm: np.ndarray, scale: float, opts: HeatmapOptions
) -> Raster:
    return rasterise(
        scores.coords,
        scores.side,
        norm,
        dimensions=s.dimensions,
        scale=scale,
        slide_mpp=s.mpp,
        sigma_um=opts.sigma_um,
    )


def _overlay_raster(s: Any, scores: SlideScores, norm: np.ndarray, opts: HeatmapOptions) -> Raster:
    width, height = s.dimensions
    scale = opts.overlay_mpp / s.mpp if opts.overlay_mpp else max(1.0, scores.side / 4)
    scale = max(scale, float(np.sqrt(width * height / _MAX_RASTER_PX)))
    return _raster(s, scores, norm, scale, opts)


def _tiff(
    out: Path, s: Any, scores: SlideScores, raster: Raster, scale: ColourScale, score: str
) -> Path:
    from wsi_mil.mil.heatmap.pyramid import write_overlay_tiff

    rgba = scale.rgba(raster.value)
    rgb = np.where(rgba[..., 3:4] > 0, rgba[..., :3], np.uint8(255))
    desc = f"wsi-mil heatmap overlay of slide {scores.slide_id}: {score}, {scale.label}"
    path = contained_path(out, f"{scores.slide_id}_overlay.tif")
    return write_overlay_tiff(path, rgb, raster.scale, s.dimensions, s.mpp, desc)


def heatmap_slide(
    source: str | os.PathLike[str],
    slide: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    options: HeatmapOptions | None = None,
    *,
    features: list[str] | None = None,
    fold: int | None = None,
    target_class: str | None = None,
    device: str = "cpu",
    overwrite: bool = False,
    gene_group: str | None = None,
) -> dict[str, Path]:
    """Score one slide (run folder or attention file) and write its heatmaps.

    What ``wsi-mil heatmap`` runs for each ``--slide``. Records the options in
    ``<slide_id>_heatmap.yaml``; a folder already holding this slide's heatmaps made
    with other options is refused unless ``overwrite``.

    Raises:
        OutputExistsError: Heatmaps of this slide with other options exist.
        SlideMismatchError, ConfigError: See :func:`render_heatmap`, :func:`load_scores`.
    """
    from wsi_mil.mil.run import write_config
    from wsi_mil.wsi import open_slide

    opts = (options or HeatmapOptions()).check()
    with open_slide(slide, mpp=opts.mpp) as s:
        slide_id = s.slide_id
    scores, origin = load_scores(
        source,
        slide_id,
        features=features,
        fold=fold,
        target_class=target_class,
        device=device,
        gene_group=gene_group,
    )
    record = {
        "source": str(Path(source).resolve()),
        "slide": str(Path(slide).resolve()),
        "features": [str(Path(f).resolve()) for f in features or []],
        "fold": fold,
        "class": target_class,
        "gene_group": gene_group,
        **{k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(opts).items()},
    }
    config = contained_path(out_dir, f"{scores.slide_id}_heatmap.yaml")
    _refuse_other_options(config, record, overwrite)
    paths = render_heatmap(scores, slide, out_dir, opts, origin=origin)
    write_config(config, record)
    paths["config"] = config
    return paths


def _refuse_other_options(config: Path, record: dict[str, Any], overwrite: bool) -> None:
    import yaml

    if overwrite or not config.is_file():
        return
    try:
        old = yaml.safe_load(config.read_text()) or {}
    except yaml.YAMLError:
        old = {}
    changed = sorted(k for k in record if old.get(k) != record[k])
    if changed:
        raise OutputExistsError(
            f"{config.parent} already holds heatmaps of this slide made with other options "
            f"({', '.join(changed)} differ, see {config.name}); pass --overwrite to replace "
            "them or choose another --out"
        )
