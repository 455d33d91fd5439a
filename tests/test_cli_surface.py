"""CLI operability: help text on every flag, --version, config show, logging, exit codes."""

import argparse
import json
import logging
import subprocess
import sys

import pytest

from pipelines import cli
from sdray.errors import TrainingFailed


def _parsers():
    """Every subcommand's parser, including nested actions (index list/rollback/gc, config show)."""
    yield "sdray", cli._top_parser()
    for command in cli.SUBCOMMANDS:
        module = cli._load(cli.SUBCOMMANDS[command][0])
        yield f"sdray {command}", cli.build_parser(command, module)
    versions = cli._load(cli.INDEX_VERSIONS)
    yield "sdray index (versions)", cli.build_parser("index", versions)


def _walk(name, parser):
    yield name, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub_name, sub in action.choices.items():
                yield from _walk(f"{name} {sub_name}", sub)


def test_every_flag_of_every_subcommand_has_help_text():
    missing, checked = [], 0
    for name, top in _parsers():
        for pname, parser in _walk(name, top):
            for action in parser._actions:
                if not action.option_strings or isinstance(action, argparse._HelpAction):
                    continue
                checked += 1
                if action.help is None or not str(action.help).strip():
                    missing.append(f"{pname} {'/'.join(action.option_strings)}")
    assert checked > 100
    assert not missing, f"flags without help: {missing}"


def test_help_shows_defaults():
    module = cli._load("pipelines.export")
    text = cli.build_parser("export", module).format_help()
    assert "(default: images)" in text and "(default: 10)" in text
    assert "--model MODEL         model URI" in text and "--model MODEL         model URI (folder or s3:// prefix) (default" not in text


def test_version():
    out = subprocess.run([sys.executable, "-m", "pipelines.cli", "--version"], capture_output=True, text=True)
    from sdray import __version__

    assert out.returncode == 0 and out.stdout.strip() == f"sdray {__version__}"


def test_config_show_resolves_presets_and_sets(capsys, tmp_path):
    assert cli.main(["config", "show", "--config", "blip-coco", "--set", "loss.q_reg=0.002", "--format", "json"]) == 0
    cfg = json.loads(capsys.readouterr().out)
    assert cfg["loss"]["q_reg"] == 0.002 and cfg["backbone"]["name"] == "blip" and cfg["loss"]["w1"] == 0.1
    (tmp_path / "serve.yaml").write_text("index: /x\nport: 9000\n")
    assert cli.main(["config", "show", "--kind", "serve", "--config", str(tmp_path / "serve.yaml"),
                     "--set", "encoder.max_replicas=3", "--format", "json"]) == 0
    serve = json.loads(capsys.readouterr().out)
    assert serve["port"] == 9000 and serve["encoder"]["max_replicas"] == 3 and serve["index"] == "/x"
    assert cli.main(["config", "show", "--kind", "index", "--set", "candidates=77", "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out)["candidates"] == 77


@pytest.mark.parametrize("argv,code,words", [
    (["config", "show", "--set", "optim.lr=7"], cli.EXIT_CONFIG, "bad configuration"),
    (["config", "show", "--set", "nonsense"], cli.EXIT_CONFIG, "KEY=VALUE"),
    (["config", "show", "--kind", "index", "--set", "candidates=[1"], cli.EXIT_CONFIG, "bad configuration"),
    (["config", "show", "--config", "/nonexistent/x.yaml"], cli.EXIT_STORAGE, "storage error"),
])
def test_known_failures_end_in_one_line_and_their_exit_code(argv, code, words, capsys):
    assert cli.main(argv) == code
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and words in err and "Traceback" not in err


def test_debug_shows_the_traceback():
    with pytest.raises(Exception, match="less than or equal"):
        cli.main(["--debug", "config", "show", "--set", "optim.lr=7"])


def test_failure_kinds():
    from sdray.config import ConfigError
    from sdray.storage import StorageError

    assert cli.classify(TrainingFailed("x")) == "training"
    assert cli.classify(StorageError("s3://b/k: refused")) == "storage"
    assert cli.classify(ConfigError("bad")) == "config"
    assert cli.classify(ZeroDivisionError()) == "other"
    assert len({cli.EXIT_CONFIG, cli.EXIT_STORAGE, cli.EXIT_TRAINING, cli.EXIT_ERROR, cli.EXIT_USAGE}) == 5


def test_training_failure_exit_code(monkeypatch, capsys):
    import pipelines.export as export

    def boom(args):
        raise TrainingFailed("worker group failed 3 times")

    monkeypatch.setattr(export, "main", boom)
    assert cli.main(["export", "--model", "m", "--corpus", "c", "--out", "o"]) == cli.EXIT_TRAINING
    assert "training failed: worker group failed 3 times" in capsys.readouterr().err


def test_log_level_and_quiet_configure_the_sdray_loggers(monkeypatch):
    import pipelines.export as export

    seen = {}
    monkeypatch.setattr(export, "main", lambda args: seen.update(
        level=logging.getLogger("sdray").level, quiet=getattr(args, "quiet", False)) or 0)
    assert cli.main(["--log-level", "debug", "export", "--model", "m", "--corpus", "c", "--out", "o"]) == 0
    assert seen["level"] == logging.DEBUG
    assert cli.main(["export", "--model", "m", "--corpus", "c", "--out", "o", "--quiet"]) == 0
    assert seen["level"] == logging.WARNING and seen["quiet"] is True


def test_serve_set_overrides_flags_and_file(tmp_path):
    from pipelines import serve as serve_cli

    parser = cli.build_parser("serve", serve_cli)
    args = parser.parse_args(["--index", "/idx", "--encoder-max-replicas", "3", "--set", "encoder.max_replicas=5",
                              "--set", "batch.max_batch_size=8", "--set", "k_max=50"])
    cfg = serve_cli.config_from_args(args)
    assert cfg.encoder.max_replicas == 5 and cfg.batch.max_batch_size == 8 and cfg.k_max == 50
    args = parser.parse_args(["--index", "/idx", "--set", "k_max=-1"])
    with pytest.raises(ValueError):
        serve_cli.config_from_args(args)


def test_index_set_overrides_the_config_file(tmp_path):
    from pipelines import index as index_job

    (tmp_path / "i.yaml").write_text("candidates: 40\ndense: {kind: ivf}\n")
    cfg = index_job.load_config(str(tmp_path / "i.yaml"), ["sparse.kind=exact", "candidates=60"])
    assert cfg.candidates == 60 and cfg.dense.kind == "ivf" and cfg.sparse.kind == "exact"
    assert index_job.load_config(None).candidates != 60
    with pytest.raises(ValueError):
        index_job.load_config(None, ["dense.kind=nope"])
    args = cli.build_parser("index", index_job).parse_args(
        ["--model", "m", "--corpus", "c", "--out", "o", "--set", "candidates=7"])
    assert args.set == ["candidates=7"]
