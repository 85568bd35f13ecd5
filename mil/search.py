"""Inner model choice among a small grid (``wsi-mil train --search``).

``--search lr=1e-3,3e-4 dropout=0.1,0.25`` gives option names and candidate values;
every combination (here 4) is fitted in each outer fold on the fold's training
patients, with early stopping on its inner validation patients, and the candidate
whose restored checkpoint has the lowest inner-validation loss is the fold's model.
The outer test patients play no part in the choice (they are predicted only once the
fold's model is fixed). Names are training options (:data:`TRAIN_OPTIONS`) or, for
anything else, options of the aggregator (``--model-kwargs``, e.g. ``dropout``,
``hidden_dim``), checked by building the model before anything is written.

Options that change the loss itself (``survival_loss``, ``event_weight``, ...) cannot be
searched: their validation losses are not comparable.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from wsi_mil.errors import ConfigError
from wsi_mil.mil.run import TrainConfig

__all__ = [
    "TRAIN_OPTIONS",
    "candidate_configs",
    "check_search",
    "chosen_per_fold",
    "parse_search",
    "pick_candidate",
]

#: Training options that ``--search`` may vary (everything else goes to the aggregator).
TRAIN_OPTIONS = (
    "lr",
    "weight_decay",
    "batch_size",
    "max_tiles",
    "steps",
    "warmup_steps",
    "patience",
    "grad_clip",
)


def _value(text: str) -> Any:
    """A candidate value: int, float, true/false/none, else the string."""
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def parse_search(specs: Sequence[str]) -> dict[str, list[Any]]:
    """Parse ``["lr=1e-3,3e-4", "dropout=0.1,0.25"]`` into ``{name: [values]}``.

    Raises:
        ConfigError: A spec without ``=``, without values, or a name given twice.
    """
    grid: dict[str, list[Any]] = {}
    for spec in specs:
        name, sep, values = spec.partition("=")
        name = name.strip().replace("-", "_")
        items = [v.strip() for v in values.split(",") if v.strip()]
        if not sep or not name or not items:
            raise ConfigError(
                f"--search {spec!r}: write NAME=V1,V2,... (e.g. --search lr=1e-3,3e-4 "
                "dropout=0.1,0.25)"
            )
        if name in grid:
            raise ConfigError(f"--search names {name!r} twice; give its values once")
        grid[name] = [_value(v) for v in items]
    return grid


def check_search(config: TrainConfig) -> None:
    """Refuse names that are options of the run but cannot be searched.

    Raises:
        ConfigError: Naming the option and what can be searched.
    """
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    for name, values in config.search.items():
        if name in fields and name not in TRAIN_OPTIONS:
            raise ConfigError(
                f"--search {name}: cannot be searched (it changes the loss or the data); "
                f"searchable training options: {', '.join(TRAIN_OPTIONS)}, or any "
                "aggregator option (e.g. dropout, hidden_dim)"
            )
        if not isinstance(values, list) or not values:
            raise ConfigError(f"--search {name}: give at least one value")


def candidate_configs(config: TrainConfig) -> list[tuple[dict[str, Any], TrainConfig]]:
    """``(params, config)`` of every combination of the grid, in the grid's order.

    Without a grid: ``[({}, config)]``.
    """
    if not config.search:
        return [({}, config)]
    names = list(config.search)
    out = []
    for combo in itertools.product(*(config.search[n] for n in names)):
        params = dict(zip(names, combo, strict=True))
        train = {k: v for k, v in params.items() if k in TRAIN_OPTIONS}
        model = {k: v for k, v in params.items() if k not in TRAIN_OPTIONS}
        cfg = dataclasses.replace(
            config, **train, model_kwargs={**config.model_kwargs, **model}, search={}
        )
        out.append((params, cfg))
    return out


def pick_candidate(val_losses: Sequence[float | None]) -> int | None:
    """Index of the lowest inner-validation loss (the first on ties), or None when no
    candidate could be scored (the inner validation set cannot rank them)."""
    scored = [(v, i) for i, v in enumerate(val_losses) if v is not None]
    return min(scored)[1] if scored else None


def chosen_per_fold(run_dir: Path, fold_dirs: Sequence[Path]) -> dict[str, Any]:
    """``{"<repeat>/<fold>": params}`` of the candidates chosen, read from ``fold.json``."""
    out: dict[str, Any] = {}
    for d in fold_dirs:
        meta = json.loads((d / "fold.json").read_text())
        if "search" in meta:
            key = str(d.relative_to(run_dir))
            out[key] = meta["search"]["chosen"]
    return out
