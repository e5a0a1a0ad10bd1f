"""The deployment files, checked without a Docker engine or a cluster: they parse, every HPARENA_* variable
they set is a Settings field, the worker command lines are what `hparena worker` accepts and consume the queue
the code derives from the class (and KEDA watches that queue's Redis list), each compose worker has a GPU of
its own, the committed compose file is the generator's output, and the image's CUDA matches torch's."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from app.config import Settings
from app.queue import celery_config

ROOT = Path(__file__).resolve().parents[2]
K8S = sorted((ROOT / "deploy/k8s").glob("*.yaml"))
EXAMPLE = {"HPARENA_ADMIN_TOKEN": "x" * 32, "HPARENA_HARDWARE_CLASS": "h100-80gb", "HPARENA_WORKER_THREADS": "8",
           "DB_OWNER_PASSWORD": "o", "DB_API_PASSWORD": "a", "DB_WORKER_PASSWORD": "w", "HPARENA_COMMIT": "abc",
           "POSTGRES_PASSWORD": "p", "FLOWER_BASIC_AUTH": "admin:f"}


def _interpolate(value: str) -> str:
    """Compose's ${VAR}, ${VAR:-default} and ${VAR:?error}, with EXAMPLE as the .env."""
    def sub(m: re.Match) -> str:
        name, op, rest = m.group(1), m.group(2), m.group(3)
        if name in EXAMPLE:
            return EXAMPLE[name]
        assert op == ":-", f"${{{name}}} has no example value"
        return rest
    return re.sub(r"\$\{(\w+)(?:(:[-?])([^}]*))?\}", sub, value)


def _compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def _workers(compose: dict) -> dict[str, dict]:
    return {name: s for name, s in compose["services"].items() if s.get("command", [])[:2] == ["hparena", "worker"]}


def _service_env(service: dict) -> dict[str, str]:
    return {k: _interpolate(str(v)) for k, v in (service.get("environment") or {}).items()}


def _k8s_docs() -> list[tuple[Path, dict]]:
    return [(f, d) for f in K8S for d in yaml.safe_load_all(f.read_text()) if d]


def _k8s_containers() -> list[tuple[dict, dict]]:
    """(pod template spec, container) for every Deployment, StatefulSet and Job."""
    out = []
    for _, d in _k8s_docs():
        if d["kind"] in ("Deployment", "StatefulSet", "Job"):
            pod = d["spec"]["template"]["spec"]
            out += [(pod, c) for c in pod["containers"]]
    return out


def _is_hparena(image: str) -> bool:
    return image.rsplit("/", 1)[-1].startswith("hparena:")


def _k8s_env(container: dict) -> dict[str, str]:
    env = {}
    for ref in container.get("envFrom", []):
        cm = [d for _, d in _k8s_docs() if d["kind"] == "ConfigMap"
              and d["metadata"]["name"] == ref["configMapRef"]["name"]]
        assert cm, f"ConfigMap {ref} is not defined under deploy/k8s"
        env.update(cm[0]["data"])
    for e in container.get("env", []):
        env[e["name"]] = e.get("value", "secret-value-" + "x" * 24)
    return env


def _settings(env: dict[str, str], monkeypatch) -> Settings:
    for k in [k for k in __import__("os").environ if k.startswith("HPARENA_")]:
        monkeypatch.delenv(k)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    if "HPARENA_DATABASE_URL" not in env:
        monkeypatch.setenv("HPARENA_DATABASE_URL", "postgresql+psycopg://x@db/x")
    return Settings(_env_file=None)


def _worker_invocation(argv: list[str]) -> dict:
    """Parse `hparena worker ...` with the CLI's own parser (nothing runs)."""
    import typer.main

    from worker.cli import cli

    assert argv[:2] == ["hparena", "worker"], argv
    group = typer.main.get_command(cli)
    command = group.commands["worker"]
    return command.make_context("worker", list(argv[2:])).params


def _seconds(duration: str) -> float:
    units = {"h": 3600, "m": 60, "s": 1}
    parts = re.findall(r"(\d+(?:\.\d+)?)([hms])", duration)
    assert "".join(n + u for n, u in parts) == duration, duration
    return sum(float(n) * units[u] for n, u in parts)


