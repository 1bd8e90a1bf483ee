"""deploy/ without a container engine: every file parses, passes a real validator, and names
only commands, options, environment variables and endpoints that exist in the code."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import click
import jsonschema
import kubernetes_validate
import kubernetes_validate.utils as k8s_schemas
import pytest
import yaml
from referencing import Registry, Resource
from torchvision.models import get_model_weights

from contract import keys, registry
from producer.cli import main as producer_cli
from producer.gateway import create_app
from tests.support import ROOT
from worker.cli import main as worker_cli
from worker.health import HealthServer

DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
# Variables read by libraries and runtimes rather than by our CLIs, each with its reader.
THIRD_PARTY_ENV = {
    "AWS_ENDPOINT_URL": "boto3",
    "AWS_ACCESS_KEY_ID": "boto3",
    "AWS_SECRET_ACCESS_KEY": "boto3",
    "AWS_DEFAULT_REGION": "boto3",
    "TORCH_HOME": "torch.hub (pretrained weights)",
    "PYTHONUNBUFFERED": "python",
    "PIP_NO_CACHE_DIR": "pip (image build)",
    "DEBIAN_FRONTEND": "apt (image build)",
    "MINIO_ROOT_USER": "minio",
    "MINIO_ROOT_PASSWORD": "minio",
}


@dataclass
class Invocation:
    """One ``python -m worker|producer ...`` in a deploy file, with the environment it gets."""

    where: str
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)

    @property
    def module(self) -> str:
        return self.argv[self.argv.index("-m") + 1]


# -- validators ---------------------------------------------------------------------------


def test_compose_file_passes_the_compose_spec_schema() -> None:
    run = subprocess.run(
        [_tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", _compose_path()],
        capture_output=True,
        text=True,
        check=False,
    )

    assert run.returncode == 0, run.stdout + run.stderr


def test_compose_runs_redis_with_aof_a_cpu_worker_minio_and_the_gateway() -> None:
    services = _compose()["services"]

    assert "--appendonly" in services["redis"]["command"]
    assert services["redis"]["command"][services["redis"]["command"].index("--appendonly") + 1]
    assert services["minio"]["image"].startswith("minio/")
    cpu = services["worker-cpu"]["command"]
    assert cpu[cpu.index("--device") + 1] == "cpu"
    assert services["gateway"]["command"][:4] == ["python", "-m", "producer", "serve"]
    assert services["worker-cpu"]["environment"]["AWS_ENDPOINT_URL"] == "http://minio:9000"


@pytest.mark.parametrize("path", sorted(K8S.glob("*.yaml")), ids=lambda p: p.name)
def test_kubernetes_manifests_pass_the_kubernetes_schemas(path: Path) -> None:
    for doc in yaml.safe_load_all(path.read_text()):
        if doc["kind"] == "ScaledObject":  # a KEDA CRD: see the test below
            continue
        kubernetes_validate.validate(doc, kubernetes_validate.latest_version(), strict=True)


def test_keda_scaled_object_targets_the_worker_deployment_and_its_own_queue() -> None:
    """No KEDA CRD schema ships in an installed package, so the standard parts (ObjectMeta and
    the target reference) go through the Kubernetes schemas, and the rest is checked here."""
    scaled = _k8s("ScaledObject")[0]
    worker = _worker_deployment()
    model = _arg(_worker_container(worker)["args"], "--model")

    _validate_k8s_definition(scaled["metadata"], "objectmeta-meta-v1.json")
    _validate_k8s_definition(
        scaled["spec"]["scaleTargetRef"], "crossversionobjectreference-autoscaling-v2.json"
    )
    assert scaled["apiVersion"] == "keda.sh/v1alpha1"
    target = scaled["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", worker["metadata"]["name"])
    assert scaled["metadata"]["namespace"] == worker["metadata"]["namespace"]
    args = _worker_container(worker)["args"]
    weights = get_model_weights(model)[_arg(args, "--weights")]
    version = registry.model_version(str(weights), len(weights.meta["categories"]))
    gateway = _k8s("Deployment", "imgcls-gateway")[0]["spec"]["template"]["spec"]
    declare = gateway["initContainers"][0]
    declared = (_arg(declare["args"], "--weights"), int(_arg(declare["args"], "--num-classes")))
    assert registry.model_version(*declared) == version  # jobs queued at zero reach the workers
    triggers = scaled["spec"]["triggers"]
    assert [t["metadata"]["listName"] for t in triggers] == keys.queue_names(model, version)
    for trigger in triggers:
        assert trigger["type"] == "redis"
        assert trigger["metadata"]["address"] == _redis_address()
        assert int(trigger["metadata"]["listLength"]) >= 1
    assert 0 <= scaled["spec"]["minReplicaCount"] < scaled["spec"]["maxReplicaCount"]


def test_worker_deployment_requests_a_gpu_and_gates_readiness_on_the_warm_model() -> None:
    container = _worker_container(_worker_deployment())
    port = int(_arg(container["args"], "--metrics-port"))
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}

    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert _arg(container["args"], "--device").startswith("cuda")
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert ports[container[probe]["httpGet"]["port"]] == port


def test_worker_redis_url_points_at_the_redis_service() -> None:
    container = _worker_container(_worker_deployment())
    url = next(e["value"] for e in container["env"] if e["name"] == "REDIS_URL")

    assert url.startswith(f"redis://{_redis_address()}/")
    redis_set = _k8s("StatefulSet")[0]["spec"]["template"]["spec"]["containers"][0]
    assert "--appendonly" in redis_set["args"]


def test_systemd_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    """The interpreter path only exists once installed; verify checks it, so point it here."""
    unit = (DEPLOY / "imgcls-worker.service").read_text()
    interpreter = _systemd_exec_start(unit)[0]
    copy = tmp_path / "imgcls-worker.service"
    copy.write_text(unit.replace(interpreter, sys.executable))

    run = subprocess.run(
        [_tool("systemd-analyze"), "verify", str(copy)], capture_output=True, text=True
    )

    assert run.returncode == 0, run.stderr
    assert "Unknown" not in run.stderr and "Invalid" not in run.stderr, run.stderr


def test_dockerfile_builds_the_worker_on_a_cuda_image_from_files_that_exist() -> None:
    stages = _dockerfile_stages()

    assert stages["worker"]["FROM"].startswith("nvidia/cuda:")
    for stage in stages.values():
        for source in stage["COPY"]:
            assert (ROOT / source).exists(), f"COPY {source}: no such file"
    worker_env = stages["worker"]["ENV"]
    assert f"{worker_env['IMGCLS_METRICS_PORT']}" in stages["worker"]["EXPOSE"]


# -- the code behind the files ----------------------------------------------------------


def test_deploy_files_invoke_worker_and_producer(invocations: list[Invocation]) -> None:
    modules = {(i.where.split(":")[0], i.module) for i in invocations}

    assert {m for _, m in modules} == {"worker", "producer"}
    assert {w for w, _ in modules} == {"Dockerfile", "docker-compose.yml", "k8s", "systemd"}


def test_every_command_parses_with_the_real_cli_and_its_environment(
    invocations: list[Invocation], monkeypatch: pytest.MonkeyPatch
) -> None:
    for invocation in invocations:
        command, args = _command(invocation)
        with monkeypatch.context() as env:
            for name in _cli_env_names():
                env.delenv(name, raising=False)
            for name, value in invocation.env.items():
                env.setenv(name, value)
            try:
                command.make_context(command.name or "cli", list(args))
            except click.ClickException as e:
                pytest.fail(
                    f"{invocation.where}: {shlex.join(invocation.argv)}: {e.format_message()}"
                )


def test_every_environment_variable_is_read_by_the_code(invocations: list[Invocation]) -> None:
    for invocation in invocations:
        command, _ = _command(invocation)
        ours = {e for p in command.params for e in _envvars(p)}
        for name in invocation.env:
            assert name in ours or name in THIRD_PARTY_ENV, (
                f"{invocation.where}: {name} is not read by `{invocation.module}` "
                f"(its variables: {', '.join(sorted(ours))})"
            )


def test_worker_probe_paths_are_served_by_the_worker() -> None:
    paths = {
        c[probe]["httpGet"]["path"]
        for c in [_worker_container(_worker_deployment())]
        for probe in ("readinessProbe", "livenessProbe", "startupProbe")
    }
    paths |= {_healthcheck_path(_compose()["services"]["worker-cpu"]["healthcheck"]["test"])}
    server = HealthServer("127.0.0.1", 0).start()
    try:
        import httpx

        codes = {p: httpx.get(f"http://127.0.0.1:{server.port}{p}").status_code for p in paths}
    finally:
        server.close()

    assert paths == {"/healthz", "/readyz"}
    assert codes == {"/healthz": 200, "/readyz": 503}  # answered, and not ready: no model yet


def test_gateway_probe_paths_are_routes_of_the_gateway() -> None:
    routes = {getattr(r, "path", None) for r in create_app().routes}
    container = _k8s("Deployment", "imgcls-gateway")[0]["spec"]["template"]["spec"]["containers"][0]

    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"]["path"] in routes
    assert "/metrics" in routes


# -- collecting invocations --------------------------------------------------------------


@pytest.fixture(scope="module")
def invocations() -> list[Invocation]:
    found = [*_from_compose(), *_from_k8s(), *_from_dockerfile(), *_from_systemd()]
    return [i for i in found if "-m" in i.argv and i.module in ("worker", "producer")]


def _from_compose() -> Iterator[Invocation]:
    for name, service in _compose()["services"].items():
        if isinstance(service.get("command"), list):
            env = {k: str(v) for k, v in (service.get("environment") or {}).items()}
            yield Invocation(f"docker-compose.yml:{name}", service["command"], env)


def _from_k8s() -> Iterator[Invocation]:
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            template = doc.get("spec", {}).get("template", {}).get("spec", {})
            for c in [*template.get("initContainers", []), *template.get("containers", [])]:
                env = {e["name"]: str(e.get("value", "from-a-secret")) for e in c.get("env", [])}
                argv = [*c.get("command", []), *c.get("args", [])]
                yield Invocation(f"k8s:{path.name}:{c['name']}", argv, env)


def _from_dockerfile() -> Iterator[Invocation]:
    for name, stage in _dockerfile_stages().items():
        for argv in stage["CMD"]:
            yield Invocation(f"Dockerfile:{name}", argv, dict(stage["ENV"]))


def _from_systemd() -> Iterator[Invocation]:
    unit = (DEPLOY / "imgcls-worker.service").read_text()
    env = dict(
        v.split("=", 1) for v in re.findall(r"^Environment=(\S+)$", unit, flags=re.MULTILINE)
    )
    yield Invocation("systemd:imgcls-worker.service", _systemd_exec_start(unit), env)


def _systemd_exec_start(unit: str) -> list[str]:
    (line,) = re.findall(r"^ExecStart=(.+)$", unit, flags=re.MULTILINE)
    return shlex.split(line)


def _command(invocation: Invocation) -> tuple[click.Command, list[str]]:
    rest = invocation.argv[invocation.argv.index("-m") + 2 :]
    if invocation.module == "worker":
        return worker_cli, rest
    command: click.Command = producer_cli
    while isinstance(command, click.Group):  # down to the subcommand (``models declare``)
        assert rest and rest[0] in command.commands, f"{invocation.where}: {rest[:1]}"
        command, rest = command.commands[rest[0]], rest[1:]
    return command, rest


def _envvars(param: click.Parameter) -> list[str]:
    envvar = getattr(param, "envvar", None)
    if envvar is None:
        return []
    return [envvar] if isinstance(envvar, str) else list(envvar)


def _cli_env_names() -> set[str]:
    commands = [worker_cli, *producer_cli.commands.values()]
    return {e for c in commands for p in c.params for e in _envvars(p)}


# -- reading the files -------------------------------------------------------------------


def _compose_path() -> str:
    return str(DEPLOY / "docker-compose.yml")


def _compose() -> dict:
    return yaml.safe_load(Path(_compose_path()).read_text())


def _k8s(kind: str, name: str | None = None) -> list[dict]:
    docs = [d for p in sorted(K8S.glob("*.yaml")) for d in yaml.safe_load_all(p.read_text())]
    return [d for d in docs if d["kind"] == kind and name in (None, d["metadata"]["name"])]


def _worker_deployment() -> dict:
    return _k8s("Deployment", "imgcls-worker-resnet50")[0]


def _worker_container(deployment: dict) -> dict:
    return deployment["spec"]["template"]["spec"]["containers"][0]


def _redis_address() -> str:
    service = _k8s("Service", "redis")[0]
    meta, port = service["metadata"], service["spec"]["ports"][0]["port"]
    return f"{meta['name']}.{meta['namespace']}.svc.cluster.local:{port}"


def _arg(args: list[str], option: str) -> str:
    return args[args.index(option) + 1]


def _healthcheck_path(test: list[str]) -> str:
    (url,) = re.findall(r"http://127\.0\.0\.1:\d+(/\w+)", " ".join(test))
    return url


def _validate_k8s_definition(instance: dict, schema_file: str) -> None:
    """Validate against one of kubernetes-validate's (strict) schemas, as it does itself."""
    latest = kubernetes_validate.latest_version()
    folder = f"kubernetes-json-schema/v{latest}-local-strict"
    schema = k8s_schemas.schema_contents(f"{folder}/{schema_file}", latest)
    definitions = k8s_schemas.schema_contents(f"{folder}/_definitions.json", latest)
    registry = Resource.from_contents(definitions) @ (Resource.from_contents(schema) @ Registry())
    jsonschema.Draft202012Validator(schema, registry=registry).validate(instance)


