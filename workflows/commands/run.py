"""``wsi-mil run``: the whole pipeline, tile → extract → train (→ report)."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path
from typing import Any

__all__ = ["add_parser", "pipeline_steps", "run"]

_DESCRIPTION = """\
Run every stage on the slides of a cohort table:

  OUT/tiles/<slide_id>.zarr             tile stores          (wsi-mil tile)
  OUT/features/<encoder>/<slide_id>.h5  feature bags         (wsi-mil extract)
  OUT/runs/<name>/                      cross-validated run  (wsi-mil train)
                                        with predictions, metrics, attention and,
                                        for survival, report.html
  OUT/manifest.csv                      every cohort slide at every stage:
                                        slide_id, stage, status, reason
  OUT/config.yaml                       the resolved configuration (a --config file)
  OUT/run.log                           the console output of every run

Options come from the stage defaults, then --config FILE (YAML; `wsi-mil init` writes
a template with every key), then the flags given here. Only the cohort's slides are
processed (a file's slide id is its name without the extension, or the cohort's
slide_path column); other slides in SLIDES are listed once as ignored. Per-slide
resolutions come from --mpp-csv, then the cohort's mpp column, then --mpp, then the
slide's metadata. A slide that fails a stage (or has no file, or no tissue) is left out
of the later stages and training goes on without it; manifest.csv says where and why.
Every stage skips what is already complete, so re-running resumes. With
--dask-scheduler, tiling and extraction run on that Dask cluster (see the README).

