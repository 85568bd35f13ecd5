"""What ``wsi-mil run`` does between the stages: which slides, their mpp, who is left out.

- :func:`select_slides`: the cohort's slides among the files found (others are ignored,
  not failed; cohort slides without a file are excluded).
- :func:`cohort_mpp`: per-slide resolutions from the cohort's ``mpp`` column.
- :func:`write_training_cohort`: the cohort rows whose slide has a feature bag.
- :class:`Ledger`: one row per slide and stage (``slide_id, stage, status, reason``),
  written as the run's top-level ``manifest.csv``.
"""

from __future__ import annotations

import csv
import io
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from wsi_mil.errors import CohortError, ConfigError

__all__ = [
    "LEDGER_FIELDS",
    "Ledger",
    "SlideSelection",
    "cohort_mpp",
    "read_cohort_rows",
    "select_slides",
    "write_training_cohort",
]

#: Columns of the run's top-level manifest.
LEDGER_FIELDS = ("slide_id", "stage", "status", "reason")


def read_cohort_rows(cohort: str | os.PathLike[str]) -> tuple[list[str], list[dict[str, str]]]:
    """The header and rows (``{column: text}``, with ``_line``) of a cohort CSV.

    Raises:
        CohortError: Unreadable or not UTF-8 (naming the file).
    """
    from wsi_mil.mil.cohort import read_utf8_text

    try:
        text = read_utf8_text(Path(cohort))
    except OSError as exc:
        raise CohortError(f"cannot read cohort table {cohort}: {exc}") from exc
    reader = csv.reader(io.StringIO(text, newline=""))
    header = [h.strip() for h in next(reader, [])]
    rows = []
    for values in reader:
        if not any(v.strip() for v in values):
            continue
        row = {h: (values[i].strip() if i < len(values) else "") for i, h in enumerate(header)}
        rows.append({**row, "_line": str(reader.line_num)})
    return header, rows


@dataclass
class SlideSelection:
    """The slide files of a run.

    Attributes:
        found: Cohort slide id → slide file, in cohort order.
        missing: Cohort slide ids without a file.
        ignored: Files found whose slide id is not in the cohort.
    """

    found: dict[str, Path] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)
    ignored: list[Path] = field(default_factory=list)


def select_slides(slides: str | os.PathLike[str], cohort: str | os.PathLike[str]) -> SlideSelection:
    """Match the cohort's slide ids to the files under ``slides``.

    A cohort row's ``slide_path`` (relative to the cohort's folder), when given, is used
    instead of searching.

    Raises:
        ConfigError: No slide file at all, or none of the cohort's slides found.
    """
    from wsi_mil.workflows.commands.tile import find_slides
    from wsi_mil.wsi.slide import slide_id_from_path

    _, rows = read_cohort_rows(cohort)
    files = {slide_id_from_path(p): p for p in find_slides([slides])}
    selection = SlideSelection()
    for row in rows:
        sid = row.get("slide_id", "")
        if not sid or sid in selection.found or sid in selection.missing:
            continue
        given = row.get("slide_path", "")
        path = (Path(cohort).parent / given).resolve() if given else files.get(sid)
        if path is not None and path.exists():
            selection.found[sid] = path
        else:
            selection.missing.append(sid)
    wanted = {row.get("slide_id", "") for row in rows}
    selection.ignored = sorted(p for s, p in files.items() if s not in wanted)
    if not selection.found:
        raise ConfigError(
            f"none of the {len(wanted)} slides of {cohort} is in {slides} (looked for files "
            "named <slide_id>.<ext>); check the folder and the slide_id column"
        )
    return selection


