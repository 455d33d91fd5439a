"""A real-data development benchmark: icon sets published on npm, with their names and tags.

Nobody on this project drew these images. Five open icon sets name each icon and tag it with
search terms; where several sets draw the same concept (``heart``, ``camera``, ``umbrella``), a
caption of that concept has several relevant images, drawn by different designers::

    python benchmarks/realdata.py build OUT [--image-size 128] [--cache DIR]

fetches the pinned packages with ``npm pack`` into a cache folder (default
``~/.cache/sdray-realdata``; nothing is committed), renders every chosen SVG to PNG on a white
canvas with resvg (``pip install sdray[realdata]``), and writes WebDataset shards in the layout
sdray reads: ``OUT/{train,val,test}/shard-NNNNN.tar`` with ``KEY.png``, ``KEY.txt`` and
``KEY.json`` (``{"image_id", "concept", "set"}``), plus ``OUT/realdata.json`` (sources, counts).

* **Concepts** are icon names normalised to words (``arrow-big-right`` → ``arrow big right``),
  kept when at least ``--min-sets`` sets draw them (one image per set: its default style).
* **Captions**, per concept: the name itself, and the name followed by the search terms and tags
  of every set (most-shared first), in groups of ``--terms-per-caption``. Each caption is paired
  with every image of its concept (one sample per pair), so "some sample pairs them" makes all of
  a concept's images relevant to each of its captions.
* **Splits by concept** (a stable hash of the concept), so val and test concepts are unseen in
  training.

Sample keys are unique (``set-name-cK``); images are deduplicated by ``image_id`` (``set/name``).
Sources (pinned): Font Awesome Free (``metadata/icons.yml`` search terms; solid style), Tabler
(``icons.json`` tags; outline), Phosphor (catalogue tags in ``dist/index.mjs``; regular), Material
Design Icons (``meta.json`` aliases; base style), Lucide (``tags.json``).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import re
import subprocess
import sys
import tarfile
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Callable, Iterator

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from sdray.data.formats import tar_shard_bytes  # noqa: E402


@dataclass(frozen=True)
class Icon:
    """One drawing: its set, name, the SVG member inside the package, and its search terms."""

    set: str
    name: str
    member: str
    terms: tuple[str, ...]


@dataclass(frozen=True)
class Source:
    set: str
    package: str
    version: str
    read: Callable[[tarfile.TarFile], Iterator[Icon]]


def _json_member(tf: tarfile.TarFile, name: str):
    return json.load(tf.extractfile(name))


def _members(tf: tarfile.TarFile) -> set[str]:
    return set(tf.getnames())


def read_fontawesome(tf: tarfile.TarFile) -> Iterator[Icon]:
    import yaml

    meta = yaml.safe_load(tf.extractfile("package/metadata/icons.yml"))
    have = _members(tf)
    for name, m in meta.items():
        member = f"package/svgs/solid/{name}.svg"
        if "solid" not in (m.get("styles") or []) or member not in have:
            continue  # brands (logos) are not concepts
        terms = [str(t) for t in ((m.get("search") or {}).get("terms") or [])]
        yield Icon("fontawesome", str(name), member, tuple(terms + [str(m.get("label", ""))]))


def read_tabler(tf: tarfile.TarFile) -> Iterator[Icon]:
    have = _members(tf)
    for name, m in _json_member(tf, "package/icons.json").items():
        member = f"package/icons/outline/{name}.svg"
        if member in have:
            yield Icon("tabler", name, member, tuple(str(t) for t in m.get("tags") or []))


_PHOSPHOR_ENTRY = re.compile(r'name:\s*"([^"]+)".*?tags:\s*\[(.*?)\]', re.S)


def read_phosphor(tf: tarfile.TarFile) -> Iterator[Icon]:
    text = tf.extractfile("package/dist/index.mjs").read().decode("utf-8")
    have = _members(tf)
    for name, tags in _PHOSPHOR_ENTRY.findall(text):
        member = f"package/assets/regular/{name}.svg"
        if member in have:
            terms = [t for t in re.findall(r'"([^"]*)"', tags) if not t.startswith("*")]
            yield Icon("phosphor", name, member, tuple(terms))


def read_mdi(tf: tarfile.TarFile) -> Iterator[Icon]:
    have = _members(tf)
    for m in _json_member(tf, "package/meta.json"):
        name = m["name"]
        member = f"package/svg/{name}.svg"
        if m.get("deprecated") or name.endswith("-outline") or member not in have:
            continue  # one image per concept: the base style
        yield Icon("mdi", name, member, tuple(a.replace("-", " ") for a in m.get("aliases") or []))


def read_lucide(tf: tarfile.TarFile) -> Iterator[Icon]:
    have = _members(tf)
    for name, tags in _json_member(tf, "package/tags.json").items():
        member = f"package/icons/{name}.svg"
        if member in have:
            yield Icon("lucide", name, member, tuple(str(t) for t in tags))


SOURCES = (
    Source("fontawesome", "@fortawesome/fontawesome-free", "7.3.1", read_fontawesome),
    Source("tabler", "@tabler/icons", "3.51.0", read_tabler),
    Source("phosphor", "@phosphor-icons/core", "2.1.1", read_phosphor),
    Source("mdi", "@mdi/svg", "7.4.47", read_mdi),
    Source("lucide", "lucide-static", "1.62.0", read_lucide),
)


def fetch(source: Source, cache: str) -> str:
    """The package tarball in ``cache`` (``npm pack PKG@VERSION`` the first time)."""
    os.makedirs(cache, exist_ok=True)
    expect = source.package.lstrip("@").replace("/", "-") + f"-{source.version}.tgz"
    path = os.path.join(cache, expect)
    if not os.path.exists(path):
        out = subprocess.run(["npm", "pack", f"{source.package}@{source.version}", "--silent"],
                             cwd=cache, capture_output=True, text=True, check=True, timeout=600)
        got = out.stdout.strip().splitlines()[-1]
        if got != expect:
            raise RuntimeError(f"npm pack wrote {got!r}, expected {expect!r}")
    return path


def normalise(name: str) -> str:
    """``arrow-big-right`` → ``arrow big right``: the concept key shared across sets."""
    return " ".join(re.sub(r"[^a-z0-9]+", " ", name.lower()).split())


def is_concept(words: str) -> bool:
    """Names that describe a thing: at least one word of 3+ letters, not a bare code."""
    return any(len(w) >= 3 and w.isalpha() for w in words.split())


@dataclass
class Concept:
    words: str
    icons: list[Icon] = field(default_factory=list)

    def captions(self, terms_per_caption: int, max_captions: int) -> list[str]:
        """The name, then the name with groups of the sets' terms (most-shared first)."""
        counts: dict[str, int] = defaultdict(int)
        for icon in self.icons:
            for t in {normalise(t) for t in icon.terms}:
                if t and t != self.words and is_concept(t):
                    counts[t] += 1
        terms = sorted(counts, key=lambda t: (-counts[t], t))
        caps = [self.words]
        for k in range(0, len(terms), terms_per_caption):
            if len(caps) >= max_captions:
                break
            caps.append(f"{self.words}, " + ", ".join(terms[k:k + terms_per_caption]))
        return caps


