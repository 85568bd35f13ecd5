"""The configuration file of ``wsi-mil run`` (YAML): its keys, the template, loading.

Every option of ``run`` has a key. Top-level keys are the run's own (``slides``,
``cohort``, ``out``, ``task``, ``name``, ``dask_scheduler``); the options of the stages
sit in the sections ``tile``, ``extract`` and ``train`` under the names of the stage
commands' options with underscores (``tile.target_mpp``, ``train.lr``). The stage keys
are taken from the stage commands' parsers, so an option added to ``wsi-mil train`` is a
key of ``train:`` and a flag of ``run`` without further work. On ``run``'s command line
a stage option keeps its stage flag (``--lr``, ``--target-mpp``) unless two stages share
it: ``--workers`` (tiling processes) and ``--batch-size`` (bags per training step) stay
with one stage and the other's gets its stage prefix (``--extract-workers``,
``--extract-batch-size``, ``--tile-overwrite``, ``--extract-overwrite``).

Precedence: the stage default, then the ``--config`` file, then the command line.
Relative paths in the file are relative to the file's folder. Unknown keys, values of the
wrong type and values outside an option's choices are refused, naming the key's path
(``train.lrr: unknown key, did you mean train.lr``).
"""

from __future__ import annotations

import argparse
import difflib
import functools
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from wsi_mil.errors import ConfigError

__all__ = [
    "PATH_KEYS",
    "SECTIONS",
    "Option",
    "load_config_file",
    "nest",
    "render_template",
    "resolve_config",
    "run_options",
]

#: Stage sections of the file, in pipeline order.
SECTIONS = ("tile", "extract", "train")

#: Stage options that ``run`` sets itself (inputs, outputs, the shared scheduler).
_RUN_OWNED = {
    "tile": {"inputs", "out", "dask_scheduler", "help"},
    "extract": {"tiles", "out", "dask_scheduler", "no_progress", "help"},
    "train": {"cohort", "features", "task", "out", "help"},
}

#: A flag that several stages have keeps its plain name for this stage only.
_FLAG_OWNER = {"--workers": "tile", "--batch-size": "train"}

#: Keys holding a path (resolved against the file's folder, or the working folder).
PATH_KEYS = ("slides", "cohort", "out", "tile.mpp_csv", "tile.include_geojson",
             "tile.exclude_geojson", "extract.weights", "train.omics",
             "train.omics_groups")  # fmt: skip

#: One line of help for stage options whose parser gives none.
_FALLBACK_HELP = {
    "train.weight_decay": "AdamW weight decay",
    "train.level": "one bag per patient (all its slides) or per slide",
    "train.seed": "seed of the splits, initialisation and sampling",
    "train.survival_loss": "survival loss: weighted Cox or discrete-time",
    "train.label_column": "cohort column of the class (classification)",
    "train.time_column": "cohort column of the follow-up time (survival)",
    "train.event_column": "cohort column of the event, 1 = event, 0 = censored (survival)",
}


@dataclass(frozen=True)
class Option:
    """One key of the configuration and its ``run`` flag.

    Attributes:
        key: Dotted path in the file (``train.lr``; top-level keys have no dot).
        dest: Attribute name in ``run``'s parsed arguments.
        flag: ``run``'s flag (``--lr``); empty for the positional ``slides``/``cohort``.
        stage_flag: The stage command's flag that receives the value (``--lr``).
        kind: ``bool``, ``int``, ``float``, ``str`` or ``path``.
        default: The value when neither the file nor the command line sets it.
        help: One line of help.
        choices: Allowed values, or None.
        action: ``store``, ``store_true`` or ``store_false`` (how the stage flag is used).
    """

    key: str
    dest: str
    flag: str
    stage_flag: str
    kind: str
    default: Any
    help: str
    choices: tuple[Any, ...] | None = None
    action: str = "store"

    @property
    def section(self) -> str | None:
        """The stage section (``train``), or None for a top-level key."""
        return self.key.split(".", 1)[0] if "." in self.key else None

    @property
    def name(self) -> str:
        """The key's name inside its section (``lr``)."""
        return self.key.rsplit(".", 1)[-1]


_TOP = (
    Option("slides", "slides", "", "", "path", None,
           "folder of slides (searched recursively) or one slide file"),
    Option("cohort", "cohort", "", "", "path", None,
           "cohort CSV: patient_id, slide_id, label or time+event; optional mpp, slide_path"),
    Option("out", "out", "--out", "--out", "path", None,
           "output folder (tiles/, features/, runs/, manifest.csv, config.yaml, run.log)"),
    Option("task", "task", "--task", "--task", "str", None,
           "classification or survival (null: survival when the cohort has time and event)",
           ("classification", "survival")),
    Option("name", "name", "--name", "--name", "str", None,
           "run name under OUT/runs (null: <model>-<task>)"),
    Option("dask_scheduler", "dask_scheduler", "--dask-scheduler", "--dask-scheduler", "str",
           None, "Dask scheduler address (tcp://host:8786): tile and extract on that cluster"),
)  # fmt: skip


