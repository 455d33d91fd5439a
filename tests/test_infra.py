"""infra/ agrees with the code: manifests parse, entrypoints are real ``sdray`` commands whose
flags the subcommand's own parser accepts, the RayService's Serve config imports and names the
deployments the app builds, and ports, images, resource names and Secret keys are consistent.

No Kubernetes, docker or cloud here: everything is checked by parsing (the Dockerfile cannot be
built on the CI machines, which have no docker engine).
"""

from __future__ import annotations

import argparse
import importlib
import re
import shlex
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
INFRA = ROOT / "infra"
RAYJOBS = {"featurize": "rayjob-featurize.yaml", "train": "rayjob-train.yaml",
           "index": "rayjob-index.yaml"}
SECRET_KEYS = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
GPU_K8S = "nvidia.com/gpu"
SERVE_PORT_NAME = "serve"


def load(name: str) -> dict:
    with open(INFRA / name, encoding="utf-8") as f:
        docs = [d for d in yaml.safe_load_all(f) if d is not None]
    assert len(docs) == 1, f"{name}: expected one YAML document, got {len(docs)}"
    return docs[0]


def pyproject() -> dict:
    with open(ROOT / "pyproject.toml", "rb") as f:
        return tomllib.load(f)


def ray_manifests() -> dict[str, dict]:
    out = {name: load(fn) for name, fn in RAYJOBS.items()}
    out["rayservice"] = load("rayservice.yaml")
    return out


def cluster_spec(doc: dict) -> dict:
    spec = doc["spec"]
    return spec["rayClusterSpec"] if doc["kind"] == "RayJob" else spec["rayClusterConfig"]


def pod_groups(doc: dict) -> list[tuple[str, dict]]:
    """(group name, group spec) for the head ('head') and each worker group."""
    cs = cluster_spec(doc)
    return [("head", cs["headGroupSpec"])] + [(g["groupName"], g) for g in cs["workerGroupSpecs"]]


def containers(group: dict) -> list[dict]:
    return group["template"]["spec"]["containers"]


def gpus_of(group: dict) -> int:
    """GPUs per pod of a group (from the Ray container's limits)."""
    limits = containers(group)[0].get("resources", {}).get("limits", {})
    return int(limits.get(GPU_K8S, 0))


def entrypoint_argv(doc: dict) -> list[str]:
    argv = shlex.split(doc["spec"]["entrypoint"])
    assert argv[0] == "sdray", f"entrypoint must run the sdray CLI: {argv[:2]}"
    return argv


def parse_entrypoint(argv: list[str]) -> tuple[str, argparse.Namespace]:
    """Parse ``sdray SUB ARGS`` with the subcommand's own parser, exactly as the CLI does."""
    from pipelines.cli import SUBCOMMANDS

    sub = argv[1]
    assert sub in SUBCOMMANDS, f"'sdray {sub}' is not a subcommand ({sorted(SUBCOMMANDS)})"
    module = importlib.import_module(SUBCOMMANDS[sub][0])
    assert callable(getattr(module, "main", None)), f"{module.__name__} has no main(args)"
    parser = argparse.ArgumentParser(prog=f"sdray {sub}", exit_on_error=False)
    module.add_arguments(parser)
    try:
        ns = parser.parse_args(argv[2:])
    except (argparse.ArgumentError, SystemExit) as err:  # unknown flag, bad value, missing one
        pytest.fail(f"'{' '.join(argv)}' is rejected by {module.__name__}: {err}")
    return sub, ns


# ----------------------------------------------------------------------------- parsing

@pytest.mark.parametrize("name", sorted(p.name for p in INFRA.glob("*.yaml")))
def test_every_yaml_parses(name):
    doc = load(name)
    assert isinstance(doc, dict) and doc


def test_infra_has_the_promised_files():
    for fn in [*RAYJOBS.values(), "rayservice.yaml", "cluster-aws.yaml", "Dockerfile",
               "secret-s3.example.yaml"]:
        assert (INFRA / fn).is_file(), fn


