"""Typed configuration for every sdray knob, with the paper's presets.

One :class:`SdrayConfig` describes a run: the backbone, the trainable heads, the loss, the
optimiser, the data pipeline, search-time fusion and checkpoint selection. Every field has a
default that works on the embedded setup (2 CPU cores, packaged backbone, generated data).
Unknown keys and out-of-range values are rejected with a :class:`ConfigError` whose message
names the offending key (``loss.w1: ...``).

Presets ``blip-coco``, ``blip-flickr``, ``albef-coco`` and ``albef-flickr`` reproduce the official
training of Song et al. (CIKM 2025): the per-setting values from the authors' configs (DESIGN.md
§1), the undetached teacher with the official orientation, no sparsity budget and the fixed
``w1·cos + w2·sparse`` fusion. ``blip-coco-sdray`` etc. are sdray's variants of them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, ValidationError, model_validator


class ConfigError(ValueError):
    """A configuration that does not validate; the message names each bad key."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class BackboneConfig(_Strict):
    """Which frozen vision-language backbone produces the pre-projection features."""

    name: Literal["packaged", "clip", "blip", "siglip"] = "packaged"
    path: str | None = Field(
        None, description="Hub id or local folder for clip/blip/siglip; unused for 'packaged'."
    )
    image_size: int = Field(224, ge=32, le=1024, description="Square input side in pixels.")
    max_text_length: int = Field(32, ge=4, le=512, description="Caption tokens after truncation.")

    @model_validator(mode="after")
    def _path_for_hub_models(self) -> "BackboneConfig":
        if self.name != "packaged" and not self.path:
            raise ValueError(f"backbone.path is required for backbone '{self.name}'")
        return self


class HeadConfig(_Strict):
    """The trainable part: per-modality dense projections and the shared sparse head."""

    dense_dim: int | None = Field(
        None, ge=8, le=4096,
        description="Size of fresh final layers (packaged backbone; default 256). Hub backbones "
        "keep their own projection, whose size this must equal when set.")
    sparse_hidden: int | None = Field(
        None, ge=8, le=8192, description="Sparse head hidden size; default: the word-embedding "
        "size, which it must equal while init_vocab_from_embeddings is true."
    )
    init_vocab_from_embeddings: bool = Field(
        True, description="Start the sparse head's vocabulary projector as a copy of the text "
        "tower's word embeddings (DESIGN.md §1); false: a fresh nn.Linear init.")
    tau_init: float = Field(0.07, gt=0.0, le=1.0)
    tau_min: float = Field(0.001, gt=0.0, le=1.0)
    tau_max: float = Field(0.5, gt=0.0, le=1.0)
    topk_text: int | None = Field(
        256, ge=1, description="A served caption vector keeps at most this many terms (eval, index, "
        "export, serve); training's validation sees uncapped vectors unless selection.vectors is "
        "'served', so selection.max_nnz judges the model's own sparsity. None: no cap.")
    topk_image: int | None = Field(256, ge=1, description="The same cap per image vector.")

    @model_validator(mode="after")
    def _tau_range(self) -> "HeadConfig":
        if not self.tau_min <= self.tau_init <= self.tau_max:
            raise ValueError("heads.tau_init must lie in [heads.tau_min, heads.tau_max]")
        return self


