"""HDF5 feature bags: one file per slide and encoder (``features/<encoder>/<slide_id>.h5``).

Layout (see ``DESIGN.md``):

* ``features`` — float16 (default) or float32, shape (N, D), chunked by many rows.
* ``coords`` — int64, shape (N, 2), level-0 top-left (x, y) of each tile, same order as
  ``features``. Its attributes follow CLAM (``patch_size``, ``patch_level``) and TRIDENT
  (``patch_size_level0``, ``level0_magnification``, ``target_magnification``), checked
  against how those tools read them:

  - CLAM reads a tile as ``read_region(coord, patch_level, (patch_size, patch_size))``,
    so ``patch_size`` is the tile side *at* ``patch_level``. Tiles here are read at a
    physical resolution, not at a pyramid level, so ``patch_level`` is 0 and
    ``patch_size`` is the tile side in level-0 pixels (``tile_level0``); CLAM then sees
    exactly the tissue that was embedded (and resizes it to its model's input).
  - TRIDENT's consumers of feature files (slide encoders such as TITAN and
    Prov-GigaPath, heatmaps) read only ``patch_size_level0``: the same level-0 side.
    Magnifications use TRIDENT's convention 10 µm / mpp (0.25 µm/px ≈ 40x), as integers.
  - The two tools disagree on ``patch_size``: TRIDENT's own *coordinate* files store it
    at the target magnification and its re-patching readers compute
    ``patch_size × level0_magnification / target_magnification``. A bag therefore
    serves CLAM and TRIDENT's feature consumers exactly, but must not be handed to
    TRIDENT as a coordinate file for re-extraction (it would read tiles too large by
    that ratio); the tile side at the target resolution is the file attribute
    ``tile_px``.
* ``features_augmented`` (optional, ``extract --augment K``) — same dtype, shape
  (K, N, D): the features of K stain-jittered views of every tile, rows in the order of
  ``features``; the file attribute ``augment`` records the method and each view's draws.
  Only training reads it (:func:`read_bag_views`); :func:`read_bag` ignores it.
* File attributes: ``format`` (``"wsi-mil.bag/1"``), ``encoder``, ``dim``,
  ``weights_sha256``, ``target_mpp``, ``tile_px``, ``slide_id``, ``wsi_mil_version`` and
  any extra attributes the writer passes (e.g. the tile-store fingerprint).

Bags are written under a temporary name and renamed when complete.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import h5py
import numpy as np

from wsi_mil.errors import WsiMilError
from wsi_mil.outputs import atomic_path, contained_path

__all__ = [
    "BAG_FORMAT",
    "REQUIRED_ATTRS",
    "Bag",
    "BagError",
    "NonFiniteFeaturesError",
    "bag_info",
    "bag_path",
    "join_bags",
    "joined_attrs",
    "read_bag",
    "read_bag_views",
    "read_slide_bags",
    "verify_bag",
    "write_bag",
]

BAG_FORMAT = "wsi-mil.bag/1"
#: Optional dataset of jittered views (K, N, D) written by ``extract --augment K``.
VIEWS = "features_augmented"
#: Attributes the caller must supply to :func:`write_bag` (``dim`` and ``format`` are set).
REQUIRED_ATTRS = ("encoder", "weights_sha256", "target_mpp", "tile_px", "slide_id")
_JSON_KEYS_ATTR = "json_attrs"
_CHUNK_BYTES = 1 << 20  # aim for ~1 MiB feature chunks (thousands of rows)
_VERIFY_ROWS = 1 << 14  # rows read at a time by verify_bag


class BagError(WsiMilError, ValueError):
    """A feature bag is missing, malformed, or bags cannot be joined."""


class NonFiniteFeaturesError(WsiMilError, ValueError):
    """A feature row contains NaN or inf; the slide's bag is refused."""