@pytest.mark.parametrize("name", sorted(RAYJOBS))
def test_rayjob_shape(name):
    doc = load(RAYJOBS[name])
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayJob"
    spec = doc["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    assert spec.get("submissionMode", "K8sJobMode") in {"K8sJobMode", "HTTPMode", "SidecarMode"}
    cs = spec["rayClusterSpec"]
    assert cs["enableInTreeAutoscaling"] is True
    yaml.safe_load(spec.get("runtimeEnvYAML", "{}"))  # a YAML string itself


# ----------------------------------------------------------------------------- entrypoints

@pytest.mark.parametrize("name", sorted(RAYJOBS))
def test_rayjob_entrypoint_is_a_real_command(name):
    argv = entrypoint_argv(load(RAYJOBS[name]))
    sub, ns = parse_entrypoint(argv)
    assert sub == name
    for flag in [a for a in argv[2:] if a.startswith("--")]:
        assert hasattr(ns, flag[2:].replace("-", "_")), flag
    # every URI in a cluster job lives on object storage (pods share no disk)
    for key in ("data", "out", "train", "val", "model", "corpus", "init"):
        value = getattr(ns, key, None)
        if value:
            assert value.startswith("s3://"), f"{name}: --{key} {value} is not on S3"


def test_index_job_sizes_its_shards_from_the_corpus():
    """No fixed shard count (issue 11): N = ceil(samples / --max-docs-per-shard)."""
    _, ns = parse_entrypoint(entrypoint_argv(load(RAYJOBS["index"])))
    assert ns.shards is None, "--shards fixes the count whatever the corpus size"
    assert ns.max_docs_per_shard is not None and 10_000 <= ns.max_docs_per_shard <= 2_000_000


def test_train_gpu_workers_fit_the_trainer():
    doc = load(RAYJOBS["train"])
    _, ns = parse_entrypoint(entrypoint_argv(doc))
    assert ns.use_gpu, "the cluster train job uses GPUs"
    max_gpus = sum(gpus_of(g) * g.get("maxReplicas", g.get("replicas", 0))
                   for n, g in pod_groups(doc) if n != "head")
    assert max_gpus >= ns.num_workers, (
        f"--num-workers {ns.num_workers} with --use-gpu needs {ns.num_workers} GPUs; "
        f"the worker groups can reach {max_gpus}")


def test_featurize_actor_pool_fits_the_gpu_group():
    """The featurize job asks for GPUs explicitly; its autoscaling actor pool starts on the GPUs
    the group has at start and grows no further than the group can (one GPU per actor)."""
    doc = load(RAYJOBS["featurize"])
    _, ns = parse_entrypoint(entrypoint_argv(doc))
    assert ns.use_gpu
    workers = [g for n, g in pod_groups(doc) if n != "head"]
    min_gpus = sum(gpus_of(g) * g.get("minReplicas", 0) for g in workers)
    max_gpus = sum(gpus_of(g) * g.get("maxReplicas", g.get("replicas", 0)) for g in workers)
    assert 1 <= ns.min_actors <= ns.max_actors
    assert ns.min_actors * ns.num_gpus_per_actor <= min_gpus, "--min-actors need GPUs at start"
    assert ns.max_actors * ns.num_gpus_per_actor <= max_gpus, "--max-actors exceed the GPU group"


def test_featurize_train_and_index_agree_on_features():
    """Features made by the featurize job are the ones train and index read, made with the
    backbone and preprocessing of the train preset (else sdray train/index refuse them)."""
    from pipelines.featurize import main as _  # noqa: F401 - the module the CLI runs
    from pipelines.train import resolve_config
    from sdray.backbones.compat import check_features, feature_signature
    from sdray.config import BackboneConfig

    _, feat = parse_entrypoint(entrypoint_argv(load(RAYJOBS["featurize"])))
    _, train = parse_entrypoint(entrypoint_argv(load(RAYJOBS["train"])))
    _, index = parse_entrypoint(entrypoint_argv(load(RAYJOBS["index"])))
    fields = {"name": feat.backbone, "path": feat.backbone_path}
    if feat.image_size:
        fields["image_size"] = feat.image_size
    if feat.max_text_length:
        fields["max_text_length"] = feat.max_text_length
    made = feature_signature(BackboneConfig(**fields))
    cfg = resolve_config(train)
    check_features({"preprocessing": made}, cfg.backbone, feat.out, "the train job's config")
    assert made["path"] == cfg.backbone.path
    root = feat.out.rsplit("/", 1)[0]
    for uri in (train.train, train.val, index.corpus):
        assert uri.rsplit("/", 1)[0] == root, f"{uri} is not a split of the featurize output {root}"
    assert index.model == train.out


def test_train_config_preset_exists():
    from sdray.config import PRESETS

    _, ns = parse_entrypoint(entrypoint_argv(load(RAYJOBS["train"])))
    if ns.config and not ns.config.endswith((".yaml", ".yml", ".json")):
        assert ns.config in PRESETS


def test_train_job_keeps_a_servable_checkpoint():
    """The production train job (whose model the index job serves) selects its checkpoint within
    the nnz budget and calibrates the fusion weight on its own val split: the ``-sdray`` variant,
    not the official preset that reproduces the paper (no budget, fixed fusion)."""
    from pipelines.train import resolve_config
    from sdray.config import preset

    _, ns = parse_entrypoint(entrypoint_argv(load(RAYJOBS["train"])))
    cfg = resolve_config(ns)
    assert cfg.selection.max_nnz is not None and cfg.selection.max_nnz <= 256
    assert cfg.fusion.calibrate and ns.val, "the fusion weight is chosen on the job's val split"
    official = preset(ns.config.removesuffix("-sdray"))
    assert official.selection.max_nnz is None and not official.fusion.calibrate
    assert cfg.loss.w1 == official.loss.w1 and cfg.loss.w2 == official.loss.w2


def test_aws_cluster_example_command_is_a_real_command():
    text = (INFRA / "cluster-aws.yaml").read_text(encoding="utf-8")
    cmds = re.findall(r"'(sdray [^']+)'", text)
    assert cmds, "the launcher config shows how to start the endpoint"
    for cmd in cmds:
        parse_entrypoint(shlex.split(cmd))


# ----------------------------------------------------------------------------- pods

@pytest.mark.parametrize("name", ["featurize", "train", "index", "rayservice"])
def test_groups_replicas_and_gpu_resource_names(name):
    doc = ray_manifests()[name]
    for group_name, group in pod_groups(doc):
        if group_name != "head":
            assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"], group_name
        for c in containers(group):
            res = c.get("resources", {})
            for kind in ("requests", "limits"):
                for key in res.get(kind, {}):
                    assert key in {"cpu", "memory", "ephemeral-storage", GPU_K8S}, (
                        f"{name}/{group_name}: unexpected resource name {key!r}")
            # GPUs are not overcommittable: requests must equal limits
            assert res.get("requests", {}).get(GPU_K8S) == res.get("limits", {}).get(GPU_K8S)
            if res.get("limits", {}).get(GPU_K8S):
                tolerations = group["template"]["spec"].get("tolerations", [])
                assert any(t.get("key") == GPU_K8S for t in tolerations), group_name
        params = group.get("rayStartParams", {})
        assert all(isinstance(v, str) for v in params.values()), (
            f"{name}/{group_name}: rayStartParams is a map of strings in KubeRay's CRD")
        if "num-gpus" in params:  # if stated at all, it must agree with the pod's GPUs
            assert int(params["num-gpus"]) == gpus_of(group), group_name
        assert "resources" not in params or "GPU" not in str(params["resources"])


def test_rayjobs_use_gpu_worker_groups():
    for name in ("featurize", "train"):
        doc = load(RAYJOBS[name])
        assert any(gpus_of(g) for n, g in pod_groups(doc) if n != "head"), name


@pytest.mark.parametrize("name", ["featurize", "train", "index", "rayservice"])
def test_s3_credentials_come_from_the_secret(name):
    secret = load("secret-s3.example.yaml")
    assert secret["kind"] == "Secret"
    assert set(secret["stringData"]) == SECRET_KEYS
    doc = ray_manifests()[name]
    for group_name, group in pod_groups(doc):
        for c in containers(group):
            refs = {}
            for env in c.get("env", []):
                ref = env.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    assert ref["name"] == secret["metadata"]["name"], (name, group_name)
                    assert ref["key"] == env["name"], (name, group_name, env)
                    refs[env["name"]] = ref["key"]
                else:
                    assert not env["name"].startswith("AWS_SECRET"), "secret inlined"
            assert set(refs) == SECRET_KEYS, (name, group_name, refs)


def test_one_image_everywhere_tagged_with_the_package_version():
    version = pyproject()["project"]["version"]
    images = set()
    for name, doc in ray_manifests().items():
        cs = cluster_spec(doc)
        import ray

        assert str(cs["rayVersion"]) == ray.__version__, name
        for _, group in pod_groups(doc):
            images |= {c["image"] for c in containers(group)}
    images.add(load("cluster-aws.yaml")["docker"]["image"])
    assert len(images) == 1, images
    (image,) = images
    assert image.rsplit(":", 1)[1].startswith(version), image


def test_head_ports():
    for name, doc in ray_manifests().items():
        head = containers(cluster_spec(doc)["headGroupSpec"])[0]
        ports = {p["name"]: p["containerPort"] for p in head.get("ports", [])}
        assert ports.get("gcs-server") == 6379 and ports.get("dashboard") == 8265, name
        assert ports.get("client") == 10001, name


# ----------------------------------------------------------------------------- Serve

def serve_configs() -> tuple[dict, dict]:
    """(RayService serveConfigV2, serve/config.yaml), both parsed."""
    svc = load("rayservice.yaml")
    assert svc["apiVersion"] == "ray.io/v1" and svc["kind"] == "RayService"
    v2 = yaml.safe_load(svc["spec"]["serveConfigV2"])
    with open(ROOT / "serve" / "config.yaml", encoding="utf-8") as f:
        local = yaml.safe_load(f)
    return v2, local


def built_deployment_names(app_cfg: dict, monkeypatch) -> set[str]:
    """Import the app's import_path and build it with its args, as Serve would (no Ray needed);
    the model URI, which the builder would read from the index manifest, is stubbed."""
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary
    from ray.serve._private.build_app import build_app as serve_build

    import serve.app as serve_app

    module_name, attr = app_cfg["import_path"].split(":")
    builder = getattr(importlib.import_module(module_name), attr)
    args = dict(app_cfg.get("args") or {})
    monkeypatch.setattr(serve_app, "model_uri", lambda cfg: cfg.model or "s3://stub/model")
    monkeypatch.setattr(serve_app, "n_groups", lambda cfg: cfg.shard_groups or 2)
    monkeypatch.setattr(serve_app, "shard_memory", lambda cfg, groups: [1 << 30] * groups)
    app = call_user_app_builder_with_args_if_necessary(builder, args)
    built = serve_build(app, name=app_cfg["name"])
    return {d.name for d in built.deployments}


def test_serve_configs_validate_with_ray_schema():
    from ray.serve.schema import ServeDeploySchema

    from serve.config import ServeConfig

    for cfg in serve_configs():
        ServeDeploySchema.model_validate(cfg)
        for app in cfg["applications"]:
            ServeConfig.model_validate(app.get("args") or {})


def test_rayservice_matches_serve_config_yaml(monkeypatch):
    v2, local = serve_configs()
    (svc_app,), (local_app,) = v2["applications"], local["applications"]
    assert svc_app["import_path"] == local_app["import_path"]
    assert svc_app["name"] == local_app["name"]
    assert svc_app.get("route_prefix", "/") == local_app.get("route_prefix", "/")
    for app in (svc_app, local_app):
        # they configure the QueryEncoder (and searchers): the placement must not be left to auto
        assert app["args"]["shards_in_ingress"] is False and app["args"]["encoder_in_ingress"] is False
        names = built_deployment_names(app, monkeypatch)
        assert {"Ingress", "QueryEncoder"} <= names
        listed = {d["name"] for d in app.get("deployments", [])}
        assert listed <= names, f"{app['import_path']} builds {sorted(names)}, config lists {sorted(listed)}"
    # the RayService pins the shard-searcher deployments and lists exactly those
    groups = svc_app["args"]["shard_groups"]
    assert {d["name"] for d in svc_app["deployments"]} >= {f"ShardSearcher{i}" for i in range(groups)}
    assert built_deployment_names(svc_app, monkeypatch) == (
        {"Ingress", "QueryEncoder"} | {f"ShardSearcher{i}" for i in range(groups)})


def test_serve_ports_agree():
    v2, local = serve_configs()
    port = v2["http_options"]["port"]
    assert port == local["http_options"]["port"]
    assert v2["http_options"]["host"] == "0.0.0.0"  # reachable from the Kubernetes service
    args = v2["applications"][0]["args"]
    assert args.get("port", port) == port
    svc = load("rayservice.yaml")
    for group_name, group in pod_groups(svc):
        for c in containers(group):
            serve_ports = [p["containerPort"] for p in c.get("ports", []) if p["name"] == SERVE_PORT_NAME]
            if group_name == "head":
                assert serve_ports == [port], "KubeRay routes the serve Service to the head's 'serve' port"
            else:
                assert serve_ports in ([], [port])
    from pipelines import serve as serve_cli

    parser = argparse.ArgumentParser()
    serve_cli.add_arguments(parser)
    assert parser.parse_args(["--index", "x"]).port == port


def test_rayservice_workers_probe_readyz_and_livez_and_mount_the_api_keys():
    """Every RayService worker pod (where the Serve replicas and proxies run) is taken out of the
    Service by /readyz and restarted by /livez on the Serve port, and mounts the API-key Secret
    where the app's ``api_keys_file`` reads it."""
    import posixpath

    v2, _ = serve_configs()
    keys_file = v2["applications"][0]["args"]["api_keys_file"]
    port = v2["http_options"]["port"]
    secret = load("secret-api-keys.example.yaml")
    svc = load("rayservice.yaml")
    workers = [(n, g) for n, g in pod_groups(svc) if n != "head"]
    assert workers
    for name, group in workers:
        container = containers(group)[0]
        assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": port}, name
        assert container["livenessProbe"]["httpGet"] == {"path": "/livez", "port": port}, name
        volumes = {v["name"]: v for v in group["template"]["spec"]["volumes"]}
        mounts = [m for m in container["volumeMounts"] if m["mountPath"] == posixpath.dirname(keys_file)]
        assert len(mounts) == 1 and mounts[0].get("readOnly") is True, name
        source = volumes[mounts[0]["name"]]["secret"]
        assert source["secretName"] == secret["metadata"]["name"], name
        items = {i["path"]: i["key"] for i in source["items"]}
        assert items[posixpath.basename(keys_file)] in secret["stringData"], name


def test_rayservice_asks_only_for_resources_its_cluster_has():
    v2, _ = serve_configs()
    svc = load("rayservice.yaml")
    has_gpu = any(gpus_of(g) for _, g in pod_groups(svc))
    for app in v2["applications"]:
        for dep in app.get("deployments", []):
            opts = dep.get("ray_actor_options") or {}
            if opts.get("num_gpus"):
                assert has_gpu, dep["name"]
        args = app["args"]
        cpus = max(int(containers(g)[0]["resources"]["limits"]["cpu"])
                   for n, g in pod_groups(svc) if n != "head")
        for knob in ("ingress", "encoder", "shards"):
            assert float((args.get(knob) or {}).get("num_cpus", 0)) <= cpus, knob


# ----------------------------------------------------------------------------- AWS launcher

def test_no_cluster_puts_the_dashboard_on_every_interface():
    """The dashboard (job submission and Serve deploy API, no auth) is never on 0.0.0.0: the AWS
    launcher's head binds loopback (reached through `ray dashboard`'s SSH tunnel); the RayService
    and every RayJob bind the head pod's IP (the KubeRay operator and a RayJob's submitter pod reach
    it through the head Service) and - since KubeRay's default head probes ask localhost:8265 -
    declare their own probes against that IP. The NetworkPolicy admits only the operator's
    namespace to the RayService head's 8265, and selects no RayJob head (its submitter must reach it)."""
    head_cmd = " ".join(load("cluster-aws.yaml")["head_start_ray_commands"])
    assert re.search(r"--dashboard-host[= ]127\.0\.0\.1(\s|$)", head_cmd), head_cmd
    for name, doc in ray_manifests().items():
        head = cluster_spec(doc)["headGroupSpec"]
        assert head["rayStartParams"]["dashboard-host"] == "$SDRAY_POD_IP", name
        container = containers(head)[0]
        env = {e["name"]: e for e in container["env"]}
        assert env["SDRAY_POD_IP"]["valueFrom"] == {"fieldRef": {"fieldPath": "status.podIP"}}, name
        for probe in ("readinessProbe", "livenessProbe"):
            command = container[probe]["exec"]["command"]
            assert command[:2] == ["bash", "-c"], (name, probe)
            assert "http://$SDRAY_POD_IP:8265/api/gcs_healthz" in command[2], (name, probe)
            assert "localhost:8265" not in command[2], (name, probe)
    for path in INFRA.glob("*.yaml"):
        assert not re.search(r"dashboard-host[=:]\s*\"?0\.0\.0\.0", path.read_text()), path.name
    policy = load("networkpolicy-dashboard.yaml")
    to_dashboard = [rule for rule in policy["spec"]["ingress"]
                    if any(port["port"] == 8265 for port in rule.get("ports", []))]
    assert len(to_dashboard) == 1 and [set(f) for f in to_dashboard[0]["from"]] == [{"namespaceSelector"}]
    selected = policy["spec"]["podSelector"]["matchLabels"]
    for name, doc in ray_manifests().items():
        labels = {"ray.io/node-type": "head"} | (
            cluster_spec(doc)["headGroupSpec"]["template"].get("metadata") or {}).get("labels", {})
        assert (selected.items() <= labels.items()) == (name == "rayservice"), name


def test_aws_cluster_launcher():
    cfg = load("cluster-aws.yaml")
    assert cfg["provider"]["type"] == "aws"
    types = cfg["available_node_types"]
    assert cfg["head_node_type"] in types
    workers = {n: t for n, t in types.items() if n != cfg["head_node_type"]}
    assert sum(t["max_workers"] for t in workers.values()) <= cfg["max_workers"]
    gpu_families = ("g4dn.", "g5.", "g6.", "g6e.", "p3.", "p4d.", "p4de.", "p5.")
    for name, t in types.items():
        assert t.get("min_workers", 0) <= t.get("max_workers", 0) or name == cfg["head_node_type"]
        res = t.get("resources", {})
        assert set(res) <= {"CPU", "GPU", "memory"}, f"{name}: Ray resource names are CPU/GPU"
        is_gpu_instance = t["node_config"]["InstanceType"].startswith(gpu_families)
        assert bool(res.get("GPU")) == is_gpu_instance, name
        assert "IamInstanceProfile" in t["node_config"], f"{name}: S3 access by instance profile"
    assert any(t.get("resources", {}).get("GPU") for t in workers.values())
    head_cmd = " ".join(cfg["head_start_ray_commands"])
    assert "--head" in head_cmd and "--port=6379" in head_cmd and "--dashboard-port=8265" in head_cmd
    assert "--autoscaling-config=~/ray_bootstrap_config.yaml" in head_cmd
    assert "$RAY_HEAD_IP:6379" in " ".join(cfg["worker_start_ray_commands"])
    assert "AWS_SECRET_ACCESS_KEY" not in (INFRA / "cluster-aws.yaml").read_text()


# ----------------------------------------------------------------------------- Dockerfile

def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    lines, cur = [], ""
    for raw in (INFRA / "Dockerfile").read_text(encoding="utf-8").splitlines():
        if not cur and (not raw.strip() or raw.lstrip().startswith("#")):
            continue
        if raw.rstrip().endswith("\\"):
            cur += raw.rstrip()[:-1] + " "
            continue
        cur += raw
        inst, _, rest = cur.strip().partition(" ")
        lines.append((inst.upper(), rest.strip()))
        cur = ""
    return lines


def test_dockerfile():
    import ray

    ins = dockerfile()
    args = {}
    for inst, rest in ins:
        if inst == "ARG" and "=" in rest:
            k, v = rest.split("=", 1)
            args[k] = v
    sub = lambda s: re.sub(r"\$\{(\w+)\}", lambda m: args.get(m.group(1), m.group(0)), s)  # noqa: E731
    froms = [sub(r) for i, r in ins if i == "FROM"]
    assert froms == [f"rayproject/ray:{ray.__version__}-py311"], froms
    assert args["TORCH_VERSION"] == "2.13.0"
    assert args["TORCH_VARIANT"] == "cpu" or re.fullmatch(r"cu\d{3}", args["TORCH_VARIANT"])
    runs = [sub(r) for i, r in ins if i == "RUN"]
    torch_run = next(i for i, r in enumerate(runs) if "torch==" in r)
    assert 'pip install "torch==2.13.0"' in runs[torch_run]
    assert f"download.pytorch.org/whl/{args['TORCH_VARIANT']}" in runs[torch_run]
    sdray_run = next(i for i, r in enumerate(runs) if re.search(r"pip install \.(\s|$)", r))
    assert torch_run < sdray_run, "torch must be installed before the package pins it"
    copied = " ".join(r for i, r in ins if i == "COPY")
    for pkg in pyproject()["tool"]["setuptools"]["packages"]["find"]["include"]:
        assert f" {pkg.rstrip('*')} " in f" {copied} ", f"{pkg} is not copied into the image"
    assert "pyproject.toml" in copied
    assert [r for i, r in ins if i == "ENTRYPOINT"] == ['["sdray"]']
    assert pyproject()["project"]["scripts"]["sdray"] == "pipelines.cli:main"
    ignore = (INFRA / "Dockerfile.dockerignore").read_text().split()
    for pkg in ("sdray", "pipelines", "serve"):
        assert f"!{pkg}/**" in ignore
