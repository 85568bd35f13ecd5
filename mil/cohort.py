"""Cohort tables: validated before any compute, every problem reported at once.

A cohort CSV (see ``DESIGN.md``) has one row per slide: ``patient_id`` (CLAM's
``case_id`` is accepted), ``slide_id``, optional ``slide_path``, then the targets:
``label`` for classification or ``time`` + ``event`` for survival (event 1 = death or
progression, 0 = censored). Slides group into patients by ``patient_id`` whatever the
row order. Extra columns can be named as clinical covariates; an optional omics table
(CSV/TSV keyed by ``patient_id``) adds gene or pathway-score columns, optionally grouped
by a JSON file ``{group: [column, ...]}``.

Slide and patient ids become file names (bags, attention files), so each must be a
plain name: no path separator, not ``.``/``..``, no drive letter, no control character.
The table must be UTF-8 (a BOM is fine); UTF-16 and Windows-1252 files are refused with
the fix. Problems are collected and raised together as one
:class:`~wsi_mil.errors.CohortError` whose lines read ``file:line: column: message``.
"""

from __future__ import annotations

import codecs
import csv
import io
import json
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from wsi_mil.errors import CohortError, WsiMilError
from wsi_mil.outputs import id_problem

__all__ = [
    "TASKS",
    "Cohort",
    "Omics",
    "Patient",
    "Slide",
    "load_cohort",
    "load_omics",
    "read_utf8_text",
]

TASKS = ("classification", "survival")
_PATIENT_COLUMNS = ("patient_id", "case_id")
_MAX_ERRORS_SHOWN = 50
_LOCATION = re.compile(r"^(.*?):(\d+): ")


@dataclass(frozen=True)
class Slide:
    """One row of the cohort table.

    Attributes:
        slide_id: Slide identifier (the bag file stem).
        patient_id: Patient the slide belongs to.
        line: 1-based line of the row in the CSV (for messages).
    """

    slide_id: str
    patient_id: str
    line: int


@dataclass
class Patient:
    """A patient: its slides and targets (``None`` when unlabelled).

    Attributes:
        patient_id: Identifier.
        slide_ids: The patient's slides in table order.
        label: Class name (classification).
        time: Follow-up time (survival), >= 0.
        event: 1 = event observed, 0 = censored (survival).
        clinical: Raw clinical covariate values by column (strings, '' = missing).
    """

    patient_id: str
    slide_ids: list[str] = field(default_factory=list)
    label: str | None = None
    time: float | None = None
    event: int | None = None
    clinical: dict[str, str] = field(default_factory=dict)


@dataclass
class Cohort:
    """A validated cohort.

    Attributes:
        path: The CSV file.
        task: ``classification`` or ``survival``.
        patients: Patients by id, in order of first appearance.
        slides: Slides by id.
        classes: Sorted class names (classification), else empty.
        clinical_columns: Clinical covariate columns named by the user.
        omics: Optional (patients with omics, genes) table; see :func:`load_omics`.
    """

    path: Path
    task: str
    patients: dict[str, Patient]
    slides: dict[str, Slide]
    classes: tuple[str, ...] = ()
    clinical_columns: tuple[str, ...] = ()
    omics: Omics | None = None

    @property
    def patient_ids(self) -> list[str]:
        """Patient ids in table order."""
        return list(self.patients)

    @property
    def labelled(self) -> bool:
        """True when every patient has its targets."""
        if self.task == "classification":
            return all(p.label is not None for p in self.patients.values())
        return all(p.time is not None and p.event is not None for p in self.patients.values())


@dataclass
class Omics:
    """A numeric omics table keyed by patient.

    Attributes:
        path: Source file.
        columns: Gene / pathway column names, shape (G,).
        values: (P, G) float64 with NaN for missing values.
        patient_index: Row of each patient id in ``values``.
        groups: Column indices per gene group (each a list into ``columns``).
        group_names: One name per group.
    """

    path: Path
    columns: list[str]
    values: np.ndarray
    patient_index: dict[str, int]
    groups: list[list[int]]
    group_names: list[str]


