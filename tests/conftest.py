"""Shared fixtures: a real S3 server (SeaweedFS) and one local Ray for the whole session.

``s3_server`` exports AWS_* (endpoint, keys, region) before ``ray_session`` starts Ray, so Ray
workers inherit them.
"""

from __future__ import annotations

import os

import pytest

from tests.s3server import S3Server


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    with S3Server(tmp_path_factory.mktemp("seaweedfs")) as server:
        server.export_env()
        yield server


@pytest.fixture(scope="session")
def ray_session(s3_server):
    import ray

    os.environ["RAY_AUTH_MODE"] = "disabled"
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    if ray.is_initialized():
        ray.shutdown()
    ray.init(num_cpus=4, include_dashboard=False, runtime_env={"env_vars": s3_server.env()})
    yield ray
    ray.shutdown()