def split_of(words: str, fractions: tuple[float, float]) -> str:
    """``train``/``val``/``test`` from a stable hash of the concept."""
    u = int.from_bytes(hashlib.blake2b(words.encode(), digest_size=8).digest(), "little") / 2**64
    return "train" if u < fractions[0] else "val" if u < fractions[0] + fractions[1] else "test"


def render_png(svg: bytes, size: int) -> bytes:
    """SVG → RGB PNG of ``size``×``size`` on white (resvg; no torch)."""
    import resvg_py
    from PIL import Image

    png = resvg_py.svg_to_bytes(svg_string=svg.decode("utf-8"), width=size, height=size,
                                background="#ffffff")
    out = io.BytesIO()
    Image.open(io.BytesIO(bytes(png))).convert("RGB").save(out, format="PNG", optimize=True)
    return out.getvalue()


def collect(cache: str, min_sets: int) -> tuple[dict[str, Concept], dict[str, tarfile.TarFile]]:
    concepts: dict[str, Concept] = {}
    archives = {}
    for source in SOURCES:
        tf = tarfile.open(fetch(source, cache), "r:gz")
        archives[source.set] = tf
        seen = set()
        for icon in source.read(tf):
            words = normalise(icon.name)
            if not is_concept(words) or words in seen:
                continue
            seen.add(words)
            concepts.setdefault(words, Concept(words)).icons.append(icon)
    kept = {w: c for w, c in concepts.items() if len(c.icons) >= min_sets}
    return kept, archives