class _Errors:
    """Collects ``file:line: column: message`` problems and raises them together."""

    def __init__(self) -> None:
        self.items: list[str] = []

    def add(self, path: Path, line: int, column: str, message: str) -> None:
        self.items.append(f"{path}:{line}: {column}: {message}")

    def sorted_items(self) -> list[str]:
        """Problems ordered by file (first mentioned first), then line."""
        files: dict[str, int] = {}
        keyed = []
        for item in self.items:
            match = _LOCATION.match(item)
            name, line = (match.group(1), int(match.group(2))) if match else (item, 0)
            keyed.append((files.setdefault(name, len(files)), line))
        order = sorted(range(len(self.items)), key=lambda i: keyed[i])
        return [self.items[i] for i in order]

    def raise_if_any(self, what: str) -> None:
        if not self.items:
            return
        items = self.sorted_items()
        shown = items[:_MAX_ERRORS_SHOWN]
        more = len(items) - len(shown)
        tail = [f"... and {more} more"] if more > 0 else []
        raise CohortError(
            f"{len(self.items)} problem(s) in {what}; fix them and re-run:\n"
            + "\n".join([*shown, *tail])
        )


_UTF16_BOMS = (codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)
_RESAVE = "re-save it as UTF-8 (in Excel: 'CSV UTF-8') and re-run"


def read_utf8_text(path: str | os.PathLike[str], error: type[WsiMilError] = CohortError) -> str:
    """Read a text table as UTF-8 (a leading BOM is allowed), or fail in one line.

    Tables saved by spreadsheets are often UTF-16 (with a BOM) or Windows-1252; both are
    refused with the file, the line of the first bad byte and the fix, not decoded by
    guesswork.

    Args:
        path: The file.
        error: Error class to raise (``CohortError`` for tables of the cohort,
            ``ConfigError`` for a table given as an argument).

    Returns:
        The text, without the BOM.

    Raises:
        error: The file is UTF-16/UTF-32, holds NUL bytes or is not valid UTF-8.
        OSError: The file cannot be read.
    """
    data = Path(path).read_bytes()
    if data.startswith(_UTF16_BOMS) or b"\x00" in data:
        kind = "UTF-16/UTF-32 (byte-order mark)" if data.startswith(_UTF16_BOMS) else "NUL bytes"
        raise error(f"{path}: the file is not UTF-8 text ({kind}); {_RESAVE}")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise error(
            f"{path}:{line}: byte 0x{data[exc.start]:02x} is not valid UTF-8 (the file is "
            f"probably Windows-1252 or Latin-1); {_RESAVE}"
        ) from None


def _read_table(path: Path) -> tuple[list[str], list[tuple[int, dict[str, str]]]]:
    """Read a CSV/TSV into (header, [(line, row)]), with 1-based line numbers."""
    if not path.is_file():
        raise CohortError(f"{path}: file not found; give the path of the cohort/omics table")
    delimiter = "\t" if path.suffix.lower() in (".tsv", ".tab", ".txt") else ","
    with io.StringIO(read_utf8_text(path), newline="") as fh:
        reader = csv.reader(fh, delimiter=delimiter)
        try:
            header = [h.strip() for h in next(reader)]
        except StopIteration:
            raise CohortError(f"{path}:1: (header): the table is empty") from None
        rows = []
        for values in reader:
            if not any(v.strip() for v in values):
                continue
            row = {h: (values[i].strip() if i < len(values) else "") for i, h in enumerate(header)}
            rows.append((reader.line_num, row))
    return header, rows