def _kind(action: argparse.Action) -> str:
    if isinstance(action, argparse._StoreTrueAction | argparse._StoreFalseAction):
        return "bool"
    if action.nargs in ("+", "*"):
        return "list"
    if action.type is int:
        return "int"
    if action.type is float:
        return "float"
    if action.type is Path:
        return "path"
    return "str"


def _stage_actions() -> dict[str, list[argparse.Action]]:
    """The optional arguments of the ``tile``, ``extract`` and ``train`` parsers."""
    import importlib

    from wsi_mil.workflows.cli import Parser

    sub = Parser(prog="wsi-mil").add_subparsers()
    actions = {}
    for stage in SECTIONS:
        module = importlib.import_module(f"wsi_mil.workflows.commands.{stage}")
        parser = module.add_parser(sub)
        actions[stage] = [
            a for a in parser._actions if a.option_strings and a.dest not in _RUN_OWNED[stage]
        ]
    return actions


def _long_flag(action: argparse.Action) -> str:
    return next(f for f in action.option_strings if f.startswith("--"))


@functools.cache
def run_options() -> tuple[Option, ...]:
    """Every key of the configuration, top-level first, then each stage's options."""
    actions = _stage_actions()
    count: dict[str, int] = {o.flag: 2 for o in _TOP if o.flag}  # a top-level flag wins
    for stage_actions in actions.values():
        for a in stage_actions:
            count[_long_flag(a)] = count.get(_long_flag(a), 0) + 1
    options = list(_TOP)
    for stage, stage_actions in actions.items():
        for a in stage_actions:
            flag = _long_flag(a)
            shared = count[flag] > 1 and _FLAG_OWNER.get(flag) != stage
            run_flag = f"--{stage}-{flag[2:]}" if shared else flag
            kind = _kind(a)
            default = (not a.const) if kind == "bool" and a.default is None else a.default
            help_text = " ".join(str(a.help or "").replace("%(default)s", str(default)).split())
            help_text = help_text or _FALLBACK_HELP.get(f"{stage}.{a.dest}", f"{stage} {flag}")
            if kind == "bool" and a.const is False:
                help_text = f"false = {flag}: {help_text}"
            options.append(Option(
                key=f"{stage}.{a.dest}", dest=f"{stage}__{a.dest}", flag=run_flag,
                stage_flag=flag, kind=kind, default=default, help=help_text,
                choices=tuple(a.choices) if a.choices else None,
                action={True: "store_true", False: "store_false"}.get(a.const, "store")
                if kind == "bool" else "store",
            ))  # fmt: skip
    return tuple(options)


def _by_key() -> dict[str, Option]:
    return {o.key: o for o in run_options()}


# ------------------------------------------------------------------ values


def _check_value(opt: Option, value: Any, where: str) -> Any:
    """``value`` converted to ``opt``'s kind.

    Raises:
        ConfigError: Wrong type or not among the choices, naming ``where``.
    """
    if value is None:
        if opt.kind == "bool":
            raise ConfigError(f"{where}: expected true or false, got null")
        return None
    expected = {"bool": "true or false", "int": "an integer", "float": "a number",
                "str": "a string", "path": "a path",
                "list": "a list of strings"}[opt.kind]  # fmt: skip
    ok: bool
    if opt.kind == "list":
        value = value.split() if isinstance(value, str) else value
        ok = isinstance(value, list) and all(isinstance(v, str | int | float) for v in value)
        value = [str(v) for v in value] if ok else value
    elif opt.kind == "bool":
        ok = isinstance(value, bool)
    elif opt.kind == "int":
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif opt.kind == "float":
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        value = float(value) if ok else value
    else:
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            value = ",".join(value)  # e.g. train.clinical: [age, stage]
        elif isinstance(value, dict) and opt.kind == "str":
            value = json.dumps(value)  # e.g. train.model_kwargs: {dropout: 0.1}
        ok = isinstance(value, str | int | float) and not isinstance(value, bool)
        value = str(value) if ok else value
    if not ok:
        raise ConfigError(f"{where}: expected {expected}, got {value!r}")
    if opt.choices and value not in opt.choices:
        listed = ", ".join(map(str, opt.choices))
        raise ConfigError(f"{where}: {value!r} is not one of {listed}")
    return value


