"""Do feature shards fit a config? Backbone and preprocessing recorded by featurize, checked by
train and index.

Features are a function of the backbone *and* of its preprocessing: the same BLIP weights give
other image features at 224 px than at 384 px, and other caption features at 32 tokens than at
35. ``sdray featurize`` writes :func:`feature_signature` into its manifest; ``sdray train`` and
``sdray index`` call :func:`check_features` before using feature shards, so a mismatch fails at
start with both values named instead of training a model on features it will never see at
query time.
"""

from __future__ import annotations

from typing import Any

from sdray.config import BackboneConfig

#: the fields that must agree (``path`` may name one model in two ways: a hub id or a folder)
CHECKED = ("backbone", "image_size", "max_text_length")


class FeatureMismatch(ValueError):
    """Feature shards were made with another backbone or preprocessing than the config asks for."""


def feature_signature(cfg: BackboneConfig) -> dict[str, Any]:
    """What the features of ``cfg`` depend on: backbone kind and path, image size, caption length."""
    return {"backbone": cfg.name, "path": cfg.path, "image_size": int(cfg.image_size),
            "max_text_length": int(cfg.max_text_length)}


def manifest_signature(manifest: dict[str, Any]) -> dict[str, Any] | None:
    """The signature a feature manifest records (``preprocessing``, or the older ``backbone``
    block of a manifest written before it existed); ``None`` when it records neither."""
    pre = manifest.get("preprocessing")
    if isinstance(pre, dict) and all(k in pre for k in CHECKED):
        return pre
    bb = manifest.get("backbone")
    if isinstance(bb, dict) and {"name", "image_size", "max_text_length"} <= set(bb):
        return feature_signature(BackboneConfig.model_validate(bb))
    return None


def check_features(manifest: dict[str, Any], cfg: BackboneConfig, features: str, user: str) -> None:
    """Raise :class:`FeatureMismatch` when the features at ``features`` (their ``manifest``) were
    not made with ``cfg``; ``user`` names who asks (e.g. ``"the training config"``).

    The message names both values of every field that differs, and how to fix it.
    """
    recorded = manifest_signature(manifest)
    if recorded is None:
        raise FeatureMismatch(f"{features}: the feature manifest records no backbone or "
                              "preprocessing; featurize the data again with this sdray")
    wanted = feature_signature(cfg)
    diffs = [f"{k} {recorded[k]!r} in the features vs {wanted[k]!r} in {user}"
             for k in CHECKED if recorded[k] != wanted[k]]
    if diffs:
        flags = " ".join(f"--{k.replace('_', '-')} {wanted[k]}" for k in CHECKED
                         if recorded[k] != wanted[k])
        raise FeatureMismatch(f"{features} does not fit {user}: " + "; ".join(diffs)
                              + f" (featurize again with {flags}, or change {user} to match)")


def find_feature_manifest(uri: str, levels: int = 2) -> tuple[str, dict[str, Any]] | None:
    """``(manifest URI, manifest)`` of the featurize output holding ``uri``: its own
    ``manifest.json`` or one up to ``levels`` parents above (``--train OUT/train`` is one split
    of ``OUT``); ``None`` when there is none (features made by hand)."""
    from sdray import storage

    here = uri.rstrip("/")
    for _ in range(levels + 1):
        candidate = storage.join(here, "manifest.json")
        if storage.exists(candidate):
            manifest = storage.read_json(candidate)
            if isinstance(manifest, dict) and manifest.get("kind") == "sdray.features":
                return candidate, manifest
        parent = here.rsplit("/", 1)[0] if "/" in here.split("://", 1)[-1] else here
        if parent == here:
            break
        here = parent
    return None


def check_feature_uri(uri: str, cfg: BackboneConfig, user: str) -> bool:
    """:func:`check_features` on the manifest of the features at ``uri``; returns False (nothing
    to check against) when they have no featurize manifest."""
    found = find_feature_manifest(uri)
    if found is None:
        return False
    check_features(found[1], cfg, uri, user)
    return True