def _parse_float(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def load_cohort(
    path: str | os.PathLike[str],
    *,
    task: str,
    features_dirs: Sequence[str | os.PathLike[str]] = (),
    label_column: str = "label",
    time_column: str = "time",
    event_column: str = "event",
    clinical: Sequence[str] = (),
    omics: str | os.PathLike[str] | None = None,
    omics_groups: str | os.PathLike[str] | None = None,
    omics_group_size: int = 32,
    require_targets: bool = True,
) -> Cohort:
    """Read and validate a cohort table; report every problem at once.

    Args:
        path: The cohort CSV (one row per slide).
        task: ``classification`` or ``survival``.
        features_dirs: Folders of bags (``<dir>/<slide_id>.h5``); each slide must have a
            bag in every folder. Empty: bags are not checked.
        label_column: Class column (classification).
        time_column: Follow-up time column (survival).
        event_column: Event indicator column, 0/1 (survival).
        clinical: Columns used as clinical covariates.
        omics: Optional omics table keyed by ``patient_id``.
        omics_groups: Optional JSON ``{group: [column, ...]}`` for the omics table.
        omics_group_size: Columns per group when no group file is given.
        require_targets: False for inference: targets may be missing (rows unlabelled).

    Returns:
        The validated :class:`Cohort`.

    Raises:
        CohortError: Listing every problem as ``file:line: column: message``.
    """
    if task not in TASKS:
        raise CohortError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
    path = Path(path)
    header, rows = _read_table(path)
    errors = _Errors()
    pid_col = next((c for c in _PATIENT_COLUMNS if c in header), None)
    targets = [label_column] if task == "classification" else [time_column, event_column]
    required = ["slide_id", *(targets if require_targets else [])]
    _check_header(path, header, pid_col, required, clinical, errors)
    if pid_col is None or "slide_id" not in header:
        errors.raise_if_any(str(path))  # rows cannot be read without the id columns
    pid_col = pid_col or "patient_id"
    has_targets = all(t in header for t in targets)
    patients: dict[str, Patient] = {}
    slides: dict[str, Slide] = {}
    first_line: dict[str, int] = {}
    for line, row in rows:
        slide = _parse_slide(path, line, row, pid_col, slides, errors)
        if slide is None:
            continue
        slides[slide.slide_id] = slide
        patient = patients.get(slide.patient_id)
        new = patient is None
        if patient is None:
            patient = patients[slide.patient_id] = Patient(slide.patient_id)
            first_line[slide.patient_id] = line
        patient.slide_ids.append(slide.slide_id)
        values = _parse_targets(
            path, line, row, task, targets, has_targets, require_targets, errors
        )
        clin = {c: row.get(c, "") for c in clinical}
        _merge_patient(path, line, patient, new, values, clin, first_line, errors)
    if not rows:
        errors.add(path, 2, "(rows)", "the table has no slides")
    _check_bags(path, slides, features_dirs, errors)
    omics_table = None
    if omics is not None:
        try:
            omics_table = load_omics(omics, groups=omics_groups, group_size=omics_group_size)
        except CohortError as exc:  # report omics problems with the cohort's
            errors.items.extend(str(exc).splitlines()[1:] or [str(exc)])
    errors.raise_if_any(str(path))
    classes: tuple[str, ...] = ()
    if task == "classification":
        classes = _sort_classes({p.label for p in patients.values() if p.label is not None})
    return Cohort(path, task, patients, slides, classes, tuple(clinical), omics_table)


def _check_header(
    path: Path,
    header: list[str],
    pid_col: str | None,
    required: list[str],
    clinical: Sequence[str],
    errors: _Errors,
) -> None:
    if pid_col is None:
        errors.add(path, 1, "patient_id", "missing column (CLAM's 'case_id' is accepted too)")
    for col in required:
        if col not in header:
            errors.add(path, 1, col, f"missing column; the header has {', '.join(header)}")
    dupes = sorted({h for h in header if header.count(h) > 1})
    for col in dupes:
        errors.add(path, 1, col, "column appears more than once in the header")
    for col in clinical:
        if col not in header:
            errors.add(
                path,
                1,
                col,
                f"unknown clinical covariate column; the header has {', '.join(header)}",
            )


def _parse_slide(
    path: Path,
    line: int,
    row: dict[str, str],
    pid_col: str,
    slides: dict[str, Slide],
    errors: _Errors,
) -> Slide | None:
    slide_id, patient_id = row.get("slide_id", ""), row.get(pid_col, "")
    ok = _check_id(path, line, "slide_id", "slide", slide_id, errors)
    ok = _check_id(path, line, pid_col, "patient", patient_id, errors) and ok
    if not ok:
        return None
    previous = slides.get(slide_id)
    if previous is not None:
        if previous.patient_id != patient_id:
            errors.add(
                path,
                line,
                pid_col,
                f"slide {slide_id!r} is under patient {patient_id!r} here but under "
                f"{previous.patient_id!r} on line {previous.line}; a slide has one patient",
            )
        else:
            errors.add(
                path,
                line,
                "slide_id",
                f"duplicate slide id {slide_id!r} (first on line "
                f"{previous.line}); list each slide once",
            )
        return None
    return Slide(slide_id, patient_id, line)


def _check_id(path: Path, line: int, column: str, what: str, value: str, errors: _Errors) -> bool:
    """Record a problem when ``value`` cannot name files (ids become file names)."""
    if not value:
        errors.add(path, line, column, f"empty {what} id")
        return False
    problem = id_problem(value)
    if problem is not None:
        errors.add(
            path,
            line,
            column,
            f"{what} id {value!r} {problem}; ids name output files, so use a plain "
            "name (letters, digits, '-', '_', '.')",
        )
        return False
    return True


def _parse_targets(
    path: Path,
    line: int,
    row: dict[str, str],
    task: str,
    targets: list[str],
    has_targets: bool,
    required: bool,
    errors: _Errors,
) -> dict[str, object]:
    """Parse label or time/event of one row; missing values only allowed if not required."""
    if not has_targets:
        return {}
    if task == "classification":
        label = row.get(targets[0], "")
        if not label and required:
            errors.add(path, line, targets[0], "missing label")
        return {"label": label or None}
    time_col, event_col = targets
    time_text, event_text = row.get(time_col, ""), row.get(event_col, "")
    if not time_text and not event_text and not required:
        return {}
    out: dict[str, object] = {}
    time = _parse_float(time_text)
    if time is None:
        errors.add(path, line, time_col, f"time {time_text!r} is not a finite number")
    elif time < 0:
        errors.add(path, line, time_col, f"negative time {time_text}; times must be >= 0")
    else:
        out["time"] = time
    event = _parse_float(event_text)
    if event is None or event not in (0.0, 1.0):
        errors.add(path, line, event_col, f"event {event_text!r} must be 0 (censored) or 1 (event)")
    else:
        out["event"] = int(event)
    return out


def _merge_patient(
    path: Path,
    line: int,
    patient: Patient,
    new: bool,
    values: dict[str, object],
    clinical: dict[str, str],
    first_line: dict[str, int],
    errors: _Errors,
) -> None:
    """Set a patient's targets from its first row; later rows must agree."""
    if new:
        for key, value in values.items():
            setattr(patient, key, value)
        patient.clinical = clinical
        return
    first = first_line[patient.patient_id]
    for key, value in values.items():
        if getattr(patient, key) != value:
            errors.add(
                path,
                line,
                key,
                f"{value!r} disagrees with {getattr(patient, key)!r} for patient "
                f"{patient.patient_id!r} on line {first}; a patient has one {key}",
            )
    for col, value in clinical.items():
        if patient.clinical.get(col, "") != value:
            errors.add(
                path,
                line,
                col,
                f"{value!r} disagrees with {patient.clinical.get(col)!r} for patient "
                f"{patient.patient_id!r} on line {first}",
            )


def _check_bags(
    path: Path,
    slides: dict[str, Slide],
    features_dirs: Sequence[str | os.PathLike[str]],
    errors: _Errors,
) -> None:
    for folder in map(Path, features_dirs):
        if not folder.is_dir():
            errors.add(path, 1, "--features", f"folder {folder} does not exist")
            continue
        for slide in slides.values():
            bag = folder / f"{slide.slide_id}.h5"
            if not bag.is_file():
                errors.add(
                    path,
                    slide.line,
                    "slide_id",
                    f"no feature bag {bag}; run `wsi-mil extract` or fix the slide id",
                )


def _sort_classes(labels: set[str]) -> tuple[str, ...]:
    """Numeric labels sort numerically, others alphabetically."""
    if all(_parse_float(lab) is not None for lab in labels):
        return tuple(sorted(labels, key=lambda s: (float(s), s)))
    return tuple(sorted(labels))


def load_omics(
    path: str | os.PathLike[str],
    *,
    groups: str | os.PathLike[str] | None = None,
    group_size: int = 32,
) -> Omics:
    """Read a numeric omics table keyed by ``patient_id`` (or ``case_id``).

    Args:
        path: CSV (or TSV by suffix) with one row per patient and one column per gene or
            pathway score; empty cells are missing values.
        groups: Optional JSON file ``{group: [column, ...]}``; default one group per chunk
            of ``group_size`` columns.
        group_size: Columns per default group.

    Returns:
        :class:`Omics`.

    Raises:
        CohortError: Listing every problem as ``file:line: column: message``.
    """
    path = Path(path)
    header, rows = _read_table(path)
    errors = _Errors()
    pid_col = next((c for c in _PATIENT_COLUMNS if c in header), None)
    if pid_col is None:
        errors.add(path, 1, "patient_id", "missing column keying the omics table by patient")
        errors.raise_if_any(str(path))
        pid_col = "patient_id"  # not reached: raise_if_any raised
    columns = [c for c in header if c != pid_col]
    if not columns:
        errors.add(path, 1, "(header)", "no omics columns besides the patient id")
    values = np.full((len(rows), len(columns)), np.nan)
    index: dict[str, int] = {}
    for i, (line, row) in enumerate(rows):
        pid = row.get(pid_col, "")
        if not pid:
            errors.add(path, line, pid_col, "empty patient id")
        elif pid in index:
            errors.add(path, line, pid_col, f"patient {pid!r} appears twice in the omics table")
        else:
            index[pid] = i
        for j, col in enumerate(columns):
            text = row.get(col, "")
            if not text or text.lower() in ("na", "nan"):
                continue
            value = _parse_float(text)
            if value is None:
                errors.add(path, line, col, f"{text!r} is not a finite number")
            else:
                values[i, j] = value
    group_idx, group_names = _omics_groups(path, columns, groups, group_size, errors)
    errors.raise_if_any(str(path))
    return Omics(path, columns, values, index, group_idx, group_names)


def _omics_groups(
    path: Path,
    columns: list[str],
    groups: str | os.PathLike[str] | None,
    group_size: int,
    errors: _Errors,
) -> tuple[list[list[int]], list[str]]:
    if groups is None:
        size = max(1, int(group_size))
        chunks = [list(range(i, min(i + size, len(columns)))) for i in range(0, len(columns), size)]
        return chunks, [f"group_{k}" for k in range(len(chunks))]
    gpath = Path(groups)
    try:
        spec = json.loads(read_utf8_text(gpath))
    except (OSError, json.JSONDecodeError) as exc:
        raise CohortError(f"{gpath}: cannot read gene-group JSON ({exc})") from exc
    if not isinstance(spec, dict) or not all(isinstance(v, list) for v in spec.values()):
        raise CohortError(f"{gpath}: expected a JSON object {{group: [column, ...]}}")
    position = {c: j for j, c in enumerate(columns)}
    out, names = [], []
    for name, genes in spec.items():
        missing = [g for g in genes if g not in position]
        if missing:
            errors.add(gpath, 1, str(name), f"columns not in {path.name}: {missing[:10]}")
        idx = [position[g] for g in genes if g in position]
        if idx:
            out.append(idx)
            names.append(str(name))
    if not out:
        errors.add(gpath, 1, "(groups)", "no group has any column of the omics table")
    return out, names