class LossConfig(_Strict):
    """Training objective (DESIGN.md §1): ``joint``, or the baselines ``dense`` and ``d2s``."""

    method: Literal["dense", "d2s", "joint"] = "joint"
    # Defaults tuned on generated data with the packaged backbone (docs/sweep.md); the official
    # BLIP/ALBEF values live in the presets.
    w1: float = Field(1.0, ge=0.0, le=100.0, description="Dense weight in s_int (official 0.1: "
                      "a teacher 10x softer than s_dense; docs/sweep.md).")
    w2: float = Field(0.1, ge=0.0, le=100.0, description="Sparse weight in s_int.")
    lambda1: float = Field(0.9, ge=0.0, le=100.0, description="Weight of the dense terms.")
    lambda2: float = Field(0.9, ge=0.0, le=100.0, description="Weight of the sparse terms.")
    q_reg: float = Field(3e-3, ge=0.0, le=10.0, description="Caption sparsity weight.")
    d_reg: float = Field(3e-3, ge=0.0, le=10.0, description="Image sparsity weight.")
    regularizer: Literal["l1", "flops"] = Field(
        "l1", description="Sparsity regulariser of joint (q_reg, d_reg); d2s uses d2s_regularizer.")
    reg_warmup_fraction: float = Field(0.2, ge=0.0, le=1.0)
    detach_teacher: bool = True
    teacher_orientation: Literal["correct", "official"] = "correct"
    expansion_control: bool = Field(False, description="Expansion control in joint: off, as in the "
                                    "paper; on, captions train masked but test expanded (docs/sweep.md).")
    expansion_end_fraction: float = Field(0.95, gt=0.0, le=1.0)
    d2s_l1: float = Field(1e-3, ge=0.0, le=10.0, description="Sparsity weight of the d2s baseline "
                          "(captions and images; q_reg/d_reg are joint's).")
    d2s_regularizer: Literal["l1", "flops"] = Field(
        "l1", description="Sparsity regulariser of the d2s baseline (D2S: L1); 'regularizer' is "
        "joint's, so the joint default can change without changing the baseline.")
    d2s_expansion_control: bool = Field(True, description="Expansion control in d2s (as in D2S).")


class OptimConfig(_Strict):
    """AdamW with linear warm-up then linear decay, as in the official code."""

    lr: float = Field(2e-3, gt=0.0, le=1.0, description="Fresh final layers need more than the "
                      "official 5e-5 (docs/sweep.md).")
    method_lr: dict[Literal["dense", "d2s", "joint"], float] = Field(
        default_factory=lambda: {"joint": 5e-4},
        description="Per-method learning rate; overrides optim.lr (joint: 5e-4, docs/sweep.md).")
    sparse_head_lr: float | None = Field(
        None, gt=0.0, le=1.0, description="joint: lr of the sparse head (its own AdamW param group, "
        "same warm-up/decay as the projections and tau); default: the method's lr (docs/sweep.md).")
    weight_decay: float = Field(0.05, ge=0.0, le=1.0)
    warmup_fraction: float = Field(0.2, ge=0.0, le=1.0)
    grad_clip: float = Field(1.0, gt=0.0)
    batch_size: int = Field(256, ge=2, le=65536)
    epochs: int = Field(10, ge=1, le=10000)
    amp: bool = Field(True, description="fp16 autocast when a GPU is used.")
    seed: int = Field(0, description="Seeds the fresh heads (sparse head; the packaged backbone's "
                      "projections), the data order (Ray Data block order and shuffle buffers) and "
                      "the expansion-control draws: one seed, one run.")
    sparse_gather: Literal["auto", "dense", "bf16", "topk"] = Field(
        "auto", description="How sparse vectors cross workers: auto = exact top-k pairs when "
        "smaller than the dense rows, else fp32 rows; bf16 halves the bytes (lossy).")


class DataConfig(_Strict):
    """How shards are read: shuffling, bad-input limits and reader parallelism."""

    shuffle_files: bool = True
    shuffle_buffer: int = Field(1024, ge=0)
    max_image_pixels: int = Field(40_000_000, ge=1, description="Decompression-bomb limit.")
    max_caption_bytes: int = Field(4096, ge=1)
    read_batch_size: int = Field(64, ge=1)
    epoch_cache_max_bytes: int = Field(
        2 << 30, ge=0, description="Training on features: a worker keeps its first epoch's rows in "
        "memory, up to this many bytes, and replays them in a seeded order in later epochs instead "
        "of re-reading the shards (sdray/data/epoch_cache.py). 0: read every epoch.")
    direct_read_max_bytes: int = Field(
        256 << 20, ge=0, description="Training on features: a train split whose Parquet files total "
        "at most this many bytes is read by each worker itself (pyarrow, no Ray Data pipeline to "
        "start: on the demo's d2s run, 39 → 23 s to the first validation) and every epoch "
        "replays the worker's seeded share from memory. Each worker reads the whole split. "
        "0: always stream through Ray Data.")


