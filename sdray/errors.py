"""Failure kinds the ``sdray`` command tells apart (each has its own exit code, pipelines/cli.py).

Bad configuration is :class:`sdray.config.ConfigError` (a ``ValueError``); storage failures are
``OSError`` s (:class:`sdray.storage.StorageError` names the URI and cause).
"""


class TrainingFailed(RuntimeError):
    """A training run ended without a model (a worker group failed past ``--max-failures``)."""
