"""``wsi-mil init`` and ``run --config``: the template round trip and the refusals."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from wsi_mil.errors import ConfigError
from wsi_mil.workflows.cli import build_parser, main
from wsi_mil.workflows.config import load_config_file, resolve_config, run_options


def test_init_writes_every_key_and_refuses_to_overwrite(tmp_path: Path, capsys) -> None:
    path = tmp_path / "study.yaml"
    assert main(["init", str(path)]) == 0
    data = yaml.safe_load(path.read_text())
    text = path.read_text()
    for opt in run_options():
        section = data[opt.section] if opt.section else data
        assert opt.name in section, opt.key
        assert section[opt.name] == opt.default, opt.key
    assert all("  # " in line for line in text.splitlines() if ": " in line and "#" != line[0])
    assert load_config_file(path) == {  # the template sets only defaults
        k: v for k, v in {o.key: o.default for o in run_options()}.items() if v is not None
    }
    capsys.readouterr()
    assert main(["init", str(path)]) == 2
    assert "already exists" in capsys.readouterr().err


def test_edited_template_is_read_and_flags_override(tmp_path: Path) -> None:
    path = tmp_path / "conf" / "study.yaml"
    path.parent.mkdir()
    assert main(["init", str(path)]) == 0
    text = path.read_text()
    text = text.replace("slides: null", "slides: ../slides").replace("out: null", "out: out")
    text = text.replace("cohort: null", "cohort: cohort.csv")
    text = text.replace("  lr: 0.001", "  lr: 0.005").replace("  tile_px: 224", "  tile_px: 64")
    text = text.replace("  clinical: ''", "  clinical: [age, stage]")
    path.write_text(text)
    args = build_parser().parse_args(["run", "--config", str(path), "--lr", "0.01"])
    values = resolve_config(args)
    assert values["slides"] == str((tmp_path / "slides").resolve())  # relative to the file
    assert values["cohort"] == str((path.parent / "cohort.csv").resolve())
    assert values["tile.tile_px"] == 64 and values["train.lr"] == 0.01  # the flag wins
    assert values["train.clinical"] == "age,stage"
    args = build_parser().parse_args(["run", "s", "c.csv", "--config", str(path)])
    assert resolve_config(args)["slides"] == "s"  # positional over the file


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ("train:\n  lrr: 0.1\n", "train.lrr: unknown key, did you mean train.lr"),
        ("tile:\n  tile_px: big\n", "tile.tile_px: expected an integer, got 'big'"),
        ("train:\n  scale: 3\n", "train.scale: expected true or false"),
        ("tile:\n  pixels: png\n", "tile.pixels: 'png' is not one of lossless, jpeg, none"),
        ("train: 5\n", "train: expected a section of keys"),
        ("outt: x\n", "outt: unknown key, did you mean out"),
        ("slides: [unclosed\n", "not valid YAML"),
    ],
)
def test_bad_files_are_refused_naming_the_key(tmp_path: Path, body: str, expected: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(body)
    with pytest.raises(ConfigError, match=r"bad\.yaml") as err:
        load_config_file(path)
    assert expected in str(err.value)


def test_run_with_a_bad_config_exits_2_in_one_line(tmp_path: Path, capsys) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  lrr: 0.1\n")
    assert main(["run", "--config", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "train.lrr: unknown key, did you mean train.lr" in err


def test_missing_inputs_are_named(tmp_path: Path, capsys) -> None:
    assert main(["run", "--out", str(tmp_path)]) == 2
    assert "SLIDES" in capsys.readouterr().err