class FusionConfig(_Strict):
    """Search-time hybrid scoring (DESIGN.md §1, "Scoring at search time")."""

    method: Literal["raw", "calibrated", "rrf"] = "calibrated"
    normalize: Literal["zscore"] | None = Field(
        None, description="calibrated only: per-query z-scores of both scores; over an index they "
        "are taken on the candidate set, so they depend on the candidate depth.")
    w1: float | None = Field(1.0, ge=0.0, description="Weight of cos/τ; None: loss.w1. Default 1 "
                             "with w2 = 1: the sum of the two trained logits (docs/sweep.md).")
    w2: float | None = Field(1.0, ge=0.0, description="Weight of the sparse score; None: loss.w2.")
    calibrate: bool = Field(True, description="Training (calibrated method, d2s/joint): at each kept "
                            "epoch set w1 = 1 and pick w2 from w2_grid by val hybrid RSUM (docs/sweep.md).")
    w2_grid: list[PositiveFloat] = Field(default_factory=lambda: [0.1, 0.2, 0.5, 1.0, 2.0],
                                 description="Sparse weights tried by fusion.calibrate.")
    rrf_k: float = Field(60.0, gt=0.0)
    confidence_power: float = Field(
        0.0, ge=0.0, le=8.0, description="calibrated only: query-dependent sparse weight "
        "w2·(gap_sparse/gap_dense)^p, a gap being a side's top-1 minus top-2 score for the query "
        "(sdray/fusion.py); 0: the fixed weight w2 (docs/sweep.md, 'query-dependent fusion').")
    cosine_slope: float = Field(
        0.0, ge=0.0, le=100.0, description="calibrated only: the sparse weight is also multiplied "
        "by exp(cosine_slope·(cosine_pivot − the query's best cosine)), so a query the dense side "
        "matches poorly leans on the sparse side; 0: no such factor.")
    cosine_pivot: float = Field(0.5, ge=-1.0, le=1.0, description="The best cosine at which "
                                "cosine_slope leaves the weight at w2.")


class SelectionConfig(_Strict):
    """Which checkpoint is kept: the best metric among epochs within a sparsity budget."""

    metric: str = Field("rsum_sparse", description="rsum_dense | rsum_sparse | rsum_hybrid | t2i.sparse.R@1 ...")
    max_nnz: float | None = Field(256.0, gt=0.0, description="Budget on mean nnz per text and image.")
    patience: int = Field(3, ge=1, description="Epochs without improvement before stopping.")
    vectors: Literal["uncapped", "served"] = Field(
        "uncapped", description="What validation judges: 'uncapped' — the model's own sparse vectors "
        "(heads.topk_* off), so max_nnz bounds the model's sparsity; 'served' — the vectors eval, "
        "index and serve see (capped at heads.topk_*), for recall and nnz alike (docs/sweep.md).")


class StorageConfig(_Strict):
    """Retries and timeouts of object-storage calls (transient faults vs permanent ones).

    Three layers, innermost first: botocore retries each S3 request (``retry_mode``,
    ``max_attempts``: connection errors, timeouts, 5xx, throttling); s3fs repeats a call whose
    response body was cut or timed out (``body_attempts``); a whole shard read that still fails is
    retried ``shard_attempts`` times with exponential backoff and full jitter, then raises
    :class:`sdray.storage.ShardStorageError` naming the shard, and Ray retries that task
    ``task_retries`` times before the job fails. Not part of a model's saved config: deployments
    set it per job (``SDRAY_STORAGE_<FIELD>`` environment variables, e.g.
    ``SDRAY_STORAGE_MAX_ATTEMPTS=10``).
    """

    retry_mode: Literal["standard", "adaptive", "legacy"] = Field(
        "standard", description="botocore retry mode ('adaptive' also rate-limits the client).")
    max_attempts: int = Field(5, ge=1, le=50, description="botocore attempts per request, first included.")
    connect_timeout_s: float = Field(5.0, gt=0.0, le=600.0)
    read_timeout_s: float = Field(30.0, gt=0.0, le=3600.0)
    write_timeout_s: float = Field(
        300.0, gt=0.0, le=86400.0, description="Deadline of one whole object write; an upload to a "
        "stalled server is not bounded by read_timeout_s (seen with SeaweedFS behind a stalling proxy).")
    body_attempts: int = Field(3, ge=1, le=20, description="s3fs attempts of a call whose response was cut.")
    shard_attempts: int = Field(3, ge=1, le=20, description="Whole-shard reads before the task fails.")
    backoff_s: float = Field(1.0, ge=0.0, le=600.0, description="First wait between shard attempts; doubles.")
    backoff_max_s: float = Field(30.0, ge=0.0, le=3600.0)
    task_retries: int = Field(2, ge=0, le=20, description="Ray retries of a shard task that failed on storage.")

    ENV_PREFIX: ClassVar[str] = "SDRAY_STORAGE_"

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> "StorageConfig":
        """Defaults overridden by ``SDRAY_STORAGE_<FIELD>`` variables (case-insensitive names)."""
        env = os.environ if environ is None else environ
        values = {name: env[cls.ENV_PREFIX + name.upper()] for name in cls.model_fields
                  if cls.ENV_PREFIX + name.upper() in env}
        try:
            return cls.model_validate(values)
        except ValidationError as err:
            raise ConfigError(f"storage settings from {cls.ENV_PREFIX}*: {err}") from err

    def to_env(self) -> dict[str, str]:
        """The ``SDRAY_STORAGE_*`` variables that reproduce this config (for Ray workers)."""
        return {self.ENV_PREFIX + k.upper(): str(v) for k, v in self.model_dump().items()}