Exit status: 0 when every cohort slide was used for training; 1 when training ran
without some of them (failed, missing or without tissue); 2 on invalid input (before
any work); the stage's status when a stage stops outright."""


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``run``: one flag per key of :func:`~wsi_mil.workflows.config.run_options`."""
    from wsi_mil.workflows.config import run_options

    p = subparsers.add_parser(
        "run",
        help="run tile → extract → train → report on slides and a cohort table",
        description=_DESCRIPTION,
    )
    sup = argparse.SUPPRESS  # only the flags given are set: they override --config
    p.add_argument("slides", nargs="?", default=sup, help="folder of slides (or `slides:`)")
    p.add_argument("cohort", nargs="?", default=sup, help="cohort CSV (or `cohort:`)")
    p.add_argument("--config", type=Path, default=None, help="YAML file (see `wsi-mil init`)")
    for opt in run_options():
        if not opt.flag:
            continue
        unset = "--config, else not set" if opt.default is None else opt.default
        shown = "" if "default" in opt.help else f" (default: {unset})"
        text = f"{opt.key}: {opt.help}{shown}"
        if opt.kind == "bool":
            store = "store_false" if opt.action == "store_false" else "store_true"
            p.add_argument(opt.flag, dest=opt.dest, action=store, default=sup, help=text)
            continue
        kind = {"int": int, "float": float, "path": Path}.get(opt.kind, str)
        nargs = "+" if opt.kind == "list" else None
        p.add_argument(opt.flag, dest=opt.dest, type=kind, default=sup, choices=opt.choices,
                       nargs=nargs, metavar=None if opt.choices else opt.name.upper(),
                       help=text)  # fmt: skip
    return p


# ------------------------------------------------------------------ stage command lines


def _stage_args(values: dict[str, Any], stage: str, skip: tuple[str, ...] = ()) -> list[str]:
    """The flags of ``stage`` whose value differs from the stage default."""
    from wsi_mil.workflows.config import run_options

    argv: list[str] = []
    for opt in run_options():
        if opt.section != stage or opt.name in skip:
            continue
        value = values[opt.key]
        if value == opt.default or value is None:
            continue
        if opt.kind == "bool":
            argv.append(opt.stage_flag)  # differs from the default: the flag is given
        elif opt.kind == "list":
            argv += [opt.stage_flag, *map(str, value)]
        else:
            argv += [opt.stage_flag, str(value)]
    return argv


def _features_dir(values: dict[str, Any]) -> Path:
    from wsi_mil.features.bags import bag_path

    folder = values.get("extract.name") or values["extract.encoder"]
    return bag_path(Path(values["out"]) / "features", folder, "x").parent


def pipeline_steps(
    values: dict[str, Any], slides: list[str], stores: list[str], cohort: str
) -> list[list[str]]:
    """The stage command lines of ``run``, in order.

    Args:
        values: Resolved configuration (:func:`~wsi_mil.workflows.config.resolve_config`,
            with ``task`` and ``name`` filled in).
        slides: Slide files to tile.
        stores: Tile stores to embed.
        cohort: The cohort table training reads.

    Returns:
        One argv list per stage (tile, extract, train) for :func:`wsi_mil.workflows.cli.main`.
    """
    out = Path(values["out"])
    dask = ["--dask-scheduler", values["dask_scheduler"]] if values["dask_scheduler"] else []
    tile = ["tile", *slides, "--out", str(out / "tiles"), *dask]
    tile += _stage_args(values, "tile")
    extract = ["extract", *stores, "--out", str(out / "features"), *dask]
    extract += _stage_args(values, "extract")
    if not values.get("extract.name"):  # one bag folder per run, whatever the weights
        extract += ["--name", values["extract.encoder"]]
    train = ["train", cohort, "--features", str(_features_dir(values)), "--task", values["task"]]
    train += ["--out", str(out / "runs" / values["name"]), *_stage_args(values, "train")]
    return [tile, extract, train]


def _shown(argv: list[str], n_items: int, what: str) -> str:
    """``argv`` as a shell line, its ``n_items`` inputs after the command abbreviated."""
    items = argv[1 : 1 + n_items]
    middle = list(map(shlex.quote, items)) if len(items) <= 3 else [f"<{len(items)} {what}>"]
    return " ".join(["wsi-mil", argv[0], *middle, *map(shlex.quote, argv[1 + n_items :])])


# ------------------------------------------------------------------ checks before work


def _cohort_task(cohort: str) -> str:
    from wsi_mil.workflows.pipeline import read_cohort_rows

    header, _ = read_cohort_rows(cohort)
    return "survival" if {"time", "event"} <= set(header) else "classification"


def _check_before_work(values: dict[str, Any]) -> None:
    """Cohort table, encoder, aggregator and its options: every mistake before tiling.

    Raises:
        CohortError, EncoderError, ConfigError: Naming the problem.
    """
    from wsi_mil.errors import ConfigError
    from wsi_mil.features.registry import get_encoder_spec
    from wsi_mil.mil.cohort import load_cohort
    from wsi_mil.mil.models import list_aggregators

    clinical = [c.strip() for c in str(values["train.clinical"] or "").split(",") if c.strip()]
    load_cohort(values["cohort"], task=values["task"], label_column=values["train.label_column"],
                time_column=values["train.time_column"],
                event_column=values["train.event_column"], clinical=clinical,
                omics=values["train.omics"], omics_groups=values["train.omics_groups"],
                omics_group_size=values["train.omics_group_size"])  # fmt: skip
    get_encoder_spec(values["extract.encoder"])
    if values["train.model"] not in list_aggregators():
        raise ConfigError(f"--model {values['train.model']!r} is not one of "
                          f"{', '.join(list_aggregators())}")  # fmt: skip
    try:
        kwargs = json.loads(values["train.model_kwargs"])
    except json.JSONDecodeError as exc:
        raise ConfigError(f"--model-kwargs / train.model_kwargs is not JSON ({exc})") from None
    if not isinstance(kwargs, dict):
        raise ConfigError("--model-kwargs / train.model_kwargs must be a JSON object")
    if values["dask_scheduler"]:
        from wsi_mil.cluster import connect

        with connect(values["dask_scheduler"]):  # unreachable: one line, exit 2, now
            pass


def _resolve(args: argparse.Namespace) -> dict[str, Any]:
    """The configuration with absolute paths, ``task`` and ``name`` filled in."""
    from wsi_mil.workflows.config import PATH_KEYS, resolve_config

    values = resolve_config(args)
    for key in PATH_KEYS:
        if values.get(key) not in (None, "random"):
            values[key] = str(Path(values[key]).expanduser().resolve())
    values["task"] = values["task"] or _cohort_task(values["cohort"])
    values["name"] = values["name"] or f"{values['train.model']}-{values['task']}"
    return values


def _write_config(path: Path, values: dict[str, Any]) -> None:
    import yaml

    from wsi_mil import __version__
    from wsi_mil.outputs import atomic_path
    from wsi_mil.workflows.config import nest

    head = (f"# resolved by wsi-mil {__version__}; re-run with "
            f"`wsi-mil run --config {path}`\n")  # fmt: skip
    with atomic_path(path) as tmp:
        tmp.write_text(head + yaml.safe_dump(nest(values), sort_keys=False), encoding="utf-8")


# ------------------------------------------------------------------ the run


def run(args: argparse.Namespace) -> int:
    """Run the stages in order; 1 when training ran without some cohort slides."""
    from wsi_mil.outputs import ensure_writable
    from wsi_mil.workflows.runlog import tee_to_log

    values = _resolve(args)
    out = ensure_writable(values["out"])
    _check_before_work(values)  # every problem of the table, before hours of tiling
    title = "wsi-mil run " + " ".join(map(shlex.quote, sys.argv[2:] if sys.argv else []))
    with tee_to_log(out / "run.log", title):
        return _Pipeline(values, out).run()


class _Pipeline:
    """One ``run``: the stages, and the ledger of what became of every cohort slide."""

    def __init__(self, values: dict[str, Any], out: Path) -> None:
        from wsi_mil.workflows.pipeline import Ledger

        self.values, self.out = values, out
        self.ledger = Ledger()
        self.cohort_ids: list[str] = []

    def run(self) -> int:
        """Every stage; writes ``manifest.csv`` whatever happens after the slides are known."""
        from wsi_mil.workflows.pipeline import select_slides

        selection = select_slides(self.values["slides"], self.values["cohort"])
        self.cohort_ids = list(selection.found) + selection.missing
        self._report_selection(selection)
        mpp_csv = self._mpp_csv(list(selection.found))
        _write_config(self.out / "config.yaml", self.values)
        try:
            return self._stages(selection, mpp_csv)
        finally:
            manifest = self.ledger.write(self.out / "manifest.csv")
            print(f"run manifest: {manifest}; log: {self.out / 'run.log'}")

    def _report_selection(self, selection: Any) -> None:
        for path in selection.ignored:
            self.ledger.add(Path(path).name, "input", "ignored", "not in the cohort table")
        if selection.ignored:
            names = ", ".join(p.name for p in selection.ignored[:10])
            more = " ..." if len(selection.ignored) > 10 else ""
            print(f"ignored {len(selection.ignored)} slide file(s) not in the cohort: "
                  f"{names}{more}")  # fmt: skip
        for sid in selection.missing:
            reason = f"no slide file for it in {self.values['slides']} (nor a slide_path)"
            self.ledger.add(sid, "input", "failed", reason)
            self.ledger.exclude(sid, "input", reason)
        if selection.missing:
            print(f"{len(selection.missing)} cohort slide(s) have no file and are left out: "
                  f"{', '.join(selection.missing[:10])}")  # fmt: skip

    def _mpp_csv(self, slide_ids: list[str]) -> Path | None:
        """Write ``OUT/mpp.csv``: --mpp-csv rows over the cohort's mpp column (or None)."""
        import csv

        from wsi_mil.outputs import atomic_path
        from wsi_mil.workflows.commands.tile import read_mpp_csv
        from wsi_mil.workflows.pipeline import cohort_mpp

        mpp = cohort_mpp(self.values["cohort"])
        if self.values["tile.mpp_csv"]:
            mpp.update(read_mpp_csv(Path(self.values["tile.mpp_csv"])))
        mpp = {sid: mpp[sid] for sid in slide_ids if sid in mpp}
        if not mpp:
            return None
        path = self.out / "mpp.csv"
        with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as fh:
            writer = csv.writer(fh)
            writer.writerow(["slide_id", "mpp"])
            writer.writerows(sorted(mpp.items()))
        return path

    def _stage(self, argv: list[str], n_items: int, what: str) -> int:
        from wsi_mil.workflows.cli import main as cli_main

        print(f"\n$ {_shown(argv, n_items, what)}", flush=True)
        return cli_main(argv)

    def _stages(self, selection: Any, mpp_csv: Path | None) -> int:
        from wsi_mil.outputs import read_manifest

        values, out = self.values, self.out
        slides = [str(p) for p in selection.found.values()]
        steps = pipeline_steps(values, slides, [], "")
        tile = steps[0]
        if mpp_csv is not None:  # --mpp-csv rows over the cohort's mpp column
            tile = _replace_flag(tile, "--mpp-csv", str(mpp_csv))
        status = self._stage(tile, len(slides), "cohort slides")
        if status not in (0, 1):
            return status
        ids = list(selection.found)
        self.ledger.stage_rows("tile", read_manifest(out / "tiles" / "manifest.csv"), ids)
        tiled = [sid for sid in ids if sid not in self.ledger.out]
        if not tiled:
            print("no slide was tiled; nothing to extract (see manifest.csv)")
            return 1
        stores = [str(out / "tiles" / f"{sid}.zarr") for sid in tiled]
        extract = pipeline_steps(values, slides, stores, "")[1]
        status = self._stage(extract, len(stores), "tile stores")
        if status not in (0, 1):
            return status
        bags = read_manifest(_features_dir(values) / "manifest.csv")
        self.ledger.stage_rows("extract", bags, ids)
        return self._train(ids)

    def _train(self, ids: list[str]) -> int:
        from wsi_mil.errors import ConfigError
        from wsi_mil.workflows.pipeline import write_training_cohort

        values, out = self.values, self.out
        usable = {sid for sid in ids if sid not in self.ledger.out}
        cohort = out / "train_cohort.csv"
        changed = write_training_cohort(values["cohort"], usable, cohort)
        run_dir = out / "runs" / values["name"]
        if changed and (run_dir / "config.yaml").is_file():
            raise ConfigError(
                f"the slides usable for training changed since {run_dir} was trained (see "
                f"{out / 'manifest.csv'}); its folds would mix both: pass --name NEW to train "
                f"a new run, or delete {run_dir}"
            )
        train = pipeline_steps(values, [], [], str(cohort))[2]
        try:
            status = self._stage(train, 1, "")
        except Exception as exc:  # a bug, not the input: the traceback follows
            self._train_failed(f"{type(exc).__name__}: {exc}")
            raise
        if status != 0:
            self._train_failed(f"training stopped (exit {status}; see run.log)")
            return status
        empty = set(_excluded_empty(run_dir))
        for sid in self.cohort_ids:
            if self.ledger.carried(sid, "train"):
                continue
            if sid in empty:
                self.ledger.add(sid, "train", "excluded", "no tissue: empty feature bag")
                self.ledger.exclude(sid, "train", "no tissue")
            else:
                self.ledger.add(sid, "train", "ok", f"in {run_dir}")
        left_out = [sid for sid in self.cohort_ids if sid in self.ledger.out]
        if left_out:
            print(f"trained without {len(left_out)} cohort slide(s): {', '.join(left_out[:10])}"
                  f"{' ...' if len(left_out) > 10 else ''} (see manifest.csv)")  # fmt: skip
        return 1 if left_out else 0

    def _train_failed(self, reason: str) -> None:
        for sid in self.cohort_ids:
            if not self.ledger.carried(sid, "train"):
                self.ledger.add(sid, "train", "failed", reason)


def _replace_flag(argv: list[str], flag: str, value: str) -> list[str]:
    """``argv`` with ``flag VALUE`` set to ``value`` (appended when absent)."""
    out = list(argv)
    if flag in out:
        out[out.index(flag) + 1] = value
    else:
        out += [flag, value]
    return out


def _excluded_empty(run_dir: Path) -> list[str]:
    try:
        metrics = json.loads((run_dir / "metrics.json").read_text())
    except (OSError, ValueError):
        return []
    return [str(s) for s in metrics.get("excluded_empty_slides", [])]