class Bag(NamedTuple):
    """A slide's features as loaded from one (or several joined) bag files.

    Attributes:
        features: (N, D) float array, one row per tile.
        coords: (N, 2) int64 level-0 (x, y) of each tile, same order as ``features``.
        attrs: File attributes (``encoder``, ``dim``, ``slide_id``, ...).
    """

    features: np.ndarray
    coords: np.ndarray
    attrs: dict[str, Any]


def bag_path(out_dir: str | os.PathLike[str], encoder: str, slide_id: str) -> Path:
    """Return the conventional bag path ``<out_dir>/<encoder>/<slide_id>.h5``.

    Encoder names such as ``timm:vit_small_patch16_224`` have ``:`` and ``/``
    replaced by ``_`` so the folder name is portable.

    Raises:
        UnsafePathError: The encoder or slide id would place the bag outside ``out_dir``.
    """
    safe = encoder.replace(":", "_").replace("/", "_")
    return contained_path(out_dir, safe, f"{slide_id}.h5")


def write_bag(
    path: str | os.PathLike[str],
    features: Any,
    coords: Any,
    *,
    attrs: Mapping[str, Any],
    dtype: str | np.dtype = "float16",
    chunk_rows: int | None = None,
    augmented: Any = None,
) -> Path:
    """Write one slide's bag atomically.

    Args:
        path: Final ``.h5`` path; written under a temporary sibling name and renamed.
        features: (N, D) array-like (numpy or torch) of tile embeddings.
        coords: (N, 2) array-like of level-0 (x, y) tile positions.
        attrs: File attributes; must contain :data:`REQUIRED_ATTRS`. Optional keys used
            for the coords attributes: ``tile_level0`` (tile side in level-0 px) and
            ``mpp`` (level-0 µm/px). Values that are not str/int/float/bool are stored
            as JSON and decoded by :func:`read_bag`; ``None`` values are dropped.
        dtype: ``float16`` (default) or ``float32``.
        chunk_rows: Rows per HDF5 chunk (default: about 1 MiB per chunk).
        augmented: Optional (K, N, D) features of K augmented views of the same tiles,
            stored as ``features_augmented`` in ``dtype``.

    Returns:
        The final path.

    Raises:
        BagError: Shapes, dtype or attributes are invalid.
        NonFiniteFeaturesError: A row has NaN/inf (also after the cast to ``dtype``).
    """
    path = Path(path)
    slide = str(attrs.get("slide_id", path.stem))
    feats = _as_numpy(features)
    xy = _as_numpy(coords)
    _check_inputs(feats, xy, attrs, path, slide)
    dtype = np.dtype(dtype)
    if dtype not in (np.dtype("float16"), np.dtype("float32")):
        raise BagError(f"bag dtype must be float16 or float32, got {dtype} (writing {path})")
    _check_finite(feats, slide, path, "")
    with np.errstate(over="ignore"):
        stored = feats.astype(dtype, copy=False)
    if dtype != feats.dtype:
        _check_finite(stored, slide, path, f" after conversion to {dtype}; write float32")
    file_attrs = _file_attrs(attrs, stored.shape[1])
    views = _views(augmented, stored, dtype, slide, path)
    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as h5:
            _write_datasets(h5, stored, xy.astype(np.int64, copy=False), chunk_rows)
            if views is not None:
                chunks = (1, *h5["features"].chunks) if h5["features"].chunks else None
                h5.create_dataset(VIEWS, data=views, chunks=chunks)
            _write_coords_attrs(h5["coords"], attrs)
            _set_attrs(h5, file_attrs)
    return path


def _views(
    augmented: Any, stored: np.ndarray, dtype: np.dtype, slide: str, path: Path
) -> np.ndarray | None:
    """Checked (K, N, D) views in ``dtype``, or ``None``."""
    if augmented is None:
        return None
    views = _as_numpy(augmented)
    if views.ndim != 3 or views.shape[1:] != stored.shape or views.shape[0] < 1:
        raise BagError(
            f"augmented features for slide {slide!r} must be (K, {stored.shape[0]}, "
            f"{stored.shape[1]}), got shape {views.shape}"
        )
    flat = views.reshape(-1, views.shape[2])
    _check_finite(flat, slide, path, " (augmented views)")
    with np.errstate(over="ignore"):
        out = views.astype(dtype, copy=False)
    if dtype != views.dtype:
        _check_finite(out.reshape(-1, views.shape[2]), slide, path,
                      f" (augmented views) after conversion to {dtype}; write float32")  # fmt: skip
    return out