class SdrayConfig(_Strict):
    """A whole run."""

    backbone: BackboneConfig = BackboneConfig()
    heads: HeadConfig = HeadConfig()
    loss: LossConfig = LossConfig()
    optim: OptimConfig = OptimConfig()
    data: DataConfig = DataConfig()
    fusion: FusionConfig = FusionConfig()
    selection: SelectionConfig = SelectionConfig()
    checkpoint_every: int = Field(0, ge=0, description="Steps between checkpoints; 0: per epoch.")

    def fusion_weights(self) -> tuple[float, float]:
        """(w1, w2) for search-time fusion: the fusion section's, else the loss's."""
        f = self.fusion
        return (self.loss.w1 if f.w1 is None else f.w1, self.loss.w2 if f.w2 is None else f.w2)


def _merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and value and isinstance(out.get(key), dict):  # {} replaces
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _official(w1, w2, l1, l2, q_reg, d_reg, lr, backbone: dict) -> dict:
    """The official training behaviour of Song et al. (holi-lab/mm-sparse-retrieval): its
    per-setting values, its teacher (not detached, un-transposed text→image teacher), no
    sparsity budget on checkpoint selection, no top-k cap on served vectors, and its search-time fusion ``w1·cos + w2·sparse``
    with the loss weights, fixed (not calibrated on val)."""
    return {
        "backbone": backbone,
        "loss": {"w1": w1, "w2": w2, "lambda1": l1, "lambda2": l2, "q_reg": q_reg, "d_reg": d_reg,
                 "regularizer": "l1", "d2s_regularizer": "l1", "expansion_control": False, "detach_teacher": False,
                 "teacher_orientation": "official"},
        "fusion": {"method": "raw", "normalize": None, "w1": None, "w2": None, "calibrate": False},
        "selection": {"max_nnz": None, "vectors": "uncapped"},
        "heads": {"topk_text": None, "topk_image": None},
        "optim": {"lr": lr, "method_lr": {}, "sparse_head_lr": None, "batch_size": 256,
                  "weight_decay": 0.05, "warmup_fraction": 0.2},
    }


def _sdray_variant(official: dict) -> dict:
    """sdray's variant of an official preset: the same per-setting values, with the teacher
    detached and correctly oriented, checkpoints selected within 256 nnz, served vectors capped at
    256 terms, and the search-time
    fusion ``cos/τ + w2·sparse`` with w2 chosen on the val split (DESIGN.md §1, docs/sweep.md)."""
    return _merge(official, {
        "loss": {"detach_teacher": True, "teacher_orientation": "correct"},
        "fusion": {"method": "calibrated", "w1": 1.0, "w2": 1.0, "calibrate": True},
        "selection": {"max_nnz": 256.0},
        "heads": {"topk_text": 256, "topk_image": 256},
    })


