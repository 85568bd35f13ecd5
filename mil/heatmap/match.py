"""Refusing scores drawn over the wrong slide.

Scores carry what they were computed on: the slide id, and (for bags and attention
files written since fingerprints were recorded) the slide file's size and sha256 from
tiling. :func:`check_slide` compares them with the slide given to ``heatmap``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from wsi_mil.errors import ConfigError

__all__ = ["SlideMismatchError", "check_slide"]


class SlideMismatchError(ConfigError):
    """Scores of one slide drawn over another (exit status 2)."""


def check_slide(
    scores: Any,
    slide_id: str,
    slide_path: Path,
    dimensions: tuple[int, int],
    origin: str,
) -> None:
    """Refuse ``scores`` that were not computed on the slide at ``slide_path``.

    Checks, in order: tiles inside the slide's level-0 ``dimensions``; the recorded
    slide dimensions; the recorded file size and sha256 (the sha256 only when the size
    matches); and, when no fingerprint is recorded, the slide id. A slide file renamed
    but with identical bytes is accepted.

    Args:
        scores: :class:`~wsi_mil.mil.heatmap.scores.SlideScores`.
        slide_id: Id of the given slide (its file stem).
        slide_path: The given slide file.
        dimensions: Its level-0 ``(width, height)``.
        origin: Where the scores come from (file or run), for the message.

    Raises:
        SlideMismatchError: Naming both slides and how to fix it.
    """
    theirs = f"{origin} was computed on slide {scores.slide_id!r}"
    ours = f"--slide {slide_path} is slide {slide_id!r}"
    fix = "pass the slide it was computed on (or the scores of this slide)"
    far = scores.coords.max(axis=0)
    width, height = dimensions
    if far[0] >= width or far[1] >= height or scores.coords.min() < 0:
        raise SlideMismatchError(
            f"{theirs}, whose tiles reach ({int(far[0])}, {int(far[1])}), but {ours} of "
            f"{width} x {height} px; {fix}"
        )
    fp = scores.fingerprint
    dims = fp.get("dimensions")
    if dims is not None and tuple(int(v) for v in dims) != (width, height):
        raise SlideMismatchError(
            f"{theirs} of {dims[0]} x {dims[1]} px, but {ours} of {width} x {height} px; {fix}"
        )
    if fp.get("size") is not None and fp.get("sha256"):
        _check_fingerprint(fp, slide_path, theirs, ours, fix)
        return
    if scores.slide_id != slide_id:
        raise SlideMismatchError(f"{theirs}, but {ours}; {fix}")


def _check_fingerprint(fp: dict[str, Any], path: Path, theirs: str, ours: str, fix: str) -> None:
    from wsi_mil.tiling.store import source_fingerprint

    size = path.stat().st_size if path.is_file() else None
    if size is None:  # a folder (DICOM): nothing comparable was fingerprinted
        return
    if int(fp["size"]) == size and source_fingerprint(path)["sha256"] == fp["sha256"]:
        return
    raise SlideMismatchError(
        f"{theirs} (file of {int(fp['size'])} bytes, sha256 {str(fp['sha256'])[:12]}…), but "
        f"{ours} and its bytes differ ({size} bytes); {fix}"
    )
