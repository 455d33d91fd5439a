"""``sdray eval`` on feature shards in S3 (SeaweedFS behind a fault-injecting proxy): it reads
through transient resets, and a store that stays down ends the command with the storage exit
code and one line naming the object."""

from __future__ import annotations

import pytest

from pipelines.cli import EXIT_STORAGE
from pipelines.cli import main as cli
from sdray import storage
from tests.faultproxy import FaultProxy
from tests.test_featurize_faults import BUDGET
from tests.test_train_pipeline import write_feature_split

pytestmark = pytest.mark.slow


def test_eval_storage_fault_exits_with_the_storage_code(s3_server, tmp_path, monkeypatch, capsys):
    from sdray.backbones import save_tiny
    from sdray.config import from_dict
    from sdray.model import RetrievalModel

    tiny = save_tiny("clip", str(tmp_path / "tinyclip"))
    model = str(tmp_path / "model")
    RetrievalModel.create(from_dict({"backbone": {"name": "clip", "path": str(tiny)},
                                     "heads": {"dense_dim": 24}})).save(model)
    write_feature_split(str(tmp_path / "val"), 32, seed=1, n_files=2)
    data = s3_server.uri("evalfaults", "val")
    storage.upload_dir(str(tmp_path / "val"), data)
    with FaultProxy(s3_server.port) as proxy, storage.retries(BUDGET):
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
        proxy.reset(3)
        assert cli(["eval", "--model", model, "--data", data]) == 0, capsys.readouterr().err
        assert proxy.injected["reset"] == 3
        capsys.readouterr()
        proxy.down()
        assert cli(["eval", "--model", model, "--data", data]) == EXIT_STORAGE
        err = capsys.readouterr().err.strip().splitlines()     # retry warnings, then the error
        final = [line for line in err if line.startswith("sdray eval:")]
        assert len(final) == 1 and final[0] == err[-1], err
        assert final[0].startswith("sdray eval: storage error: reading s3://"), final
        assert f"{data}/" in final[0] and "failed after 3 attempts" in final[0], final