_BLIP_COCO = {"name": "blip", "path": "Salesforce/blip-itm-base-coco", "image_size": 384}
_BLIP_FLICKR = {"name": "blip", "path": "Salesforce/blip-itm-base-flickr", "image_size": 384}
# ALBEF has no transformers implementation; its presets carry the method's values and leave the
# backbone to the user (``--backbone`` or ``backbone.*`` overrides).
_OFFICIAL: dict[str, dict] = {
    "blip-coco": _official(0.1, 0.1, 0.9, 0.3, 5e-4, 3e-5, 5e-5, _BLIP_COCO),
    "blip-flickr": _official(0.1, 0.2, 0.7, 0.7, 1e-4, 2e-5, 1e-5, _BLIP_FLICKR),
    "albef-coco": _official(0.2, 0.5, 0.9, 0.3, 1e-5, 3e-5, 5e-5, {}),
    "albef-flickr": _official(0.1, 0.2, 0.3, 0.3, 1e-4, 2e-5, 1e-5, {}),
}
#: sdray's defaults with the sparsity regulariser that won on real images (docs/sweep.md, "FLOPS
#: 1e-1 on both benchmarks"): FLOPS, q_reg = d_reg = 0.1, epochs chosen on the served vectors. On
#: the icon-set benchmark its sparse side beat d2s's and the dense model's dense on every seed;
#: on generated shapes (``sdray synth``) L1 3e-3, the default, wins by 18 RSUM instead.
REAL_IMAGES = {"loss": {"regularizer": "flops", "q_reg": 1e-1, "d_reg": 1e-1},
               "selection": {"vectors": "served"}}
#: ``default`` (sdray's defaults for the packaged backbone), ``real-images``, the official
#: presets, and ``NAME-sdray``: sdray's variant of each official preset.
PRESETS: dict[str, dict] = {
    "default": {},
    "real-images": REAL_IMAGES,
    **_OFFICIAL,
    **{f"{name}-sdray": _sdray_variant(cfg) for name, cfg in _OFFICIAL.items()},
}


def _validate(data: dict) -> SdrayConfig:
    try:
        return SdrayConfig.model_validate(data)
    except ValidationError as err:
        lines = []
        for e in err.errors():
            key = ".".join(str(p) for p in e["loc"]) or "<root>"
            lines.append(f"{key}: {e['msg']}")
        raise ConfigError("invalid config:\n  " + "\n  ".join(lines)) from None


def preset(name: str) -> SdrayConfig:
    """The named preset: ``default``; ``real-images`` (:data:`REAL_IMAGES`); the official
    ``blip-coco``, ``blip-flickr``, ``albef-coco``, ``albef-flickr``; sdray's variants
    ``blip-coco-sdray`` etc."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset '{name}'; choose one of {sorted(PRESETS)}")
    return _validate(PRESETS[name])


def from_dict(data: dict, base: SdrayConfig | None = None) -> SdrayConfig:
    """Validate ``data`` (nested dict) on top of ``base`` (default: the embedded default)."""
    if not isinstance(data, dict):
        raise ConfigError(f"config must be a mapping, got {type(data).__name__}")
    start = (base or SdrayConfig()).model_dump()
    return _validate(_merge(start, data))


def with_overrides(cfg: SdrayConfig, overrides: dict[str, Any]) -> SdrayConfig:
    """Apply dotted-key overrides such as ``{"optim.lr": 1e-4}``; ``None`` values are skipped."""
    nested: dict = {}
    for dotted, value in overrides.items():
        if value is None:
            continue
        node = nested
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return from_dict(nested, base=cfg)


def loads(text: str, fmt: Literal["yaml", "json"] = "yaml") -> SdrayConfig:
    """Parse YAML or JSON text into a validated config."""
    data = json.loads(text) if fmt == "json" else yaml.safe_load(text)
    return from_dict(data or {})


def load(path: str | Path) -> SdrayConfig:
    """Load a ``.yaml``/``.yml``/``.json`` file; any other name is read as a preset name."""
    p = Path(path)
    if p.suffix.lower() not in {".yaml", ".yml", ".json"}:
        return preset(str(path))
    return loads(p.read_text(), "json" if p.suffix.lower() == ".json" else "yaml")


def dumps(cfg: SdrayConfig, fmt: Literal["yaml", "json"] = "yaml") -> str:
    """Serialise a config; ``loads(dumps(cfg))`` gives ``cfg`` back."""
    data = cfg.model_dump(mode="json")
    return json.dumps(data, indent=2) if fmt == "json" else yaml.safe_dump(data, sort_keys=False)


def save(cfg: SdrayConfig, path: str | Path) -> None:
    """Write ``cfg`` as YAML or JSON, by the file's suffix."""
    p = Path(path)
    p.write_text(dumps(cfg, "json" if p.suffix.lower() == ".json" else "yaml"))
