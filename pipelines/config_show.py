"""``sdray config show``: print a resolved configuration (what a run would use).

    sdray config show [--kind train|index|serve] [--config FILE|PRESET] [--set KEY=VALUE ...] [--format yaml|json]

``train``: :class:`sdray.config.SdrayConfig` (presets: blip-coco, ...); ``index``:
:class:`sdray.index.config.IndexConfig`; ``serve``: :class:`serve.config.ServeConfig` (``index``
may be left out here). ``--set`` takes dotted keys with YAML values, as on ``train``/``index``/``serve``.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

import yaml

from sdray.config import ConfigError

KINDS = ("train", "index", "serve")


def parse_sets(items: list[str]) -> dict[str, Any]:
    """``["a.b=1", "c=x"]`` -> ``{"a.b": 1, "c": "x"}`` (values parsed as YAML)."""
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--set expects KEY=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        out[key.strip()] = yaml.safe_load(value)
    return out


def apply_sets(data: dict, items: list[str]) -> dict:
    """A copy of nested ``data`` with every dotted ``--set`` key assigned."""
    out = json.loads(json.dumps(data, default=str))
    for key, value in parse_sets(items).items():
        node = out
        *parents, leaf = key.split(".")
        for part in parents:
            if not isinstance(node.setdefault(part, {}), dict):
                raise ConfigError(f"--set {key}: '{part}' is not a section")
            node = node[part]
        node[leaf] = value
    return out


def _read(path: str | None) -> dict:
    if not path:
        return {}
    with open(path, encoding="utf-8") as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of config fields")
    return data


def resolve(kind: str, config: str | None, sets: list[str]) -> dict:
    """The validated config of ``kind`` as a plain dict."""
    from pydantic import ValidationError

    if kind == "train":
        from sdray import config as config_lib

        base = config_lib.load(config) if config else config_lib.SdrayConfig()
        return config_lib.with_overrides(base, parse_sets(sets)).model_dump()
    if kind == "index":
        from sdray.index.config import IndexConfig as model_cls
    else:
        from serve.config import ServeConfig as model_cls
    data = _read(config)
    if kind == "serve":
        if "applications" in data:  # a Serve config YAML: the app's args
            data = dict(data["applications"][0].get("args") or {})
        data.setdefault("index", "INDEX_URI")
    try:
        return model_cls.model_validate(apply_sets(data, sets)).model_dump()
    except ValidationError as err:
        raise ConfigError(f"bad {kind} config: {err}") from err


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    p = sub.add_parser("show", help="print the resolved config", formatter_class=parser.formatter_class)
    p.add_argument("--kind", choices=KINDS, default="train", help="which config")
    p.add_argument("--config", default=None, help="YAML/JSON file (train: also a preset name)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="dotted override with a YAML value (repeatable)")
    p.add_argument("--format", choices=["yaml", "json"], default="yaml", help="output format")


def main(args: argparse.Namespace) -> int:
    data = resolve(args.kind, args.config, args.set)
    if args.format == "json":
        print(json.dumps(data, sort_keys=True, default=str))
    else:
        print(yaml.safe_dump(data, sort_keys=False).rstrip())
    return 0
