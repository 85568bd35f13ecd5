"""The ``wsi-mil`` front end: every command is registered and user errors exit 2."""

from __future__ import annotations

import pytest

from wsi_mil.workflows.cli import COMMANDS, build_parser, main


def test_every_command_is_registered(capsys):
    parser = build_parser()
    with pytest.raises(SystemExit) as exc:
        parser.parse_args(["--help"])
    assert exc.value.code == 0
    help_text = capsys.readouterr().out
    for name in COMMANDS:
        assert name in help_text


@pytest.mark.parametrize("name", COMMANDS)
def test_each_command_has_help(name, capsys):
    with pytest.raises(SystemExit) as exc:
        main([name, "--help"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: wsi-mil {name}")


def test_user_error_is_one_line_and_exit_2(tmp_path, capsys):
    assert main(["info", str(tmp_path / "missing.svs")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("wsi-mil info: error:") and "missing.svs" in err
    assert "\n" not in err and "Traceback" not in err
