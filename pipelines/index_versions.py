"""``sdray index list|rollback|gc``: the versions of a published index (sdray.index.versions).

    sdray index list INDEX_ROOT [--json]
    sdray index rollback VERSION INDEX_ROOT
    sdray index gc --keep N INDEX_ROOT [--dry-run] [--config FILE] [--set KEY=VALUE]

gc keeps versions that readers lease (a running ``sdray serve``) and young versions:
:class:`sdray.index.leases.LeaseConfig` (``--set min_age_s=0``, ``--set clock_skew_s=120``).

``sdray index --model ... --corpus ... --out ...`` (building an index) is pipelines/index.py;
pipelines/cli.py routes here when the first argument is one of :data:`ACTIONS`.
"""

from __future__ import annotations

import argparse
import json
import logging

ACTIONS = ("list", "rollback", "gc")
log = logging.getLogger("pipelines.index_versions")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    p = sub.add_parser("list", help="every version, newest first, with its state",
                       formatter_class=parser.formatter_class)
    p.add_argument("root", metavar="INDEX_ROOT", help="index root (folder or s3:// prefix with CURRENT.json)")
    p.add_argument("--json", action="store_true", help="print the versions as one JSON list")
    p = sub.add_parser("rollback", help="make an older published version current",
                       formatter_class=parser.formatter_class)
    p.add_argument("version", metavar="VERSION", help="a published version name (see 'sdray index list')")
    p.add_argument("root", metavar="INDEX_ROOT", help="index root (folder or s3:// prefix)")
    p = sub.add_parser("gc", help="delete old versions, keeping the newest N and the current one",
                       formatter_class=parser.formatter_class)
    p.add_argument("root", metavar="INDEX_ROOT", help="index root (folder or s3:// prefix)")
    p.add_argument("--keep", type=int, required=True, help="published versions to keep (newest first)")
    p.add_argument("--dry-run", action="store_true", help="only print what would be deleted")
    p.add_argument("--config", default=None, help="YAML/JSON file of LeaseConfig fields (min_age_s, "
                   "clock_skew_s, ...)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="LeaseConfig override, e.g. --set min_age_s=0 (repeatable; after --config)")


def _table(versions) -> str:
    lines = [f"{'VERSION':<28} {'STATE':<10} {'FLAGS':<16} {'IMAGES':>8} {'CAPTIONS':>9}  CREATED"]
    for v in versions:
        flags = ",".join(f for f, on in (("current", v.current), ("building", v.building)) if on) or "-"
        counts = v.counts or {}
        lines.append(f"{v.version:<28} {v.state:<10} {flags:<16} {counts.get('images', '-')!s:>8} "
                     f"{counts.get('captions', '-')!s:>9}  {v.created or '-'}")
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    from sdray.index import versions as ver

    if args.action == "list":
        found = ver.list_versions(args.root)
        print(json.dumps([v.to_dict() for v in found]) if args.json else _table(found))
    elif args.action == "rollback":
        pointer = ver.rollback(args.root, args.version)
        print(f"{args.root}: current version is now {pointer['version']}")
    else:
        result = ver.gc(args.root, args.keep, dry_run=args.dry_run, config=_lease_config(args))
        verb = "would delete" if args.dry_run else "deleted"
        print(f"{args.root}: {verb} {len(result.deleted)} version(s)"
              + "".join(f"\n  {v}" for v in result.deleted)
              + "".join(f"\n  kept {v}: {why}" for v, why in result.kept.items()))
    return 0


def _lease_config(args: argparse.Namespace):
    from pipelines.config_show import _read, apply_sets
    from sdray.index.leases import LeaseConfig

    return LeaseConfig.model_validate(apply_sets(_read(args.config), args.set))
