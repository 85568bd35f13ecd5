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


def test_every_command_help_shows_every_default() -> None:
    import argparse

    from wsi_mil.workflows.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, command in sub.choices.items():
        text = " ".join(command.format_help().split())
        for action in command._actions:
            default = action.default
            if not action.option_strings or action.help == argparse.SUPPRESS:
                continue
            if default is None or default is False or default == "" or action.dest == "help":
                continue
            assert "default" in (action.help or "") or f"(default: {default})" in text, (
                f"wsi-mil {name} --help does not show the default of {action.option_strings}"
            )