# ----------------------------------------------------------------------------------------------------
# Parsing and variables
# ----------------------------------------------------------------------------------------------------


def test_compose_and_every_kubernetes_file_parse():
    assert _compose()["services"]
    assert K8S and all(d.get("kind") for _, d in _k8s_docs())


def test_every_hparena_variable_set_is_a_settings_field():
    fields = {f"HPARENA_{name.upper()}" for name in Settings.model_fields}
    used = set()
    for service in _compose()["services"].values():
        used |= {k for k in (service.get("environment") or {}) if k.startswith("HPARENA_")}
    for _, c in _k8s_containers():
        used |= {k for k in _k8s_env(c) if k.startswith("HPARENA_")}
    used |= {k for _, d in _k8s_docs() if d["kind"] == "ConfigMap" for k in d["data"] if k.startswith("HPARENA_")}
    for f in [ROOT / "Dockerfile.gpu", ROOT / "deploy/compose.env.example"]:
        used |= set(re.findall(r"\b(HPARENA_\w+)=", f.read_text())) - {"HPARENA_COMMIT"}  # a build arg
    assert used and used <= fields, f"not Settings fields: {sorted(used - fields)}"


def test_each_service_settings_validate_in_production_and_only_the_api_holds_the_admin_token(monkeypatch):
    def check(name: str, env: dict[str, str], command: list[str]) -> None:
        s = _settings(env, monkeypatch)
        assert s.environment == "production", name
        assert s.database_url.startswith(("postgresql", "secret-value")), name  # k8s: from a Secret
        if command[:2] == ["hparena", "api"]:
            assert s.admin_secret(), name  # the API starts: a real secret is required and set
        else:
            assert "HPARENA_ADMIN_TOKEN" not in env, f"{name} holds the admin token but never uses it"

    for name, service in _compose()["services"].items():
        env = _service_env(service)
        if any(k.startswith("HPARENA_") for k in env):
            check(name, env, service["command"])
    for _, c in _k8s_containers():
        if "hparena" in c["image"].split("/")[-1]:
            check(c["name"], _k8s_env(c), c.get("args") or c.get("command"))


# ----------------------------------------------------------------------------------------------------
# Compose: one pinned worker per GPU, separate credentials, the generator
# ----------------------------------------------------------------------------------------------------


def test_each_compose_worker_has_a_gpu_of_its_own_and_a_node_name_of_its_own():
    workers = _workers(_compose())
    assert len(workers) >= 2
    ids, names = [], []
    for name, s in workers.items():
        devices = s["deploy"]["resources"]["reservations"]["devices"]
        assert len(devices) == 1 and devices[0]["driver"] == "nvidia" and devices[0]["capabilities"] == ["gpu"]
        assert "count" not in devices[0], f"{name}: count gives every replica the same GPU; pin device_ids"
        assert len(devices[0]["device_ids"]) == 1
        ids += devices[0]["device_ids"]
        names.append(_worker_invocation(s["command"])["hostname"])
        assert "replicas" not in s.get("deploy", {}), f"{name}: replicas of one service share its GPU"
    assert len(set(ids)) == len(ids), f"two workers share a GPU: {ids}"
    assert len(set(names)) == len(names) and all(n.endswith("@%h") for n in names), names


def test_compose_workers_consume_their_class_queue_with_the_celery_settings_the_code_expects(monkeypatch):
    for name, s in _workers(_compose()).items():
        params = _worker_invocation(s["command"])
        settings = _settings(_service_env(s), monkeypatch)
        hc = params["hardware_class"] or settings.hardware_class
        assert hc == "h100-80gb" and settings.queue_for(hc) == "train.h100-80gb", name
        conf = celery_config(settings)
        assert conf["worker_concurrency"] == 1 and conf["worker_prefetch_multiplier"] == 1
        assert conf["task_acks_late"] and conf["task_reject_on_worker_lost"]
        assert not any(a.startswith(("--concurrency", "-c", "--prefetch")) for a in s["command"])
        # SIGTERM is a warm shutdown: compose must wait as long as a run may take before it kills.
        assert _seconds(s["stop_grace_period"]) > settings.task_time_limit_seconds, name
        assert {v.split(":")[1] for v in s["volumes"]} == {str(settings.data_dir), str(settings.checkpoint_dir)}


