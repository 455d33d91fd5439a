"""The `sdray` command line: subcommands of DESIGN §4 and the not-built-yet contract."""

import subprocess
import sys

import pytest

from pipelines import cli

DESIGN_SUBCOMMANDS = ["demo", "synth", "featurize", "train", "eval", "index", "serve", "query"]


def test_help_lists_every_subcommand_of_the_design():
    out = subprocess.run([sys.executable, "-m", "pipelines.cli", "--help"],
                         capture_output=True, text=True, check=True).stdout
    for name in DESIGN_SUBCOMMANDS:
        assert f"    {name}" in out


def test_a_subcommand_whose_module_is_missing_says_so_and_fails(monkeypatch, capsys):
    monkeypatch.setitem(cli.SUBCOMMANDS, "demo", ("pipelines._no_such_stage", "x"))
    assert cli.main(["demo"]) == 2
    assert "not built yet" in capsys.readouterr().err


def test_unknown_subcommand_is_a_usage_error():
    with pytest.raises(SystemExit) as exc:
        cli.main(["frobnicate"])
    assert exc.value.code == 2
