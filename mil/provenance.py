"""What a run's bags were extracted with, and the check that new bags match it.

A model only means something on bags made like its training bags: the same encoder and
weights, at the same physical resolution (``target_mpp``) and tile size (``tile_px``).
Every bag stores these attributes (:mod:`wsi_mil.features.bags`); training records them
per feature folder in each ``fold.json`` under ``bags`` (:func:`summarise_provenance`),
and ``predict`` / ``validate`` compare the new bags with them (:func:`check_provenance`).
Runs saved before ``bags`` was recorded fall back to the training bags named by
``config.yaml`` when they can still be read (:func:`run_provenance`).
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from wsi_mil.errors import BagMismatchError
from wsi_mil.features.bags import BagError, bag_info
from wsi_mil.mil.data import BagScan

__all__ = ["PROVENANCE_KEYS", "check_provenance", "run_provenance", "summarise_provenance"]

log = logging.getLogger(__name__)

#: Bag attributes that must match the run's (in this order in messages).
PROVENANCE_KEYS = ("encoder", "weights_sha256", "target_mpp", "tile_px")
_OVERRIDE = "--allow-mismatch"


def _plain(value: Any) -> Any:
    """A JSON-friendly attribute value (numpy scalars and arrays to Python)."""
    if hasattr(value, "tolist"):
        return value.tolist()
    return value


def summarise_provenance(scan: BagScan, folders: Sequence[str]) -> list[dict[str, Any]]:
    """Per feature folder, the most common value of each key among the scanned bags.

    Args:
        scan: :func:`~wsi_mil.mil.data.scan_bags` of the training slides.
        folders: Name of each feature folder (recorded beside the values).

    Returns:
        One ``{"folder", "encoder", "weights_sha256", "target_mpp", "tile_px"}`` per
        folder (values None where the bags do not say).
    """
    out = []
    for name, attrs in zip(folders, scan.attrs, strict=False):
        entry: dict[str, Any] = {"folder": name}
        for key in PROVENANCE_KEYS:
            values = [_plain(a.get(key)) for a in attrs.values()]
            counts = Counter(repr(v) for v in values)
            entry[key] = max(values, key=lambda v: counts[repr(v)]) if values else None
        out.append(entry)
    return out


def run_provenance(
    config: dict[str, Any], fold_meta: dict[str, Any]
) -> list[dict[str, Any]] | None:
    """What a run's bags were extracted with.

    Args:
        config: The run's ``config.yaml``.
        fold_meta: A fold's ``fold.json``.

    Returns:
        ``fold_meta["bags"]`` when recorded; else the attributes of the first bag in each
        training feature folder of ``config["features"]`` (older runs); None when
        neither can be read (the check is then skipped with a warning).
    """
    if fold_meta.get("bags"):
        return list(fold_meta["bags"])
    out = []
    for folder in map(Path, config.get("features") or []):
        first = next(iter(sorted(folder.glob("*.h5"))), None)
        if first is None:
            log.warning(
                "the run does not record what its bags were extracted with and %s holds no "
                "bag: encoder / resolution of new bags not checked",
                folder,
            )
            return None
        try:
            info = bag_info(first)
        except BagError as exc:
            log.warning("cannot read training bag %s (%s): bags not checked", first, exc)
            return None
        out.append({"folder": folder.name, **{k: _plain(info.get(k)) for k in PROVENANCE_KEYS}})
    return out or None


def _differs(key: str, expected: Any, found: Any) -> bool:
    if expected is None or found is None:
        return False  # an older bag that does not say: nothing to compare
    if key == "target_mpp":
        return not math.isclose(float(expected), float(found), rel_tol=1e-3)
    if key == "tile_px":
        return int(expected) != int(found)
    return str(_plain(expected)) != str(_plain(found))


def check_provenance(
    expected: Sequence[dict[str, Any]] | None,
    scan: BagScan,
    *,
    allow_mismatch: bool = False,
) -> list[str]:
    """Compare new bags with the run's.

    Args:
        expected: :func:`run_provenance` (None: nothing to compare, returns []).
        scan: :func:`~wsi_mil.mil.data.scan_bags` of the new bags.
        allow_mismatch: Warn instead of refusing.

    Returns:
        One line per differing bag and attribute (empty when every bag matches).

    Raises:
        BagMismatchError: A bag differs and not ``allow_mismatch``; the message names the
            bag, the attribute, both values and the override flag.
    """
    if not expected:
        return []
    problems = []
    for ref, attrs in zip(expected, scan.attrs, strict=False):
        for slide, found in attrs.items():
            for key in PROVENANCE_KEYS:
                if _differs(key, ref.get(key), found.get(key)):
                    problems.append(
                        f"bag {found.get('path') or slide}: {key} {_plain(found.get(key))!r} "
                        f"differs from the run's {ref.get(key)!r}"
                    )
    if not problems:
        return []
    more = f" (and {len(problems) - 1} more difference(s))" if len(problems) > 1 else ""
    message = (
        f"{problems[0]}{more}: the model was trained on bags extracted otherwise, so its "
        f"predictions here are not comparable; re-extract the slides as the run's bags "
        f"were, or pass {_OVERRIDE} to predict anyway"
    )
    if not allow_mismatch:
        raise BagMismatchError(message)
    log.warning(
        "%s bag attribute(s) differ from the run's (%s): %s", len(problems), _OVERRIDE, problems[0]
    )
    return problems
