"""Knobs of the Serve application: :class:`ServeConfig`.

One validated object carries everything the app needs: which index (and model) to serve,
replicas and autoscaling of each deployment, query-encoder batching, request limits and the
optional bearer token. It is what ``sdray serve`` builds from its flags, what the application
builder :func:`serve.app.build_app` receives as ``args`` from a Serve config YAML (``serve deploy``
or a KubeRay RayService ``serveConfigV2``), and what the tests construct directly.

Example::

    cfg = ServeConfig(index="s3://bucket/index", encoder=DeploymentKnobs(max_replicas=4))
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from sdray.index.leases import LeaseConfig


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DeploymentKnobs(_Strict):
    """Replica count or autoscaling for one deployment.

    With ``max_replicas > min_replicas`` the deployment autoscales on ``target_ongoing_requests``
    (Ray Serve's queue-length policy); otherwise it runs ``min_replicas`` fixed replicas.
    """

    min_replicas: int = Field(1, ge=1, le=1024)
    max_replicas: int = Field(1, ge=1, le=1024)
    target_ongoing_requests: float = Field(2.0, gt=0)
    max_ongoing_requests: int = Field(32, ge=1, le=100_000)
    upscale_delay_s: float = Field(3.0, ge=0)
    downscale_delay_s: float = Field(60.0, ge=0)
    max_queued_requests: int = Field(
        64, ge=-1, le=100_000, description="Requests waiting for a replica (per caller) before "
        "new ones are refused at once with 503 + Retry-After; -1: unbounded.")
    retry_after_s: float = Field(1.0, ge=0, le=3600, description="Retry-After of those 503s.")
    num_cpus: float = Field(0.0, ge=0, description="Logical CPUs reserved per replica.")
    num_gpus: float = Field(0.0, ge=0, description="GPUs reserved per replica (CUDA when visible).")
    memory_bytes: int | None = Field(None, ge=0, description="Memory declared to Ray per replica; "
                                     "shard searchers default to their shard files' size.")

    @model_validator(mode="after")
    def _order(self) -> "DeploymentKnobs":
        if self.max_replicas < self.min_replicas:
            raise ValueError("max_replicas must be >= min_replicas")
        return self

    def options(self, env: dict[str, str] | None = None) -> dict:
        """Keyword arguments for ``Deployment.options``; ``env``: the replicas' environment variables."""
        actor: dict = {"num_cpus": self.num_cpus}
        if env:
            actor["runtime_env"] = {"env_vars": dict(env)}
        if self.num_gpus:
            actor["num_gpus"] = self.num_gpus
        if self.memory_bytes:
            actor["memory"] = self.memory_bytes
        out: dict = {
            "max_ongoing_requests": self.max_ongoing_requests,
            "max_queued_requests": self.max_queued_requests,
            "ray_actor_options": actor,
        }
        if self.max_queued_requests >= 0:
            out["backpressure_config"] = {"status_code": 503, "retry_after_s": self.retry_after_s}
        if self.max_replicas > self.min_replicas:
            out["autoscaling_config"] = {
                "min_replicas": self.min_replicas,
                "max_replicas": self.max_replicas,
                "target_ongoing_requests": self.target_ongoing_requests,
                "upscale_delay_s": self.upscale_delay_s,
                "downscale_delay_s": self.downscale_delay_s,
            }
        else:
            out["num_replicas"] = self.min_replicas
        return out


class BatchKnobs(_Strict):
    """``@serve.batch`` settings of the query encoder (applied through ``user_config``)."""

    max_batch_size: int = Field(16, ge=1, le=1024)
    batch_wait_timeout_s: float = Field(0.002, ge=0, le=10)
    torch_threads: int | None = Field(
        None, ge=1, le=1024, description="CPU threads of the encoder's forward pass; default: the "
        "node's cores (Ray would otherwise pin a 0-CPU replica to one thread).")


class ServeConfig(_Strict):
    """Everything the Serve application is configured by (see module docstring)."""

    index: str = Field(..., min_length=1, description="Index URI (local path or s3://): the root "
                       "holding the version pointer, or one version folder.")
    model: str | None = Field(None, description="Model URI; default: the one the index manifest names.")
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    app_name: str = "sdray"
    route_prefix: str = "/"

    ingress: DeploymentKnobs = DeploymentKnobs(min_replicas=1, max_replicas=2,
                                               max_ongoing_requests=128,
                                               target_ongoing_requests=32)
    encoder: DeploymentKnobs = DeploymentKnobs(min_replicas=1, max_replicas=2,
                                               max_ongoing_requests=64,
                                               target_ongoing_requests=8)
    shards: DeploymentKnobs = Field(DeploymentKnobs(max_ongoing_requests=64),
                                    description="Replicas of each shard searcher (per shard).")
    shard_groups: int | None = Field(
        None, ge=1, le=4096,
        description="Shard-searcher deployments; shard j of any version is hosted by group "
        "j % shard_groups. Default: the number of shards of the version served at start.")
    batch: BatchKnobs = BatchKnobs()

    k_default: int = Field(10, ge=1)
    k_max: int = Field(100, ge=1, le=10_000)
    max_text_chars: int = Field(1000, ge=1, le=100_000)
    max_image_bytes: int = Field(8 * 1024 * 1024, ge=1024, description="Decoded image bytes.")
    max_image_pixels: int = Field(16_000_000, ge=1024)
    max_body_bytes: int | None = Field(None, ge=1024, description="Default: 4/3 max_image_bytes + 64 KiB.")
    explain_terms: int = Field(8, ge=0, le=100, description="Terms per hit explanation.")
    candidates: int | None = Field(None, ge=1, description="Hybrid candidate depth per index and "
                                   "shard; default: the index's own setting, at least k.")
    default_mode: Literal["dense", "sparse", "hybrid"] = "hybrid"
    auth_token: str | None = Field(None, description="One bearer token (key name 'default') "
                                   "required on /v1/*; see also api_keys_file / $SDRAY_API_KEYS.")
    api_keys_file: str | None = Field(None, description="File of API keys, one 'name:key' a line "
                                      "(a mounted Kubernetes Secret); any key opens /v1/*.")
    api_keys_env: str = Field("SDRAY_API_KEYS", description="Environment variable holding more "
                              "'name:key' pairs (comma or newline separated).")
    rate_limit_per_s: float | None = Field(None, gt=0, description="Requests per second per API "
                                           "key across the whole deployment (each ingress replica "
                                           "allows its share); None: no limit.")
    rate_burst: int = Field(20, ge=1, le=100_000, description="Token-bucket size of that limit "
                            "(the whole deployment's, shared out like the rate).")
    rate_limit_refresh_s: float = Field(10.0, gt=0, le=3600, description="How often an ingress "
                                        "replica asks the Serve controller how many ingress replicas "
                                        "run (to take its share of the rate limit).")
    image_read_max_bytes: int = Field(
        16 * 1024 * 1024, ge=1024, le=1 << 34, description="Most bytes the image route reads "
        "from a corpus shard for one thumbnail: one tar member, or the image column of one Parquet "
        "row group (+ footer). Past it the route redirects to the document's source url, or 404s; "
        "indexes without image locations read whole shards only up to this size.")
    image_url_ttl_s: int = Field(900, ge=10, le=86_400, description="Lifetime of the signed "
                                 "thumbnail URLs in search responses.")
    max_inflight: int = Field(96, ge=1, le=100_000, description="Requests an ingress replica works "
                              "on at once; more get an immediate 503 + Retry-After.")
    encoder_in_ingress: bool | None = Field(
        None, description="Encode queries inside the ingress replica (no QueryEncoder deployment): "
        "one hop fewer, for small deployments; the ingress then scales with the encoder load. "
        "None: as shards_in_ingress resolves.")
    shards_in_ingress: bool | None = Field(
        None, description="Search every shard inside the ingress replica (no ShardSearcher "
        "deployments): no handle call per query, for indexes that fit one replica's memory; each "
        "ingress replica then holds the whole index. None (auto): true when the served version's "
        "shard files total at most local_index_max_bytes (serve.app.resolve_placement).")
    local_index_max_bytes: int = Field(
        1 << 30, ge=0, description="Auto placement: the largest index (bytes of shard files, from "
        "the manifest) searched inside the ingress replica; larger ones get ShardSearcher "
        "deployments. Decided when the app is built; a hot swap keeps the placement.")
    search_threads: int = Field(4, ge=1, le=256, description="Threads a shard group searches its "
                                "shards with, concurrently (per searcher or ingress replica).")
    replica_env: dict[str, str] = Field(
        {"OMP_WAIT_POLICY": "PASSIVE"}, max_length=32,
        description="Environment variables of every replica process (set before it starts). "
        "OMP_WAIT_POLICY=PASSIVE: OpenMP threads of FAISS and PyTorch sleep when idle instead of "
        "spinning, so replicas sharing cores do not steal them from each other "
        "(benchmarks/serve_load.py; measured in docs/benchmarks.md).")
    use_gpu: bool = Field(False, description="Encoder replicas reserve one GPU and encode on CUDA.")
    faiss_gpu: bool = Field(False, description="Shard searchers move dense FAISS indexes to the GPU "
                            "(sdray.index.dense.to_gpu; unchanged without faiss GPU support).")
    mmap: bool = Field(True, description="Memory-map shard files (FAISS IO_FLAG_MMAP, NumPy "
                       "mmap_mode); shards on s3:// are copied to shard_cache_dir first.")
    shard_cache_dir: str | None = Field(None, description="Local folder for shard files fetched "
                                        "from object storage; default: a temp folder.")
    memory_per_shard_byte: float = Field(1.2, ge=0, description="Memory declared to Ray per "
                                         "searcher replica = this × its shard files' bytes.")
    poll_interval_s: float = Field(5.0, ge=0, description="How often the version pointer is "
                                   "read for hot swaps; 0 disables hot swap.")
    swap_grace_s: float = Field(5.0, ge=0, description="Margin of the retirement of a replaced "
                                "index version: it stays loaded retire_after_s = request_timeout_s "
                                "+ 2 × poll_interval_s + swap_grace_s after the switch, so a request "
                                "pinned to it never makes a replica load it again.")
    leases: LeaseConfig = Field(LeaseConfig(), description="Index-version leases every shard "
                                "searcher replica writes for the versions it holds (ttl_s, renew_s); "
                                "`sdray index gc` keeps leased versions.")
    request_timeout_s: float = Field(30.0, gt=0, description="One deadline per request across "
                                     "encoding, search and explanation; past it: 504.")

    @model_validator(mode="after")
    def _limits(self) -> "ServeConfig":
        for key, val in self.replica_env.items():
            if not key.replace("_", "").isalnum() or not key[:1].isalpha() or len(key) > 128 or len(val) > 4096:
                raise ValueError(f"replica_env: bad variable {key[:40]!r}")
        if self.k_default > self.k_max:
            raise ValueError("k_default must be <= k_max")
        return self

    @property
    def retire_after_s(self) -> float:
        """Seconds a replaced version stays loaded after the switch: a request's deadline, plus up
        to two poll intervals for the other ingress replicas to switch too, plus ``swap_grace_s``."""
        return self.request_timeout_s + 2 * self.poll_interval_s + self.swap_grace_s

    @property
    def body_limit(self) -> int:
        return self.max_body_bytes or (self.max_image_bytes * 4 // 3 + 65536)
