"""Annotated regions (QuPath GeoJSON) that restrict or exclude tissue before the grid.

A lab draws regions in QuPath and exports them with *File → Export objects as GeoJSON*
(a ``FeatureCollection``, or a bare list of Features with "Export as FeatureCollection"
unticked). ``wsi-mil tile --include-geojson`` keeps tissue inside the regions only,
``--exclude-geojson`` drops tissue inside them; both may be given.

What is read from a file:

- Features whose ``properties.objectType`` is ``"annotation"`` or absent (plain GeoJSON);
  detections, cells and tiles (e.g. a heatmap's tiles) are ignored and counted.
- ``Polygon`` and ``MultiPolygon`` geometries (also inside a ``GeometryCollection``),
  holes respected (even-odd within each polygon, union across polygons); points and
  lines are ignored. Coordinates are level-0 pixels, as QuPath writes them.
- The class name (``properties.classification.name``, or a plain string) for
  ``--include-class`` / ``--exclude-class`` filtering.

Regions are rasterised onto the tissue-mask grid (``mask_mpp``): a mask pixel belongs to
a region when its centre lies inside, so edges are exact to one mask pixel (8 µm by
default), well below a tile's side.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from wsi_mil.errors import AnnotationError

__all__ = [
    "ANNOTATION_MODES",
    "Annotations",
    "RegionSource",
    "annotation_file",
    "file_sha256",
    "load_annotations",
    "parse_classes",
    "rasterise_polygons",
    "region_sources",
]

#: ``include``: keep tissue inside the regions; ``exclude``: drop tissue inside them.
ANNOTATION_MODES = ("include", "exclude")

#: Object types taken as regions (``None``: plain GeoJSON without QuPath's property).
_REGION_TYPES = (None, "annotation")

#: A polygon: its rings as float64 (k, 2) level-0 (x, y), the outer ring first.
Polygon = list[np.ndarray]


@dataclass(frozen=True)
class Annotations:
    """The regions of one annotation file.

    Attributes:
        path: The file.
        polygons: Kept polygons, each a list of rings float64 (k, 2) level-0 (x, y)
            (outer ring first, then holes).
        classes_found: Number of polygon features per class name in the file, before
            class filtering (``"Unclassified"`` for features without a class).
        n_ignored: Features left out (not annotations, not polygons, other classes).
    """

    path: Path
    polygons: list[Polygon]
    classes_found: dict[str, int] = field(default_factory=dict)
    n_ignored: int = 0

    def classes_text(self) -> str:
        """``"Tumor (3), Stroma (1)"``, or ``"none"``."""
        items = sorted(self.classes_found.items())
        return ", ".join(f"{k} ({v})" for k, v in items) or "none"


@dataclass(frozen=True)
class RegionSource:
    """The annotation file of one slide for one mode.

    Attributes:
        mode: ``"include"`` or ``"exclude"``.
        path: The file (absolute).
        sha256: Hash of the file's bytes (recorded in the store; a change rebuilds it).
        classes: Class names kept, or None for every class.
    """

    mode: str
    path: Path
    sha256: str
    classes: tuple[str, ...] | None

    def record(self) -> dict[str, Any]:
        """What the store's parameters record (the path is left out: moving files is fine)."""
        return {"sha256": self.sha256, "classes": list(self.classes) if self.classes else None}


def parse_classes(value: str | Sequence[str] | None) -> tuple[str, ...] | None:
    """Class names from ``"Tumor,Stroma"`` or a sequence; None or empty → None."""
    if value is None:
        return None
    items = value.split(",") if isinstance(value, str) else list(value)
    names = tuple(dict.fromkeys(s.strip() for s in items if s.strip()))
    return names or None


