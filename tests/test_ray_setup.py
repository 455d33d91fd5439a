"""How sdray starts Ray: ``pipelines.datasets.ray_init_kwargs`` and its worker setup hook."""

from __future__ import annotations

import importlib
import logging

from pipelines.datasets import STATE_API_NOISE, ray_init_kwargs


def _resolve(dotted: str):
    module, _, name = dotted.rpartition(".")
    return getattr(importlib.import_module(module), name)


def test_a_local_ray_gets_a_hook_that_silences_only_the_state_api_warnings():
    kwargs = ray_init_kwargs(None)
    assert kwargs["include_dashboard"] is False
    hook = _resolve(kwargs["runtime_env"]["worker_process_setup_hook"])
    noisy = logging.getLogger(STATE_API_NOISE[0])
    other = logging.getLogger("ray.train.v2._internal.execution.controller.controller")
    before = noisy.level, other.level
    try:
        noisy.setLevel(logging.NOTSET)
        hook()
        assert not noisy.isEnabledFor(logging.WARNING) and noisy.isEnabledFor(logging.ERROR)
        assert other.level == before[1]
    finally:
        noisy.setLevel(before[0])


def test_a_cluster_keeps_its_own_logging():
    kwargs = ray_init_kwargs("ray://head:10001")
    assert "worker_process_setup_hook" not in kwargs.get("runtime_env", {})