def _unknown(path: str, dotted: str, known: list[str]) -> str:
    close = difflib.get_close_matches(dotted, known, n=1, cutoff=0.6)
    hint = f"did you mean {close[0]}" if close else "see `wsi-mil init` for every key"
    return f"{path}: {dotted}: unknown key, {hint}"


def load_config_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a ``run`` configuration file into ``{key: value}`` (dotted keys).

    Relative paths are made absolute against the file's folder; ``null`` leaves a key
    at its default.

    Raises:
        ConfigError: Unreadable file, not YAML, unknown keys, wrong types (every problem
            listed, each naming its key's path, e.g. ``train.lrr: unknown key, did you
            mean train.lr``).
    """
    import yaml

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"--config {path}: cannot read it ({exc.strerror or exc})") from None
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        detail = " ".join(str(exc).split())
        raise ConfigError(f"--config {path}: not valid YAML ({detail})") from None
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path}: expected a mapping of keys, got {type(data).__name__}")
    options = _by_key()
    known = list(options)
    values: dict[str, Any] = {}
    problems: list[str] = []
    for dotted, value in _flatten(data, problems, str(path)):
        opt = options.get(dotted)
        if opt is None:
            problems.append(_unknown(str(path), dotted, known))
            continue
        try:
            value = _check_value(opt, value, f"{path}: {dotted}")
        except ConfigError as exc:
            problems.append(str(exc))
            continue
        if value is not None and dotted in PATH_KEYS and value != "random":
            value = str((path.parent / Path(value).expanduser()).resolve())
        if value is not None:
            values[dotted] = value
    if problems:
        raise ConfigError("; ".join(problems))
    return values


def _flatten(data: Mapping[Any, Any], problems: list[str], path: str) -> list[tuple[str, Any]]:
    items = []
    for key, value in data.items():
        key = str(key)
        if key in SECTIONS:
            if value is None:
                continue
            if not isinstance(value, Mapping):
                problems.append(f"{path}: {key}: expected a section of keys, got {value!r}")
                continue
            items += [(f"{key}.{k}", v) for k, v in value.items()]
        else:
            items.append((key, value))
    return items


def resolve_config(args: argparse.Namespace) -> dict[str, Any]:
    """Every key's value: defaults, then ``args.config`` (a file), then the flags given.

    Args:
        args: ``run``'s parsed arguments, in which only the flags given are set.

    Returns:
        ``{key: value}`` for every key of :func:`run_options` (dotted keys).

    Raises:
        ConfigError: A bad file, or ``slides``/``cohort``/``out`` set nowhere.
    """
    values = {o.key: o.default for o in run_options()}
    if getattr(args, "config", None) is not None:
        values.update(load_config_file(args.config))
    for opt in run_options():
        if hasattr(args, opt.dest):
            given = getattr(args, opt.dest)
            values[opt.key] = str(given) if isinstance(given, Path) else given
    for key, where in (("slides", "SLIDES"), ("cohort", "COHORT"), ("out", "--out")):
        if values[key] is None:
            raise ConfigError(f"give {where} on the command line or `{key}:` in --config")
    return values


def nest(values: Mapping[str, Any]) -> dict[str, Any]:
    """Dotted ``{key: value}`` → the file's layout (top-level keys, then sections)."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        if "." in key:
            section, name = key.split(".", 1)
            out.setdefault(section, {})[name] = value
        else:
            out[key] = value
    return out


# ------------------------------------------------------------------ template


def _scalar(value: Any) -> str:
    import yaml

    text = yaml.safe_dump(value, default_flow_style=True, width=1_000_000)
    return text.removesuffix("\n...\n").strip()


_HEADER = """\
# wsi-mil run configuration: `wsi-mil run --config {name}`
# Every key is shown with its default; edit what you need. Flags on the command line
# override this file (`wsi-mil run --help` lists them). Relative paths are relative to
# this file's folder; null means "not set" (the option's default behaviour).
"""


def render_template(name: str = "wsi-mil.yaml") -> str:
    """The annotated template: every key, its default and one line of help."""
    lines = [_HEADER.format(name=name)]
    section = None
    for opt in run_options():
        if opt.section != section:
            section = opt.section
            lines.append(f"\n{section}:  # `wsi-mil {section}` options\n")
        indent = "  " if opt.section else ""
        flag = f"; flag {opt.flag}" if opt.flag else "; positional"
        choices = f" [{' | '.join(map(str, opt.choices))}]" if opt.choices else ""
        lines.append(f"{indent}{opt.name}: {_scalar(opt.default)}  # {opt.help}{choices}{flag}\n")
    return "".join(lines)