def test_compose_services_use_separate_database_roles_and_the_owner_only_migrates():
    services = _compose()["services"]
    user = {name: _service_env(s)["HPARENA_DATABASE_URL"].split("://")[1].split(":")[0]
            for name, s in services.items() if "HPARENA_DATABASE_URL" in (s.get("environment") or {})}
    workers = set(_workers(_compose()))
    assert user["migrate"] == "hparena" and user["api"] == "hparena_api"
    assert {user[w] for w in workers} == {"hparena_worker"}
    roles = (ROOT / "deploy/postgres/init-roles.sh").read_text()
    assert "DB_API_USER:-hparena_api" in roles and "DB_WORKER_USER:-hparena_worker" in roles
    assert "DB_OWNER:-hparena}" in roles


def test_compose_has_health_checks_named_volumes_flower_and_a_redis_that_keeps_its_tokens():
    compose = _compose()
    services = compose["services"]
    for name in ["postgres", "redis", "api", *_workers(compose)]:
        assert services[name].get("healthcheck", {}).get("test"), f"{name} has no health check"
    assert "/api/health" in " ".join(services["api"]["healthcheck"]["test"])
    assert {"pgdata", "data", "checkpoints", "redisdata"} <= set(compose["volumes"])
    redis = " ".join(services["redis"]["command"])
    assert "--appendonly yes" in redis and "--maxmemory-policy noeviction" in redis
    assert "--broker=redis://redis:6379/0" in services["flower"]["command"]
    broker = {_service_env(s)["HPARENA_BROKER_URL"] for s in services.values() if "environment" in s
              and "HPARENA_BROKER_URL" in s["environment"]}
    assert broker == {"redis://redis:6379/0"}  # Flower watches the broker the workers use
    assert "--scale" not in (ROOT / "docker-compose.yml").read_text().replace("never with `--scale`", "")


def test_compose_workers_and_the_api_send_the_task_events_flower_shows(monkeypatch):
    """Flower's Tasks tab (docs/operations.md): the workers announce each token they receive, start and finish,
    the API each one it sends. The workers send tokens too (the reconciler), so both settings apply to both."""
    compose = _compose()
    assert compose["services"]["flower"]["image"].startswith("mher/flower:")
    for name in ["api", *_workers(compose)]:
        conf = celery_config(_settings(_service_env(compose["services"][name]), monkeypatch))
        assert conf["worker_send_task_events"] and conf["task_send_sent_event"], name


def test_compose_builds_the_image_once_and_every_hparena_service_runs_that_tag():
    services = _compose()["services"]
    built = {name: s for name, s in services.items() if "build" in s}
    assert list(built) == ["migrate"], f"each service with build: makes an image of its own: {sorted(built)}"
    assert built["migrate"]["build"]["dockerfile"] == "Dockerfile.gpu"
    tag = _interpolate(built["migrate"]["image"])
    assert tag == "hparena:abc"  # named by the commit the results record
    hparena = {name for name, s in services.items() if s.get("command", [""])[0] == "hparena"}
    assert {"migrate", "api", *_workers(_compose())} <= hparena
    assert {_interpolate(services[name]["image"]) for name in hparena} == {tag}


def test_the_api_processes_share_their_metrics_in_a_directory_that_starts_empty():
    """`hparena api --workers 2`: without PROMETHEUS_MULTIPROC_DIR each scrape sees one process's latency."""
    api = _compose()["services"]["api"]
    assert api["command"][:2] == ["hparena", "api"] and "--workers" in api["command"]
    path = _service_env(api)["PROMETHEUS_MULTIPROC_DIR"]
    assert path in api["tmpfs"], "a tmpfs: empty at each container start"
    (pod, c), = [(p, c) for p, c in _k8s_containers() if c["args"][:2] == ["hparena", "api"]]
    assert "--workers" in c["args"]
    path = _k8s_env(c)["PROMETHEUS_MULTIPROC_DIR"]
    (mount,) = [m for m in c["volumeMounts"] if m["mountPath"] == path]
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    assert volume["emptyDir"]["medium"] == "Memory"
    # An emptyDir outlives a container restart: the entrypoint empties it of the last start's files.
    assert "PROMETHEUS_MULTIPROC_DIR" in (ROOT / "deploy/docker/entrypoint.sh").read_text()


