"""Request and response bodies of the HTTP API (DESIGN.md §4), with bounded sizes.

``POST /v1/search`` takes either a JSON :class:`SearchRequest` or a multipart form with the same
fields (``image`` as a file upload). Limits that depend on the deployment (k max, text length,
image bytes) are checked by :func:`validate_request` against the :class:`~serve.config.ServeConfig`;
the static bounds below keep any single field from being unbounded.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

MODES = ("dense", "sparse", "hybrid")
FUSIONS = ("raw", "calibrated", "rrf")


class FusionParams(BaseModel):
    """How hybrid scores are fused; omitted fields take the model's trained values."""

    model_config = ConfigDict(extra="forbid")

    method: Literal["raw", "calibrated", "rrf"] | None = Field(
        None, description="raw: w1·cos + w2·sparse; calibrated: w1·cos/τ + w2·sparse; rrf: "
        "reciprocal-rank fusion. Default: the model config's fusion.method.")
    w1: float | None = Field(None, ge=0, le=1e6, description="Dense weight.")
    w2: float | None = Field(None, ge=0, le=1e6, description="Sparse weight.")
    rrf_k: float | None = Field(None, ge=0, le=1e6, description="RRF constant.")


class SearchRequest(BaseModel):
    """One query: ``text`` (→ images) or ``image`` (base64, → captions), never both."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={
        "examples": [{"text": "a red circle on a striped background", "k": 10, "mode": "hybrid"}]})

    text: str | None = Field(None, max_length=100_000, description="Caption query (text → images).")
    image: str | None = Field(None, max_length=64 * 1024 * 1024,
                              description="Base64 image (or data: URI) query (image → captions).")
    k: int | None = Field(None, description="Hits to return (1..k_max).")
    mode: str | None = Field(None, description="dense | sparse | hybrid (default hybrid).")
    fusion: FusionParams | None = None
    explain: int | None = Field(None, ge=0, le=100, description="Explanation terms per hit.")
    allow_partial: bool | None = Field(None, description="When a shard group fails: answer with "
                                       "the other groups' hits and shards_failed instead of a 503.")


class Term(BaseModel):
    """One vocabulary term's share of a sparse match: contribution = query × doc."""

    term: str
    query: float
    doc: float


class Scores(BaseModel):
    dense: float
    sparse: float
    fused: float


class Hit(BaseModel):
    id: str = Field(description="Document id: the image_id (text → images) or caption id.")
    image_id: str | None = None
    caption: str | None = None
    score: float = Field(description="The score the hits are ranked by (the mode's).")
    scores: Scores
    explanation: list[Term]
    shard: int | None = None
    thumbnail: str | None = Field(None, description="Signed relative URL of the hit's thumbnail.")


class QueryTerm(BaseModel):
    term: str
    weight: float


class SearchResponse(BaseModel):
    hits: list[Hit]
    mode: str
    fusion: str | None = None
    direction: Literal["t2i", "i2t"]
    k: int
    index_version: str
    query_terms: list[QueryTerm] = Field(default_factory=list,
                                         description="Heaviest terms of the sparse query.")
    took_ms: float
    shards_failed: int = Field(0, description="Shards whose group failed (allow_partial only).")
    timings: dict[str, float] = Field(default_factory=dict,
                                      description="encode_ms, search_ms (inside the ingress), batch_size")


class ErrorBody(BaseModel):
    error: str = Field(description="What is wrong, in words.")


class Health(BaseModel):
    status: Literal["ok", "loading", "error"]
    index_version: str | None = None
    shards: int | None = None
    shards_ready: int | None = None
    detail: str | None = None