def _as_numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):  # torch tensor, without importing torch here
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def _check_inputs(
    feats: np.ndarray, xy: np.ndarray, attrs: Mapping[str, Any], path: Path, slide: str
) -> None:
    if feats.ndim != 2:
        raise BagError(f"features for slide {slide!r} must be (N, D), got shape {feats.shape}")
    if not np.issubdtype(feats.dtype, np.floating):
        raise BagError(f"features for slide {slide!r} must be floating point, got {feats.dtype}")
    if xy.ndim != 2 or xy.shape[1] != 2 or xy.shape[0] != feats.shape[0]:
        raise BagError(
            f"coords for slide {slide!r} must be ({feats.shape[0]}, 2) to match features, "
            f"got shape {xy.shape}"
        )
    if xy.size and not np.issubdtype(xy.dtype, np.integer):
        if not np.array_equal(xy, np.round(xy)):
            raise BagError(f"coords for slide {slide!r} must be integer level-0 pixels")
    missing = [k for k in REQUIRED_ATTRS if attrs.get(k) is None]
    if missing:
        raise BagError(f"bag attrs for {path} lack {missing}; pass them in attrs=")


def _check_finite(arr: np.ndarray, slide: str, path: Path, hint: str) -> None:
    finite = np.isfinite(arr).all(axis=1)
    if not finite.all():
        bad = np.flatnonzero(~finite)
        raise NonFiniteFeaturesError(
            f"slide {slide!r}: {bad.size} feature row(s) contain NaN or inf{hint} "
            f"(tile rows {bad[:5].tolist()}{'...' if bad.size > 5 else ''}); "
            f"bag {path} not written"
        )


def _file_attrs(attrs: Mapping[str, Any], dim: int) -> dict[str, Any]:
    from wsi_mil import __version__

    out = {k: v for k, v in attrs.items() if v is not None}
    out.update(format=BAG_FORMAT, dim=int(dim), wsi_mil_version=__version__)
    out["target_mpp"] = float(out["target_mpp"])
    out["tile_px"] = int(out["tile_px"])
    return out