def file_sha256(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def annotation_file(source: str | os.PathLike[str], slide_path: Path, slide_id: str) -> Path | None:
    """The annotation file of a slide: ``source`` itself, or found in the folder ``source``.

    In a folder, looks for ``<slide_id>.geojson``, ``<file name>.geojson`` (e.g.
    ``A.svs.geojson``) and ``<slide_id>.json``, in this order.

    Returns:
        The file, or None when the folder holds none of them.
    """
    source = Path(source)
    if not source.is_dir():
        return source
    names = (f"{slide_id}.geojson", f"{slide_path.name}.geojson", f"{slide_id}.json")
    return next((source / n for n in names if (source / n).is_file()), None)


def region_sources(
    slide_path: Path,
    slide_id: str,
    *,
    include: str | os.PathLike[str] | None = None,
    exclude: str | os.PathLike[str] | None = None,
    include_class: str | Sequence[str] | None = None,
    exclude_class: str | Sequence[str] | None = None,
) -> list[RegionSource]:
    """The annotation files that apply to one slide, hashed.

    A slide without a file in the ``include`` folder fails (tiling all of it would
    silently ignore the restriction); one without a file in the ``exclude`` folder is
    tiled normally.

    Raises:
        AnnotationError: ``include`` has no file for the slide, or a file is unreadable.
    """
    found = []
    for mode, source, classes in (("include", include, include_class),
                                  ("exclude", exclude, exclude_class)):  # fmt: skip
        if source is None:
            continue
        path = annotation_file(source, slide_path, slide_id)
        if path is None and mode == "include":
            raise AnnotationError(
                f"--include-geojson {source}: no annotation file for slide {slide_id!r} "
                f"(looked for {slide_id}.geojson, {slide_path.name}.geojson, "
                f"{slide_id}.json); export its annotations from QuPath to "
                f"{Path(source) / (slide_id + '.geojson')}, or tile it without --include-geojson"
            )
        if path is None:
            continue
        try:
            digest = file_sha256(path)
        except OSError as exc:
            raise AnnotationError(
                f"{path}: cannot read the --{mode}-geojson file ({exc.strerror or exc})"
            ) from None
        found.append(RegionSource(mode, path.resolve(), digest, parse_classes(classes)))
    return found


# ------------------------------------------------------------------------ parsing


def load_annotations(
    path: str | os.PathLike[str], classes: Sequence[str] | None = None
) -> Annotations:
    """Read the polygon annotations of a GeoJSON file (QuPath export or plain GeoJSON).

    Args:
        path: The ``.geojson`` file.
        classes: Keep only polygons of these class names (None: every polygon).

    Returns:
        The kept polygons (possibly none) and what the file holds.

    Raises:
        AnnotationError: Unreadable file, invalid JSON or GeoJSON; the message names the
            file, the feature and the problem.
    """
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except OSError as exc:
        raise AnnotationError(f"{path}: cannot read it ({exc.strerror or exc})") from None
    except UnicodeDecodeError:
        raise AnnotationError(f"{path}: not UTF-8 text; export GeoJSON from QuPath") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise AnnotationError(
            f"{path}: not valid JSON (line {exc.lineno} column {exc.colno}: {exc.msg}); "
            "export it again with QuPath's File → Export objects as GeoJSON"
        ) from None
    keep = set(classes) if classes else None
    polygons: list[Polygon] = []
    found: dict[str, int] = {}
    ignored = 0
    for i, feature in enumerate(_features(data, path)):
        where = f"{path}: feature {i}"
        props = feature.get("properties") or {}
        if not isinstance(props, dict):
            raise AnnotationError(f"{where}: 'properties' must be an object, got {props!r:.60}")
        kind = props.get("objectType", props.get("object_type"))
        shapes = list(_polygons(feature.get("geometry"), where))
        if kind not in _REGION_TYPES or not shapes:
            ignored += 1
            continue
        name = _class_name(props.get("classification"))
        found[name] = found.get(name, 0) + 1
        if keep is not None and name not in keep:
            ignored += 1
            continue
        polygons += shapes
    return Annotations(path, polygons, found, ignored)


def _features(data: Any, path: Path) -> list[dict[str, Any]]:
    """The features of a FeatureCollection, a list of Features, a Feature or a geometry."""
    features: Any
    if isinstance(data, list):
        features = data
    elif isinstance(data, dict) and data.get("type") == "FeatureCollection":
        features = data.get("features")
        if not isinstance(features, list):
            raise AnnotationError(f"{path}: a FeatureCollection needs a 'features' list")
    elif isinstance(data, dict) and data.get("type") == "Feature":
        features = [data]
    elif isinstance(data, dict) and isinstance(data.get("coordinates"), list):
        features = [{"type": "Feature", "geometry": data}]
    else:
        got = data.get("type", "an object without 'type'") if isinstance(data, dict) else data
        raise AnnotationError(
            f"{path}: expected a GeoJSON FeatureCollection or a list of Features (QuPath: "
            f"File → Export objects as GeoJSON), got {got!r:.60}"
        )
    for i, feature in enumerate(features):
        if not isinstance(feature, dict) or "geometry" not in feature:
            raise AnnotationError(
                f"{path}: feature {i} is not a GeoJSON Feature (an object with 'geometry'), "
                f"got {feature!r:.60}"
            )
    return features


def _class_name(value: Any) -> str:
    """QuPath's class name: ``{"name": ...}`` (0.2+) or a string; ``Unclassified`` if none."""
    if isinstance(value, dict):
        value = value.get("name")
    return str(value) if isinstance(value, str) and value else "Unclassified"


_IGNORED_GEOMETRIES = ("Point", "MultiPoint", "LineString", "MultiLineString")


def _polygons(geometry: Any, where: str) -> Iterator[Polygon]:
    """The polygons of a geometry (none for points and lines)."""
    if geometry is None:
        return
    if not isinstance(geometry, dict):
        raise AnnotationError(f"{where}: 'geometry' must be an object, got {geometry!r:.60}")
    kind = geometry.get("type")
    if kind == "GeometryCollection":
        for part in geometry.get("geometries") or []:
            yield from _polygons(part, where)
        return
    if kind in _IGNORED_GEOMETRIES:
        return
    coords = geometry.get("coordinates")
    if kind == "Polygon":
        yield _polygon(coords, where)
    elif kind == "MultiPolygon":
        if not isinstance(coords, list):
            raise AnnotationError(f"{where}: MultiPolygon coordinates must be a list of polygons")
        for k, part in enumerate(coords):
            yield _polygon(part, f"{where} polygon {k}")
    else:
        raise AnnotationError(
            f"{where}: unknown geometry type {kind!r}; expected Polygon or MultiPolygon"
        )


def _polygon(rings: Any, where: str) -> Polygon:
    """A polygon's rings as float64 (k, 2) arrays, checked."""
    if not isinstance(rings, list) or not rings:
        raise AnnotationError(f"{where}: Polygon coordinates must be a non-empty list of rings")
    out = []
    for r, ring in enumerate(rings):
        try:
            xy = np.asarray(ring, dtype=np.float64)
        except (TypeError, ValueError):
            xy = np.empty((0, 0))
        if xy.ndim != 2 or xy.shape[1] < 2 or not np.isfinite(xy).all():
            raise AnnotationError(
                f"{where}: ring {r} must be a list of [x, y] numbers (level-0 pixels), "
                f"got {ring!r:.60}"
            )
        xy = xy[:, :2]
        if len(np.unique(xy, axis=0)) < 3:
            raise AnnotationError(
                f"{where}: ring {r} has fewer than 3 distinct points; a polygon ring needs 3"
            )
        out.append(xy)
    return out


# -------------------------------------------------------------------- rasterising


def rasterise_polygons(
    polygons: Sequence[Polygon], shape: tuple[int, int], scale: tuple[float, float]
) -> np.ndarray:
    """The union of polygons on a mask grid: pixels whose centre lies inside.

    Within a polygon, inside means an odd number of ring crossings (holes are cut out,
    whatever the rings' orientation); across polygons the union is taken.

    Args:
        polygons: Polygons as lists of rings, float64 (k, 2) level-0 (x, y).
        shape: (h, w) of the mask.
        scale: (sx, sy) level-0 pixels per mask pixel (pixel (r, c) covers level-0
            ``[c·sx, (c+1)·sx) × [r·sy, (r+1)·sy)``).

    Returns:
        bool (h, w).
    """
    h, w = int(shape[0]), int(shape[1])
    out = np.zeros((h, w), np.bool_)
    sx, sy = float(scale[0]), float(scale[1])
    for rings in polygons:
        # pixel units, pixel centres at integers
        pts = [np.column_stack([ring[:, 0] / sx - 0.5, ring[:, 1] / sy - 0.5]) for ring in rings]
        _fill_polygon(out, pts)
    return out


def _fill_polygon(out: np.ndarray, rings: list[np.ndarray]) -> None:
    """OR the even-odd interior of one polygon (rings in pixel units) into ``out``."""
    h, w = out.shape
    a = np.concatenate(rings)
    b = np.concatenate([np.roll(r, -1, axis=0) for r in rings])  # closes every ring
    moving = a[:, 1] != b[:, 1]
    a, b = a[moving], b[moving]
    if not len(a):
        return
    lo, hi = np.minimum(a[:, 1], b[:, 1]), np.maximum(a[:, 1], b[:, 1])
    r0 = np.clip(np.ceil(lo), 0, h).astype(np.int64)  # rows with lo <= r < hi
    r1 = np.clip(np.ceil(hi), 0, h).astype(np.int64)
    counts = r1 - r0
    if counts.sum() == 0:
        return
    top, bottom = int(r0.min()), int(r1.max())
    c_lo = max(0, min(w, math.ceil(float(a[:, 0].min()))))
    c_hi = max(0, min(w, math.ceil(float(a[:, 0].max()))))
    edge = np.repeat(np.arange(len(a)), counts)
    first = np.cumsum(counts) - counts
    rows = r0[edge] + (np.arange(len(edge)) - first[edge])
    ax, ay, bx, by = a[edge, 0], a[edge, 1], b[edge, 0], b[edge, 1]
    x = ax + (rows - ay) * (bx - ax) / (by - ay)
    cols = np.clip(np.ceil(x), c_lo, c_hi).astype(np.int64) - c_lo  # centres at c >= x flip
    width = c_hi - c_lo + 1
    flat = (rows - top) * width + cols
    values, n = np.unique(flat, return_counts=True)
    toggles = np.zeros((bottom - top, width), np.uint8)
    toggles.flat[values[n % 2 == 1]] = 1
    inside = np.bitwise_xor.accumulate(toggles, axis=1)[:, : c_hi - c_lo].astype(np.bool_)
    out[top:bottom, c_lo:c_hi] |= inside