def build(args: argparse.Namespace) -> dict:
    t0 = time.time()
    concepts, archives = collect(args.cache, args.min_sets)
    fractions = (args.train_fraction, args.val_fraction)
    by_split: dict[str, list[dict]] = {"train": [], "val": [], "test": []}
    stats = {s: {"concepts": 0, "images": 0, "captions": 0, "pairs": 0} for s in by_split}
    for words in sorted(concepts):
        c = concepts[words]
        split = split_of(words, fractions)
        caps = c.captions(args.terms_per_caption, args.captions_per_concept)
        st = stats[split]
        st["concepts"] += 1
        st["captions"] += len(caps)
        for icon in sorted(c.icons, key=lambda i: i.set):
            svg = archives[icon.set].extractfile(icon.member).read()
            try:
                png = render_png(svg, args.image_size)
            except ValueError as err:  # an SVG resvg cannot parse: skipped and counted
                stats.setdefault("skipped_svgs", []).append(f"{icon.set}/{icon.name}: {err}")
                continue
            st["images"] += 1
            image_id = f"{icon.set}/{icon.name}"
            for k, cap in enumerate(caps):
                key = re.sub(r"[^a-z0-9_-]", "_", f"{icon.set}-{icon.name}-c{k}")
                by_split[split].append({"key": key, "image": png, "ext": "png", "caption": cap,
                                        "meta": {"image_id": image_id, "concept": words,
                                                 "set": icon.set}})
                st["pairs"] += 1
    for split, samples in by_split.items():
        folder = os.path.join(args.out, split)
        os.makedirs(folder, exist_ok=True)
        for k, a in enumerate(range(0, len(samples), args.shard_size)):
            with open(os.path.join(folder, f"shard-{k:05d}.tar"), "wb") as f:
                f.write(tar_shard_bytes(samples[a:a + args.shard_size]))
    summary = {"sources": [{"set": s.set, "package": s.package, "version": s.version}
                           for s in SOURCES],
               "image_size": args.image_size, "min_sets": args.min_sets,
               "captions_per_concept": args.captions_per_concept,
               "terms_per_caption": args.terms_per_caption, "splits": stats,
               "seconds": round(time.time() - t0, 1)}
    with open(os.path.join(args.out, "realdata.json"), "w") as f:
        json.dump(summary, f, indent=2)
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="fetch, render and write the shards")
    b.add_argument("out")
    b.add_argument("--cache", default=os.path.expanduser("~/.cache/sdray-realdata"))
    b.add_argument("--image-size", type=int, default=128)
    b.add_argument("--min-sets", type=int, default=2, help="sets that must draw a concept")
    b.add_argument("--captions-per-concept", type=int, default=2)
    b.add_argument("--terms-per-caption", type=int, default=4)
    b.add_argument("--train-fraction", type=float, default=0.6)
    b.add_argument("--val-fraction", type=float, default=0.1)
    b.add_argument("--shard-size", type=int, default=2000)
    args = parser.parse_args(argv)
    if not (0 < args.train_fraction and 0 <= args.val_fraction
            and args.train_fraction + args.val_fraction < 1):
        parser.error("--train-fraction and --val-fraction must leave a test split")
    summary = build(args)
    for split, st in summary["splits"].items():
        if isinstance(st, dict):
            print(f"realdata: {split}: {st['concepts']} concepts, {st['images']} images, "
                  f"{st['captions']} captions, {st['pairs']} pairs")
    print(f"realdata: wrote {args.out} in {summary['seconds']}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