def _write_datasets(
    h5: h5py.File, feats: np.ndarray, xy: np.ndarray, chunk_rows: int | None
) -> None:
    n, d = feats.shape
    if n == 0:
        h5.create_dataset("features", data=feats)
        h5.create_dataset("coords", data=xy)
        return
    if chunk_rows is None:
        chunk_rows = max(256, _CHUNK_BYTES // max(1, d * feats.dtype.itemsize))
    rows = int(min(n, max(1, chunk_rows)))
    h5.create_dataset("features", data=feats, chunks=(rows, d))
    h5.create_dataset("coords", data=xy, chunks=(min(n, max(rows, 4096)), 2))


def _write_coords_attrs(dset: h5py.Dataset, attrs: Mapping[str, Any]) -> None:
    tile_px = int(attrs["tile_px"])
    target_mpp = float(attrs["target_mpp"])
    mpp = attrs.get("mpp")
    tile_level0 = attrs.get("tile_level0")
    if tile_level0 is None:
        tile_level0 = round(tile_px * target_mpp / float(mpp)) if mpp else tile_px
    dset.attrs["patch_size"] = int(tile_level0)
    dset.attrs["patch_level"] = 0
    dset.attrs["patch_size_level0"] = int(tile_level0)
    dset.attrs["target_magnification"] = _magnification(target_mpp)
    if mpp:
        dset.attrs["level0_magnification"] = _magnification(float(mpp))


def _magnification(mpp: float) -> int:
    return round(10.0 / mpp)


def _set_attrs(obj: h5py.File, attrs: Mapping[str, Any]) -> None:
    json_keys = []
    for key, value in attrs.items():
        if isinstance(value, np.generic):
            value = value.item()
        if isinstance(value, str | bool | int | float):
            obj.attrs[key] = value
        else:
            obj.attrs[key] = json.dumps(value, default=str)
            json_keys.append(key)
    if json_keys:
        obj.attrs[_JSON_KEYS_ATTR] = json.dumps(json_keys)


def _get_attrs(obj: h5py.File) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in obj.attrs.items():
        if isinstance(value, bytes):
            value = value.decode()
        elif isinstance(value, np.generic):
            value = value.item()
        out[key] = value
    for key in json.loads(out.pop(_JSON_KEYS_ATTR, "[]")):
        if key in out:
            out[key] = json.loads(out[key])
    return out


def _open(path: str | os.PathLike[str]) -> h5py.File:
    path = Path(path)
    if not path.is_file():
        raise BagError(f"feature bag {path} does not exist; run `wsi-mil extract` first")
    try:
        h5 = h5py.File(path, "r")
    except OSError as exc:
        raise BagError(f"{path} is not a readable HDF5 feature bag ({exc}); re-extract it") from exc
    if h5.attrs.get("format") != BAG_FORMAT or "features" not in h5 or "coords" not in h5:
        h5.close()
        raise BagError(
            f"{path} is not a wsi-mil feature bag (format {BAG_FORMAT!r} with "
            "'features' and 'coords'); re-extract it with `wsi-mil extract`"
        )
    return h5


def read_bag(path: str | os.PathLike[str], *, dtype: str | np.dtype | None = None) -> Bag:
    """Load a bag written by :func:`write_bag`.

    Args:
        path: The ``.h5`` file.
        dtype: Cast features to this dtype (default: as stored).

    Returns:
        :class:`Bag` with features (N, D), coords (N, 2) int64 and the file attributes
        (plus ``coords_attrs``: the CLAM/TRIDENT attributes of ``coords``).

    Raises:
        BagError: Missing file, not HDF5, not a wsi-mil bag, or features holding NaN or
            inf (names the bag and the number of bad rows).
    """
    with _open(path) as h5:
        feats = h5["features"][()]
        coords = h5["coords"][()].astype(np.int64, copy=False)
        attrs = _get_attrs(h5)
        attrs["coords_attrs"] = _get_attrs(h5["coords"])
    _check_loaded_finite(feats, Path(path))
    if dtype is not None:
        feats = feats.astype(dtype, copy=False)
    return Bag(feats, coords, attrs)


def read_bag_views(
    path: str | os.PathLike[str], *, dtype: str | np.dtype | None = None
) -> np.ndarray | None:
    """The augmented views of a bag, (K, N, D), or ``None`` when it has none.

    Raises:
        BagError: Missing or malformed bag, views whose shape does not match
            ``features`` or that hold NaN or inf.
    """
    with _open(path) as h5:
        if VIEWS not in h5:
            return None
        views = h5[VIEWS][()]
        n, d = h5["features"].shape
    if views.ndim != 3 or views.shape[1:] != (n, d):
        raise BagError(
            f"{path}: {VIEWS} has shape {views.shape}, expected (K, {n}, {d}); re-extract it"
        )
    _check_loaded_finite(views.reshape(-1, d), Path(path))
    return views if dtype is None else views.astype(dtype, copy=False)


def _check_loaded_finite(feats: np.ndarray, path: Path) -> None:
    """Refuse a bag on disk whose features hold NaN or inf (written by another tool)."""
    if feats.ndim != 2 or not np.issubdtype(feats.dtype, np.floating):
        raise BagError(
            f"{path}: features must be a 2-D floating-point array, got {feats.dtype} "
            f"{feats.shape}; re-extract it with `wsi-mil extract`"
        )
    bad = int(np.count_nonzero(~np.isfinite(feats).all(axis=1)))
    if bad:
        raise BagError(
            f"{path}: {bad} of {len(feats)} feature row(s) contain NaN or inf; "
            "re-extract this bag with `wsi-mil extract --overwrite`"
        )


def bag_info(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A bag's attributes plus ``n_tiles``, ``dim``, ``dtype`` and ``n_views`` (augmented
    views, 0 when none), without reading the features.

    Raises:
        BagError: Missing file, not HDF5, or not a wsi-mil bag.
    """
    with _open(path) as h5:
        info = _get_attrs(h5)
        n, d = h5["features"].shape
        info.update(n_tiles=int(n), dim=int(d), dtype=str(h5["features"].dtype))
        info["n_views"] = int(h5[VIEWS].shape[0]) if VIEWS in h5 else 0
    info["path"] = str(path)
    return info


def verify_bag(path: str | os.PathLike[str]) -> list[str]:
    """Check one bag without loading it whole: readable, consistent, finite.

    Reads the features in blocks of rows, so a bag of any size needs little memory.

    Args:
        path: The ``.h5`` file.

    Returns:
        One short text per problem (unreadable file or block of rows, a missing
        attribute, ``dim`` or ``coords`` that do not match ``features`` (N, D), rows
        holding NaN or inf); an empty list when the bag is sound.
    """
    try:
        with _open(path) as h5:
            return _bag_problems(h5)
    except BagError as exc:
        return [str(exc)]
    except (OSError, ValueError, KeyError) as exc:
        return [f"unreadable ({type(exc).__name__}: {exc}); re-extract it with `wsi-mil extract`"]


def _bag_problems(h5: h5py.File) -> list[str]:
    """Problems of an open bag (see :func:`verify_bag`)."""
    feats, coords = h5["features"], h5["coords"]
    attrs = _get_attrs(h5)
    if feats.ndim != 2 or feats.dtype.kind != "f":
        return [f"features must be a 2-D float array, got {feats.dtype} {feats.shape}"]
    n, d = feats.shape
    found = [f"attribute {k!r} is missing" for k in REQUIRED_ATTRS if attrs.get(k) is None]
    if attrs.get("dim") != d:
        found.append(f"attribute dim is {attrs.get('dim')!r}, features have {d} columns")
    if coords.shape != (n, 2):
        found.append(f"coords have shape {coords.shape}, features {n} rows")
    bad: list[int] = []
    for start in range(0, n, _VERIFY_ROWS):
        stop = min(n, start + _VERIFY_ROWS)
        try:
            block = feats[start:stop]
        except (OSError, ValueError) as exc:
            found.append(f"feature rows {start}:{stop} unreadable ({exc})")
            continue
        bad += (start + np.flatnonzero(~np.isfinite(block).all(axis=1))).tolist()
    if bad:
        more = "..." if len(bad) > 5 else ""
        found.append(f"{len(bad)} of {n} feature rows contain NaN or inf (rows {bad[:5]}{more})")
    try:
        coords[()]
    except (OSError, ValueError) as exc:
        found.append(f"coords unreadable ({exc})")
    if VIEWS in h5:
        found += _views_problems(h5[VIEWS], n, d)
    return found


def _views_problems(views: h5py.Dataset, n: int, d: int) -> list[str]:
    """Problems of the augmented views (K, N, D) of an open bag."""
    if views.ndim != 3 or views.shape[1:] != (n, d):
        return [f"{VIEWS} has shape {views.shape}, expected (K, {n}, {d})"]
    for k in range(views.shape[0]):
        for start in range(0, n, _VERIFY_ROWS):
            try:
                block = views[k, start : start + _VERIFY_ROWS]
            except (OSError, ValueError) as exc:
                return [f"{VIEWS} view {k} unreadable ({exc})"]
            if not np.isfinite(block).all():
                return [f"{VIEWS} view {k} contains NaN or inf"]
    return []


def join_bags(bags: Sequence[Bag], *, names: Sequence[str] | None = None) -> Bag:
    """Concatenate the features of several encoders' bags for the same tiles.

    Rows are aligned on coordinates: every bag must hold exactly the same set of tile
    coordinates (any order); the result follows the first bag's order.

    Args:
        bags: Bags of one slide from different encoders.
        names: Labels for error messages (default: each bag's ``encoder`` attribute).

    Returns:
        :class:`Bag` with features (N, sum of D) as float32, the first bag's coords, and
        attrs with ``encoder`` = names joined by ``+``, ``encoders``, ``dims`` and ``dim``.

    Raises:
        BagError: No bags, or tile coordinates that differ between bags.
    """
    if not bags:
        raise BagError("join_bags needs at least one bag")
    names = list(names) if names is not None else [str(b.attrs.get("encoder")) for b in bags]
    ref = bags[0]
    parts = [ref.features.astype(np.float32, copy=False)]
    for bag, name in zip(bags[1:], names[1:], strict=True):
        order = _align(ref.coords, bag.coords, names[0], name, ref.attrs.get("slide_id"))
        parts.append(bag.features[order].astype(np.float32, copy=False))
    return Bag(np.concatenate(parts, axis=1), ref.coords, joined_attrs(ref, bags, names, parts))


def joined_attrs(
    ref: Bag, bags: Sequence[Bag], names: Sequence[str], parts: Sequence[np.ndarray]
) -> dict[str, Any]:
    """Attributes of a joined bag: ``ref``'s, with the encoders, per-part dims
    (``parts``: (N, D_i) each) and weight hashes of ``bags``."""
    dims = [int(p.shape[1]) for p in parts]
    return {
        **ref.attrs,
        "encoder": "+".join(names),
        "encoders": list(names),
        "dims": dims,
        "dim": sum(dims),
        "weights_sha256": [b.attrs.get("weights_sha256") for b in bags],
    }


def _align(ref: np.ndarray, other: np.ndarray, ref_name: str, name: str, slide: Any) -> np.ndarray:
    """Indices into ``other`` that put its rows in ``ref``'s coordinate order."""
    if ref.shape == other.shape and np.array_equal(ref, other):
        return np.arange(len(ref))
    msg = f"cannot join bags of slide {slide!r}: {ref_name} has {len(ref)} tiles, {name} has"
    if len(ref) != len(other):
        raise BagError(f"{msg} {len(other)}; extract both from the same tile store")
    ref_keys = _coord_keys(ref)
    other_keys = _coord_keys(other)
    o_sort = np.argsort(other_keys, kind="stable")
    pos = np.searchsorted(other_keys[o_sort], ref_keys)
    pos = np.clip(pos, 0, len(ref) - 1)
    found = other_keys[o_sort][pos] == ref_keys
    if not found.all() or len(np.unique(other_keys)) != len(other_keys):
        n_bad = int((~found).sum())
        raise BagError(
            f"{msg} different tile coordinates ({n_bad} of {len(ref)} tiles of {ref_name} "
            f"not in {name}); extract both from the same tile store"
        )
    return o_sort[pos]


def _coord_keys(xy: np.ndarray) -> np.ndarray:
    xy = xy.astype(np.int64)
    return (xy[:, 0] << 32) ^ (xy[:, 1] & 0xFFFFFFFF)


def read_slide_bags(
    features_dir: str | os.PathLike[str],
    slide_id: str,
    encoders: str | Sequence[str],
    *,
    dtype: str | np.dtype | None = None,
) -> Bag:
    """Load a slide's bag for one encoder, or join several (multi-extractor fusion).

    Args:
        features_dir: The folder given to ``wsi-mil extract --out``.
        slide_id: Slide identifier (the file stem).
        encoders: One encoder name or a list; bags are read from
            ``<features_dir>/<encoder>/<slide_id>.h5``.
        dtype: Cast features (single encoder); joined bags are always float32.

    Returns:
        :class:`Bag`; features (N, sum of dims) when several encoders are given.
    """
    if isinstance(encoders, str):
        return read_bag(bag_path(features_dir, encoders, slide_id), dtype=dtype)
    bags = [read_bag(bag_path(features_dir, e, slide_id)) for e in encoders]
    return join_bags(bags, names=list(encoders))