def _dockerfile_stages() -> dict[str, dict]:
    """Instructions per stage, joined across line continuations; CMD in exec form only."""
    text = re.sub(r"\\\n", " ", (DEPLOY / "Dockerfile").read_text())
    stages: dict[str, dict] = {}
    stage: dict = {}
    for line in text.splitlines():
        words = line.strip().split(None, 1)
        if not words or words[0].startswith("#"):
            continue
        instruction, rest = words[0].upper(), (words[1] if len(words) > 1 else "")
        if instruction == "FROM":
            image, _, name = rest.partition(" AS ")
            stage = {"FROM": image.strip(), "COPY": [], "ENV": {}, "CMD": [], "EXPOSE": []}
            stages[name.strip()] = stage
        elif instruction == "COPY":
            stage["COPY"] += shlex.split(rest)[:-1]
        elif instruction == "ENV":
            stage["ENV"].update(kv.split("=", 1) for kv in shlex.split(rest))
        elif instruction == "CMD":
            stage["CMD"].append(json.loads(rest))
        elif instruction == "EXPOSE":
            stage["EXPOSE"] += rest.split()
    return stages


def _tool(name: str) -> str:
    found = shutil.which(name) or shutil.which(name, path=os.path.dirname(sys.executable))
    assert found, f"{name} is not installed"
    return found
