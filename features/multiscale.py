"""Multi-scale bags: join bags of one slide tiled at different µm/px, spatially.

``wsi-mil train --features A --features B`` with ``A`` at 0.5 µm/px and ``B`` at
1.0 µm/px: the finest resolution is the reference (its tiles are the rows of the joined
bag, in its order, with its coordinates), and every fine tile gets the features of the
coarse tile that covers the fine tile's centre appended. When coarse tiles overlap
(stride smaller than the tile), the one whose centre is nearest wins; a fine tile that no
coarse tile covers (the coarse tiler dropped that region, e.g. too little tissue in the
larger tile) takes the *nearest* coarse tile (Euclidean distance between centres; on a
tie, the one first in its bag), so no
fine tile is dropped and attention maps keep every fine tile. The covering tile is found
as the coarse centre nearest in Chebyshev (L∞) distance: a square tile of side ``T``
covers exactly the points within ``T / 2`` of its centre in that distance.

Bags of the same resolution (several encoders) are joined tile by tile with
:func:`wsi_mil.features.bags.join_bags` and must hold the same tiles. Columns follow
the order in which the bags are given, whatever their resolution.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from wsi_mil.features.bags import Bag, BagError, join_bags, joined_attrs

__all__ = ["cover_index", "join_multiscale", "tile_side_level0"]

_MPP_DECIMALS = 6  # resolutions equal to this many decimals are the same scale


def tile_side_level0(bag: Bag, name: str) -> float:
    """Tile side in level-0 px of a bag (its coords' ``patch_size_level0``).

    Raises:
        BagError: The bag does not record it (written by another tool).
    """
    side = bag.attrs.get("coords_attrs", {}).get("patch_size_level0")
    if not side:
        raise BagError(
            f"bag {name} of slide {bag.attrs.get('slide_id')!r} has no patch_size_level0 "
            "on its coords, needed to join bags of different µm/px; re-extract it with "
            "`wsi-mil extract`"
        )
    return float(side)


def cover_index(
    fine_xy: np.ndarray,
    fine_side: float,
    coarse_xy: np.ndarray,
    coarse_side: float,
) -> tuple[np.ndarray, np.ndarray]:
    """For each fine tile, the coarse tile covering its centre (else the nearest one).

    Args:
        fine_xy: (N, 2) level-0 top-left (x, y) of the fine tiles.
        fine_side: Fine tile side in level-0 px.
        coarse_xy: (M, 2) level-0 top-left (x, y) of the coarse tiles, M ≥ 1.
        coarse_side: Coarse tile side in level-0 px.

    Returns:
        (N,) int64 index into ``coarse_xy`` and (N,) bool, True where that coarse tile
        covers the fine tile's centre.
    """
    # centres, nudged so a centre on a tile edge falls in the tile that starts there
    # (tiles are half-open: [x, x + side))
    centres = fine_xy.astype(np.float64) + fine_side / 2.0
    fc = centres + 1e-3
    cc = coarse_xy.astype(np.float64) + coarse_side / 2.0
    if len(fc) == 0:
        return np.zeros(0, np.int64), np.zeros(0, bool)
    from scipy.spatial import cKDTree

    tree = cKDTree(cc)
    _, idx = tree.query(fc, k=1, p=np.inf)
    idx = np.asarray(idx, np.int64)
    d = fc - coarse_xy[idx].astype(np.float64)
    covered = ((d >= 0) & (d < coarse_side)).all(axis=1)
    if not covered.all():
        idx[~covered] = _nearest(centres[~covered], cc)  # un-nudged: exact ties
    return idx, covered


def _nearest(points: np.ndarray, centres: np.ndarray) -> np.ndarray:
    """Index of the nearest centre (Euclidean) per point; ties go to the lowest index.

    Brute force in blocks of points (about 4 M distances at a time), so the result does
    not depend on a tree's tie-breaking.
    """
    rows = max(1, (1 << 22) // max(1, len(centres)))
    out = [
        np.argmin(((points[i : i + rows, None, :] - centres[None]) ** 2).sum(axis=2), axis=1)
        for i in range(0, len(points), rows)
    ]
    return np.concatenate(out).astype(np.int64)


def _mpp_key(bag: Bag, name: str) -> float:
    mpp = bag.attrs.get("target_mpp")
    if mpp is None:
        raise BagError(f"bag {name} has no target_mpp attribute; re-extract it")
    return round(float(mpp), _MPP_DECIMALS)


def join_multiscale(bags: Sequence[Bag], *, names: Sequence[str] | None = None) -> Bag:
    """Join one slide's bags: tile by tile within a resolution, spatially across them.

    Args:
        bags: The slide's bags, one per feature folder (encoders and/or resolutions).
        names: Labels for error messages and the ``encoder`` attribute (default: each
            bag's ``encoder``).

    Returns:
        :class:`Bag` with the finest resolution's coords (N, 2) and features
        (N, sum of D) float32, columns in the order of ``bags``; attrs of the first finest
        bag plus ``encoder``/``encoders``/``dims``/``dim``/``weights_sha256`` as in
        :func:`join_bags`, and, when resolutions differ, ``scales`` (each bag's
        ``target_mpp``) and ``uncovered`` (per bag, fine tiles no tile of it covers,
        which took the nearest one). A single bag is returned as read.

    Raises:
        BagError: Bags of the same resolution with different tiles (naming both), a
            coarse bag with no tiles while the fine one has some, or missing attributes.
    """
    if not bags:
        raise BagError("join_multiscale needs at least one bag")
    names = list(names) if names is not None else [str(b.attrs.get("encoder")) for b in bags]
    if len(bags) == 1:
        return bags[0]
    keys = [_mpp_key(b, n) for b, n in zip(bags, names, strict=True)]
    if len(set(keys)) == 1:
        return join_bags(bags, names=names)
    groups: dict[float, list[int]] = {}
    for i, k in enumerate(keys):
        groups.setdefault(k, []).append(i)
    fine_key = min(groups)
    fine = _join_group(bags, names, groups[fine_key])
    fine_side = tile_side_level0(bags[groups[fine_key][0]], names[groups[fine_key][0]])
    cols: dict[int, np.ndarray] = {}
    uncovered: list[int] = [0] * len(bags)
    for key, members in groups.items():
        grp = fine if key == fine_key else _join_group(bags, names, members)
        if key == fine_key:
            rows = np.arange(len(fine.coords))
        else:
            rows, covered = _coarse_rows(fine, fine_side, grp, bags[members[0]], names[members[0]])
            for i in members:
                uncovered[i] = int((~covered).sum())
        start = 0
        for i in members:
            d = int(bags[i].features.shape[1])
            cols[i] = grp.features[rows, start : start + d].astype(np.float32, copy=False)
            start += d
    parts = [cols[i] for i in range(len(bags))]
    ref = bags[groups[fine_key][0]]
    attrs = joined_attrs(ref, bags, names, parts)
    attrs.update(scales=[float(b.attrs["target_mpp"]) for b in bags], uncovered=uncovered)
    return Bag(np.concatenate(parts, axis=1), fine.coords, attrs)


def _join_group(bags: Sequence[Bag], names: Sequence[str], members: list[int]) -> Bag:
    """Bags of one resolution joined tile by tile (columns in ``members`` order)."""
    if len(members) == 1:
        return bags[members[0]]
    try:
        return join_bags([bags[i] for i in members], names=[names[i] for i in members])
    except BagError as exc:
        mpp = bags[members[0]].attrs.get("target_mpp")
        raise BagError(
            f"{exc} (bags at the same resolution, {mpp} µm/px, are joined tile by tile; "
            "bags at different µm/px would be joined spatially)"
        ) from exc


def _coarse_rows(
    fine: Bag, fine_side: float, coarse: Bag, first: Bag, name: str
) -> tuple[np.ndarray, np.ndarray]:
    if len(coarse.coords) == 0:
        if len(fine.coords) == 0:
            return np.zeros(0, np.int64), np.zeros(0, bool)
        raise BagError(
            f"cannot join bags of slide {fine.attrs.get('slide_id')!r}: {name} "
            f"({first.attrs.get('target_mpp')} µm/px) has no tiles but the finer bag has "
            f"{len(fine.coords)}; re-tile the coarse scale with a lower --min-tissue"
        )
    return cover_index(fine.coords, fine_side, coarse.coords, tile_side_level0(first, name))