def cohort_mpp(cohort: str | os.PathLike[str]) -> dict[str, float]:
    """Per-slide level-0 µm/px from the cohort's optional ``mpp`` column (empty cells skip).

    Raises:
        CohortError: A value that is not a resolution (naming ``file:line``).
    """
    from wsi_mil.wsi.mpp import MPP_RANGE

    header, rows = read_cohort_rows(cohort)
    if "mpp" not in header:
        return {}
    lo, hi = MPP_RANGE
    out, problems = {}, []
    for row in rows:
        text = row.get("mpp", "")
        if not text:
            continue
        try:
            value = float(text)
        except ValueError:
            value = float("nan")
        if not lo <= value <= hi:
            problems.append(
                f"{cohort}:{row['_line']}: mpp: {text!r} is not a level-0 resolution within "
                f"{lo:g}-{hi:g} µm/px (e.g. 0.25 for 40x, 0.5 for 20x); fix it or leave it empty"
            )
        else:
            out[row.get("slide_id", "")] = value
    if problems:
        raise CohortError("\n".join(problems))
    return out


def write_training_cohort(
    cohort: str | os.PathLike[str], keep: set[str], path: str | os.PathLike[str]
) -> bool:
    """Write the rows of ``cohort`` whose slide id is in ``keep`` to ``path``.

    Returns:
        True when ``path`` already held other rows (the slides usable for training
        changed since the last run).
    """
    from wsi_mil.mil.cohort import read_utf8_text
    from wsi_mil.outputs import atomic_path

    text = read_utf8_text(Path(cohort))
    reader = csv.reader(io.StringIO(text, newline=""))
    header = next(reader, [])
    col = [h.strip() for h in header].index("slide_id")
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    for values in reader:
        if len(values) > col and values[col].strip() in keep:
            writer.writerow(values)
    path = Path(path)
    old = path.read_text(encoding="utf-8") if path.is_file() else None
    if old != buf.getvalue():
        with atomic_path(path) as tmp:
            tmp.write_text(buf.getvalue(), encoding="utf-8")
    return old is not None and old != buf.getvalue()


class Ledger:
    """Per-slide, per-stage outcomes of a run, for the top-level ``manifest.csv``."""

    def __init__(self) -> None:
        self.rows: list[dict[str, str]] = []
        self.out: dict[str, str] = {}  # slide id -> the first stage that left it out

    def add(self, slide_id: str, stage: str, status: str, reason: str = "") -> None:
        """Record ``slide_id``'s outcome at ``stage``."""
        self.rows.append({"slide_id": slide_id, "stage": stage, "status": status,
                          "reason": " ".join(str(reason).split())})  # fmt: skip

    def exclude(self, slide_id: str, stage: str, reason: str) -> None:
        """Leave ``slide_id`` out from ``stage`` on (its later stages say why)."""
        self.out.setdefault(slide_id, f"{stage}: {' '.join(reason.split())}")

    def carried(self, slide_id: str, stage: str) -> bool:
        """Record ``excluded`` at ``stage`` for a slide left out earlier; True if it was."""
        if slide_id in self.out:
            self.add(slide_id, stage, "excluded", f"left out at {self.out[slide_id]}")
            return True
        return False

    def stage_rows(self, stage: str, rows: list[dict[str, Any]], slide_ids: list[str]) -> None:
        """Record a stage's manifest ``rows`` for ``slide_ids``; failed ones are excluded."""
        by_id = {str(r.get("slide_id")): r for r in rows}
        for sid in slide_ids:
            if self.carried(sid, stage):
                continue
            row = by_id.get(sid)
            if row is None:
                self.add(sid, stage, "failed", "no row in the stage's manifest (interrupted?)")
                self.exclude(sid, stage, "not processed")
                continue
            status = str(row.get("status") or "")
            reason = str(row.get("error") or row.get("message") or "")
            self.add(sid, stage, status, reason)
            if status not in ("ok", "skipped"):
                self.exclude(sid, stage, f"{status}: {reason}")

    def write(self, path: str | os.PathLike[str]) -> Path:
        """Write ``manifest.csv`` (replacing the previous run's)."""
        from wsi_mil.outputs import write_manifest

        return write_manifest(path, self.rows, LEDGER_FIELDS, merge=False)
