"""``sdray query``: ask a running ``sdray serve`` endpoint (standard library HTTP only).

    sdray query --url http://127.0.0.1:8000 --text "a red circle" [--k 10] [--mode hybrid]
    sdray query --url URL --image photo.jpg [--fusion rrf] [--json] [--token T]

Prints a ranked table (id, fused/dense/sparse scores, caption, top explanation terms), or the raw
JSON response with ``--json``. Exit status: 0 on success, 1 when the server answers with an error
(its message is printed), 2 on a usage error.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import sys
import urllib.error
import urllib.request


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", required=True, help="base URL of the endpoint, e.g. http://127.0.0.1:8000")
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--text", help="caption query (text -> images)")
    what.add_argument("--image", help="image file query (image -> captions)")
    parser.add_argument("--k", type=int, default=10, help="hits to return")
    parser.add_argument("--mode", choices=["hybrid", "dense", "sparse"], default="hybrid",
                        help="which scores rank the hits")
    parser.add_argument("--fusion", choices=["raw", "calibrated", "rrf"], default=None,
                        help="hybrid fusion method (default: the index's)")
    parser.add_argument("--w1", type=float, default=None, help="dense fusion weight")
    parser.add_argument("--w2", type=float, default=None, help="sparse fusion weight")
    parser.add_argument("--explain", type=int, default=None, help="explanation terms per hit")
    parser.add_argument("--token", default=os.environ.get("SDRAY_AUTH_TOKEN"), help="bearer token")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for the response")
    parser.add_argument("--json", action="store_true", help="print the JSON response")


def build_request(args: argparse.Namespace) -> dict:
    body: dict = {"k": args.k, "mode": args.mode}
    if args.text is not None:
        body["text"] = args.text
    else:
        with open(args.image, "rb") as f:
            body["image"] = base64.b64encode(f.read()).decode("ascii")
    fusion = {key: val for key, val in (("method", args.fusion), ("w1", args.w1), ("w2", args.w2))
              if val is not None}
    if fusion:
        body["fusion"] = fusion
    if args.explain is not None:
        body["explain"] = args.explain
    return body


def post_search(url: str, body: dict, token: str | None = None, timeout: float = 60.0) -> tuple[int, dict]:
    """``(HTTP status, JSON body)`` of ``POST {url}/v1/search``."""
    req = urllib.request.Request(url.rstrip("/") + "/v1/search", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"}, method="POST")
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as err:
        raw = err.read()
        try:
            return err.code, json.loads(raw)
        except ValueError:
            return err.code, {"error": raw.decode("utf-8", "replace")[:500]}


def format_hits(resp: dict) -> str:
    lines = [f"{resp.get('direction')} {resp.get('mode')}"
             + (f" ({resp['fusion']})" if resp.get("fusion") else "")
             + f", index {resp.get('index_version')}, {resp.get('took_ms', 0):.1f} ms"]
    lines.append(f"{'#':>3} {'id':<24} {'score':>9} {'dense':>8} {'sparse':>9}  caption / terms")
    for i, h in enumerate(resp.get("hits", []), 1):
        s = h["scores"]
        terms = ", ".join(f"{t['term']}({t['query'] * t['doc']:.2f})" for t in h.get("explanation", [])[:5])
        cap = (h.get("caption") or "")[:60]
        lines.append(f"{i:>3} {str(h['id'])[:24]:<24} {h['score']:>9.4f} {s['dense']:>8.4f} "
                     f"{s['sparse']:>9.3f}  {cap}")
        if terms:
            lines.append(f"{'':>48}terms: {terms}")
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    try:
        body = build_request(args)
    except OSError as err:
        print(f"sdray query: cannot read image: {err}", file=sys.stderr)
        return 2
    try:
        status, resp = post_search(args.url, body, args.token, args.timeout)
    except (urllib.error.URLError, OSError) as err:
        print(f"sdray query: cannot reach {args.url}: {err}", file=sys.stderr)
        return 1
    if status != 200:
        print(f"sdray query: HTTP {status}: {resp.get('error', resp)}", file=sys.stderr)
        return 1
    print(json.dumps(resp) if args.json else format_hits(resp))
    return 0