def test_the_entrypoint_empties_the_metrics_directory_of_old_processes_files_only(tmp_path):
    import os

    metrics = tmp_path / "metrics"
    metrics.mkdir()
    for name in ["histogram_7.db", "gauge_livesum_12.db", "keep.txt", "notes.db"]:
        (metrics / name).write_text("x")
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(metrics)}
    done = subprocess.run([str(ROOT / "deploy/docker/entrypoint.sh"), "true"], env=env, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in metrics.iterdir()) == ["keep.txt", "notes.db"]


def test_the_env_example_leaves_every_secret_empty_so_compose_refuses_to_start_without_it():
    example = dict(line.split("=", 1) for line in (ROOT / "deploy/compose.env.example").read_text().splitlines()
                   if line and not line.startswith("#"))
    required = set(re.findall(r"\$\{(\w+):\?", (ROOT / "docker-compose.yml").read_text()))
    assert required - {"HPARENA_HARDWARE_CLASS"} <= set(example)
    # `${X:?}` refuses an empty value only: 'admin:' would start Flower with an empty password.
    assert {k: v for k, v in example.items() if k in required - {"HPARENA_HARDWARE_CLASS"} and v} == {}


def test_the_committed_compose_file_is_the_generators_output_for_its_default():
    out = subprocess.run([sys.executable, str(ROOT / "scripts/compose-gpus")], capture_output=True, text=True,
                         check=True).stdout
    assert out == (ROOT / "docker-compose.yml").read_text(), "regenerate: scripts/compose-gpus > docker-compose.yml"


def test_the_generator_pins_n_distinct_gpus_for_a_named_class():
    out = subprocess.run([sys.executable, str(ROOT / "scripts/compose-gpus"), "--gpus", "4", "--hardware-class",
                          "a100-40gb", "--threads", "6"], capture_output=True, text=True, check=True).stdout
    workers = _workers(yaml.safe_load(out))
    ids = [w["deploy"]["resources"]["reservations"]["devices"][0]["device_ids"][0] for w in workers.values()]
    assert ids == ["0", "1", "2", "3"]
    assert {w["environment"]["HPARENA_HARDWARE_CLASS"] for w in workers.values()} == {"a100-40gb"}
    assert {w["environment"]["HPARENA_WORKER_THREADS"] for w in workers.values()} == {"6"}
    bad = subprocess.run([sys.executable, str(ROOT / "scripts/compose-gpus"), "--gpu-ids", "1,1"],
                         capture_output=True, text=True)
    assert bad.returncode != 0 and "distinct" in bad.stderr


# ----------------------------------------------------------------------------------------------------
# Kubernetes: a worker Deployment per class, KEDA on the class's list, a drain that outlasts a run
# ----------------------------------------------------------------------------------------------------


def _worker_deployments() -> list[dict]:
    return [d for _, d in _k8s_docs() if d["kind"] == "Deployment"
            and d["spec"]["template"]["spec"]["containers"][0]["args"][:2] == ["hparena", "worker"]]


def test_kubernetes_worker_per_class_one_gpu_node_selector_and_keda_on_its_queue(monkeypatch):
    deployments = _worker_deployments()
    scaled = {d["spec"]["scaleTargetRef"]["name"]: d for _, d in _k8s_docs() if d["kind"] == "ScaledObject"}
    classes = set()
    for d in deployments:
        pod = d["spec"]["template"]["spec"]
        (c,) = pod["containers"]
        params = _worker_invocation(c["args"])
        settings = _settings(_k8s_env(c), monkeypatch)
        hc = params["hardware_class"]
        assert hc == settings.hardware_class, "the flag and HPARENA_HARDWARE_CLASS disagree"
        classes.add(hc)
        assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
        assert pod["nodeSelector"].get("nvidia.com/gpu.product")
        assert params["hostname"].endswith("@%h")
        conf = celery_config(settings)
        assert conf["worker_concurrency"] == 1 and conf["worker_prefetch_multiplier"] == 1
        # Scale-in drains: a preStop hook and a grace period longer than any run.
        assert c["lifecycle"]["preStop"]["exec"]["command"] == ["hparena-drain"]
        assert pod["terminationGracePeriodSeconds"] > settings.task_time_limit_seconds
        (trigger,) = scaled[d["metadata"]["name"]]["spec"]["triggers"]
        assert trigger["type"] == "redis"
        assert trigger["metadata"]["listName"] == settings.queue_for(hc)
        assert trigger["metadata"]["address"].startswith("redis.")
    assert {"h100-80gb", "a100-40gb"} <= classes
    assert len(scaled) == len(deployments)


