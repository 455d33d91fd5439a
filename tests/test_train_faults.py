"""``sdray train`` writing to s3:// through a fault-injecting proxy in front of SeaweedFS: a burst
of resets, stalls and 503s while checkpoints are uploaded (Ray Train's pyarrow S3 client, given
sdray's retries by ``storage.pyarrow_s3``) and the model published (sdray's fsspec layer) is
survived; every checkpoint on the server is whole, and the published model loads and holds
exactly the tensors of the last checkpoint. One short TorchTrainer run."""

from __future__ import annotations

import json
import time

import pytest

from pipelines.cli import main as cli
from sdray import storage
from tests.faultproxy import FaultProxy
from tests.test_featurize_faults import BUDGET
from tests.test_index_faults import server_has
from sdray.training import HEADS_FILE, OPTIM_FILE, STATE_FILE
from tests.test_train_pipeline import write_feature_split

pytestmark = pytest.mark.slow

ROWS, BATCH, EVERY = 256, 32, 2           # 8 steps, a checkpoint every 2: 4 uploads


def _direct(endpoint: str):
    """An s3fs client of the real server (not through the proxy)."""
    import s3fs

    opts = storage._s3_options()
    return s3fs.S3FileSystem(key=opts.get("key"), secret=opts.get("secret"),
                             client_kwargs={"endpoint_url": endpoint}, skip_instance_cache=True)


def _tensors(fs, path: str) -> dict:
    from safetensors.numpy import load

    return load(fs.cat_file(path))


def test_train_checkpoint_upload_survives_faults(ray_session, s3_server, tmp_path, monkeypatch, capsys):
    from sdray.backbones import save_tiny
    from sdray.model import RetrievalModel

    save_tiny("clip", str(tmp_path / "tinyclip"))
    write_feature_split(str(tmp_path / "train"), ROWS, seed=0)
    out = s3_server.uri("trainfaults", "model")
    for key, value in BUDGET.to_env().items():      # the driver's, the workers' and pyarrow's budget
        monkeypatch.setenv(key, value)
    with FaultProxy(s3_server.port) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)

        def burst():
            proxy.reset(3)
            proxy.stall(2)
            proxy.answer_503(2.0)

        # the burst starts once the first checkpoint is on the server: the later uploads meet it
        watcher = proxy.when(server_has(s3_server.endpoint, storage.join(out, "run"), ".safetensors"),
                             burst, poll=0.05)
        t0 = time.monotonic()
        with storage.retries(BUDGET):
            rc = cli(["train", "--train", str(tmp_path / "train"), "--out", out, "--method", "dense",
                      "--backbone", "clip", "--backbone-path", str(tmp_path / "tinyclip"),
                      "--set", "heads.dense_dim=24", "--epochs", "1", "--batch-size", str(BATCH),
                      "--lr", "1e-2", "--checkpoint-every", str(EVERY), "--num-workers", "1",
                      "--max-failures", "0", "--json"])
        seconds = time.monotonic() - t0
        watcher.join(5)
        printed = capsys.readouterr()
        assert rc == 0, printed.err
        assert proxy.injected["reset"] >= 3 and proxy.injected["stall"] >= 1, proxy.injected
        summary = json.loads(printed.out.strip().splitlines()[-1])
        assert summary["steps"] == ROWS // BATCH and summary["kept_from"] == "last"
        RetrievalModel.load(out)            # loads through sdray's own layer (and the proxy)

    fs = _direct(s3_server.endpoint)
    root = storage.join(out, "run")[len("s3://"):]
    steps = sorted(p for p in fs.ls(root, refresh=True) if p.rsplit("/", 1)[-1].startswith("step_"))
    assert steps and steps[-1].endswith(f"step_{ROWS // BATCH:07d}"), steps
    # the kept checkpoints (num_to_keep=2, the latest two) are whole; an older one whose deletion
    # by Ray Train met the faults may leave part of its files behind (never read on resume)
    for step in steps[-2:]:
        for name in (HEADS_FILE, OPTIM_FILE, STATE_FILE, "config.yaml", "model.json"):
            assert fs.exists(f"{step}/{name}"), (step, name)
        _tensors(fs, f"{step}/heads.safetensors")
    model = _tensors(fs, f"{out[len('s3://'):]}/heads.safetensors")
    last = _tensors(fs, f"{steps[-1]}/heads.safetensors")
    assert model.keys() == last.keys()
    for name, value in last.items():
        assert (model[name] == value).all(), name
    print(f"\ntrain {ROWS // BATCH} steps to s3 through faults {proxy.injected}: {seconds:.1f}s, "
          f"checkpoints {[s.rsplit('/', 1)[-1] for s in steps]}")