def test_kubernetes_images_name_a_registry_and_a_commit_and_are_not_always_pulled():
    """A bare `hparena:latest` is pulled (Always, for :latest) from docker.io/library/hparena: ErrImagePull."""
    images = [c for _, c in _k8s_containers() if _is_hparena(c["image"])]
    assert len(images) >= 4  # migrate, api, a worker per class
    for c in images:
        registry, tag = c["image"].split("/")[0], c["image"].rsplit(":", 1)[1]
        assert "." in registry and tag != "latest", c["image"]
        assert c["imagePullPolicy"] == "IfNotPresent", c["name"]


def test_kubernetes_migrates_as_the_owner_and_serves_as_separate_roles():
    keys = {}
    for _, c in _k8s_containers():
        for e in c.get("env", []):
            if e["name"] == "HPARENA_DATABASE_URL":
                keys[c["args"][1]] = e["valueFrom"]["secretKeyRef"]["key"]
    assert keys == {"migrate": "database-url-owner", "api": "database-url-api", "worker": "database-url-worker"}


def test_the_kombu_redis_list_of_a_queue_is_named_after_it():
    """What KEDA's listName relies on: a message with no priority goes to the list named like the queue."""
    from kombu.transport.redis import Channel

    channel = Channel.__new__(Channel)
    channel.priority_steps, channel.sep = [0, 3, 6, 9], "\x06\x16"
    assert channel._q_for_pri("train.h100-80gb", 0) == "train.h100-80gb"


# ----------------------------------------------------------------------------------------------------
# The image
# ----------------------------------------------------------------------------------------------------


def test_the_image_runs_as_a_non_root_user_on_a_cuda_base_matching_torch():
    text = (ROOT / "Dockerfile.gpu").read_text()
    users = re.findall(r"^USER\s+(\S+)", text, re.M)
    assert users and users[-1].split(":")[0] not in ("root", "0")
    (base,) = re.findall(r"^FROM\s+nvidia/cuda:(\d+)\.(\d+)\.\d+-(?:cudnn-)?runtime-ubuntu\S+", text, re.M)
    torch_cuda = _torch_cuda()
    assert f"{base[0]}.{base[1]}" == torch_cuda
    assert "hparena-entrypoint" in text and "tini" in text


def _torch_cuda() -> str:
    """torch.version.cuda, read without importing torch (its version module is plain Python)."""
    import importlib.util

    spec = importlib.util.find_spec("torch")
    version = Path(spec.origin).parent / "version.py"
    (cuda,) = re.findall(r"^cuda: Optional\[str\] = '([\d.]+)'", version.read_text(), re.M)
    return cuda


@pytest.mark.slow
def test_the_entrypoint_packs_the_dataset_for_a_worker_then_runs_the_command(tmp_path, tiny_cifar):
    import os

    env = {**os.environ, "HPARENA_DATA_DIR": str(tmp_path / "data"), "HPARENA_DATASET_PATH": str(tiny_cifar),
           "HPARENA_ALLOW_DOWNLOAD": "false", "HPARENA_VAR_DIR": str(tmp_path / "var"),
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    entry = str(ROOT / "deploy/docker/entrypoint.sh")
    done = subprocess.run([entry, "hparena", "worker", "--help"], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    assert "Data ready" in done.stdout and "Usage" in done.stdout
    assert list((tmp_path / "data").glob("packed-*.pt"))
    # Not a worker: nothing is prepared. A worker with no data to be had doesn't start.
    env["HPARENA_DATA_DIR"] = str(tmp_path / "other")
    assert subprocess.run([entry, "true"], env=env).returncode == 0 and not (tmp_path / "other").exists()
    env["HPARENA_DATASET_PATH"] = str(tmp_path / "missing.tar.gz")
    assert subprocess.run([entry, "hparena", "worker", "--help"], env=env, capture_output=True).returncode != 0
