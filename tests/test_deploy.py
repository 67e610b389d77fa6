"""The deployment files agree with each other and with the worker's own settings.

deploy/Dockerfile, deploy/docker-compose.yml, deploy/k8s/, deploy/prometheus/ and deploy/grafana/
name the same port, paths, user, timeouts and job in several places; these tests read them
(no cluster, no container engine, no network) and check that they still line up. Every
``STREAM_FM_*`` variable is fed through ``load_settings`` exactly as the worker does at
start-up. ``kustomize build`` and ``docker compose config`` render the files with the real
tools (``make test`` builds both once with Go); a missing tool fails the test with that advice.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
from collections.abc import Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from stream_fm.config import ENV_PREFIX, Settings, load_settings
from stream_fm.errors import ConfigError
from tests.prometheus_helpers import missing_tool

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
DOCKERFILE = DEPLOY / "Dockerfile"
COMPOSE = DEPLOY / "docker-compose.yml"
PROMETHEUS_K8S_CONFIG = DEPLOY / "prometheus" / "prometheus.yml"
PROMETHEUS_COMPOSE_CONFIG = DEPLOY / "prometheus" / "prometheus-compose.yml"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
GRAFANA = DEPLOY / "grafana"

# One checkpoint write (serialize, fsync, rename, fsync the directory) on top of the batch the
# drain finishes; the grace periods must leave at least this much after poll + produce.
CHECKPOINT_WRITE_S = 5.0
# On a node whose CPU differs from the image builder's, numba compiles the kernels at start
# (~60 s cold), then the worker waits up to 30 s for its input topics before the loop runs.
STARTUP_BUDGET_S = 60 + 30
SCRAPE_ANNOTATIONS = ("prometheus.io/scrape", "prometheus.io/port", "prometheus.io/path")


# helpers: parsing


def _yaml() -> ModuleType:
    try:
        import yaml
    except ImportError:
        pytest.fail("PyYAML is not installed: pip install -e '.[dev]' (make test does)")
    module: ModuleType = yaml
    return module


def _tool(name: str, *candidates: Path) -> str:
    """A validator binary on PATH or where ``make test`` builds it, or a failed test."""
    found = shutil.which(name) or next((str(c) for c in candidates if c.is_file()), None)
    if found is None:
        missing_tool(f"{name} not found: `make test` (scripts/setup-tests) builds it with Go")
    assert found is not None
    return found


def _cache_bin() -> Path:
    root = os.environ.get("STREAM_FM_KAFKA_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "stream-fm"
    )
    return Path(root) / "bin"


def _load_yaml(path: Path) -> Any:
    return _yaml().safe_load(path.read_text())


def _k8s_objects() -> list[dict[str, Any]]:
    """Every document of every manifest in deploy/k8s, the Kustomization included."""
    yaml = _yaml()
    objects: list[dict[str, Any]] = []
    for path in sorted(K8S.glob("*.yaml")):
        for document in yaml.safe_load_all(path.read_text()):
            if document is not None:
                assert isinstance(document, dict), f"{path.name}: not a mapping"
                objects.append(document)
    return objects


def _k8s(kind: str) -> dict[str, Any]:
    found = [o for o in _k8s_objects() if o.get("kind") == kind]
    assert len(found) == 1, f"expected one {kind} in deploy/k8s, found {len(found)}"
    return found[0]


def _pod_spec() -> dict[str, Any]:
    spec: dict[str, Any] = _k8s("StatefulSet")["spec"]["template"]["spec"]
    return spec


def _container() -> dict[str, Any]:
    containers = _pod_spec()["containers"]
    assert len(containers) == 1, "the worker pod has one container"
    container: dict[str, Any] = containers[0]
    return container


def _pod_labels() -> dict[str, str]:
    labels: dict[str, str] = _k8s("StatefulSet")["spec"]["template"]["metadata"]["labels"]
    return labels


def _configmap_env() -> dict[str, str]:
    data: dict[str, str] = _k8s("ConfigMap")["data"]
    return data


def _dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuations joined and comment lines dropped, as Docker does."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        keyword, _, args = (pending + line).partition(" ")
        instructions.append((keyword.upper(), args.strip()))
        pending = ""
    assert not pending, "Dockerfile ends inside a line continuation"
    return instructions


def _dockerfile(keyword: str) -> list[str]:
    return [args for key, args in _dockerfile_instructions() if key == keyword]


def _dockerfile_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for args in _dockerfile("ENV"):
        for word in shlex.split(args):
            name, sep, value = word.partition("=")
            assert sep, f"ENV {args!r}: use the NAME=value form"
            env[name] = value
    return env


def _dockerfile_uid() -> int:
    uids = [int(m) for args in _dockerfile("RUN") for m in re.findall(r"--uid[= ](\d+)", args)]
    assert len(uids) == 1, "the Dockerfile creates exactly one user with useradd --uid"
    return uids[0]


def _compose() -> dict[str, Any]:
    document: dict[str, Any] = _load_yaml(COMPOSE)
    return document


def _service(name: str) -> dict[str, Any]:
    services = _compose()["services"]
    assert name in services, f"docker-compose.yml has no service {name!r}"
    service: dict[str, Any] = services[name]
    return service


def _compose_env(service: Mapping[str, Any]) -> dict[str, str]:
    """A service's environment as strings, whichever of the two compose forms it uses."""
    environment = service.get("environment") or {}
    if isinstance(environment, list):  # the ["NAME=value", ...] form
        pairs = [str(item).partition("=") for item in environment]
        return {name: value for name, _, value in pairs}
    env: dict[str, str] = {}
    for name, value in environment.items():
        if isinstance(value, bool):  # YAML true/false; compose wants them quoted anyway
            env[str(name)] = str(value).lower()
        else:
            env[str(name)] = "" if value is None else str(value)
    return env


def _bind_mounts(service: Mapping[str, Any]) -> dict[str, Path]:
    """Container path -> host path (relative paths resolve against deploy/, as compose does)."""
    mounts: dict[str, Path] = {}
    for volume in service.get("volumes", []):
        if isinstance(volume, dict):
            if volume.get("type") != "bind":
                continue
            source, target = str(volume["source"]), str(volume["target"])
        else:
            source, target, *_ = str(volume).split(":")
            if not source.startswith((".", "/")):  # a named volume
                continue
        mounts[target] = (DEPLOY / source).resolve()
    return mounts


def _named_volume_targets(service: Mapping[str, Any]) -> dict[str, str]:
    targets: dict[str, str] = {}
    for volume in service.get("volumes", []):
        if isinstance(volume, str):
            source, target, *_ = volume.split(":")
            if not source.startswith((".", "/")):
                targets[target] = source
        elif volume.get("type") == "volume":
            targets[str(volume["target"])] = str(volume["source"])
    return targets


def _container_ports(service: Mapping[str, Any]) -> set[int]:
    ports: set[int] = set()
    for port in service.get("ports", []):
        if isinstance(port, dict):
            ports.add(int(port["target"]))
        else:
            ports.add(int(str(port).rsplit(":", 1)[-1].split("/")[0]))
    return ports


def _duration_s(text: str) -> float:
    """A compose duration such as ``60s``, ``1m30s`` or ``500ms`` in seconds."""
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|us|h|m|s)", text)
    assert parts and "".join(n + u for n, u in parts) == text, f"not a duration: {text!r}"
    return sum(float(n) * units[u] for n, u in parts)


def _settings(env: Mapping[str, str]) -> Settings:
    """What the worker builds from these variables at start-up (it raises on unknown names)."""
    return load_settings(env={k: v for k, v in env.items() if k.startswith(ENV_PREFIX)})


def _drain_s(settings: Settings) -> float:
    """The longest SIGTERM drain: one poll, the produce acknowledgements, one checkpoint."""
    return settings.poll_timeout_ms / 1000 + settings.produce_timeout_s + CHECKPOINT_WRITE_S


def _expand_like_grafana(value: str, env: Mapping[str, str]) -> str:
    """Grafana provisioning expands values with Go's os.ExpandEnv: ``$NAME`` and ``${...}``,
    where everything between the braces is the name (no ``:-default`` syntax)."""
    return re.sub(
        r"\$\{([^}]*)\}|\$([A-Za-z0-9_]+)",
        lambda m: env.get(m.group(1) if m.group(1) is not None else m.group(2), ""),
        value.replace("$$", "\0"),
    ).replace("\0", "$")


def _tool_works(*command: str) -> bool:
    if shutil.which(command[0]) is None:
        return False
    try:
        result = subprocess.run(command, capture_output=True, timeout=60, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return result.returncode == 0


# Dockerfile


def test_dockerfile_runs_as_the_created_non_root_user() -> None:
    users = _dockerfile("USER")
    assert users, "the image must not run as root"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0")
    useradd = next(args for args in _dockerfile("RUN") if "useradd" in args)
    assert user == str(_dockerfile_uid()) or re.search(rf"\b{re.escape(user)}\b", useradd)


def test_dockerfile_healthcheck_hits_healthz_on_the_metrics_port() -> None:
    (healthcheck,) = _dockerfile("HEALTHCHECK")
    assert "/healthz" in healthcheck
    port = _dockerfile_env()["STREAM_FM_METRICS_PORT"]
    assert "STREAM_FM_METRICS_PORT" in healthcheck or f":{port}/" in healthcheck
    assert _dockerfile("EXPOSE") == [port]


def test_dockerfile_cmd_is_exec_form_so_sigterm_reaches_the_worker() -> None:
    (cmd,) = _dockerfile("CMD")
    assert json.loads(cmd) == ["stream-fm", "run"]
    assert not _dockerfile("ENTRYPOINT"), "a shell-form ENTRYPOINT would swallow SIGTERM"


def test_dockerfile_env_names_are_real_settings() -> None:
    env = _dockerfile_env()
    settings = _settings(env)
    assert settings.metrics_host == "0.0.0.0", "/metrics must listen beyond loopback in a container"
    (volume,) = _dockerfile("VOLUME")
    assert json.loads(volume) == [settings.checkpoint_dir]


# Kubernetes


def test_kustomization_lists_every_manifest() -> None:
    kustomization = _load_yaml(K8S / "kustomization.yaml")
    manifests = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kustomization["resources"]) == manifests
    kinds = sorted(str(o["kind"]) for o in _k8s_objects())
    assert kinds == ["ConfigMap", "Kustomization", "PodDisruptionBudget", "Service", "StatefulSet"]


def test_configmap_names_only_real_settings_as_strings() -> None:
    env = _configmap_env()
    assert all(name.startswith(ENV_PREFIX) for name in env), "the ConfigMap holds settings only"
    assert all(isinstance(value, str) for value in env.values()), "ConfigMap values are strings"
    settings = _settings(env)
    assert settings.metrics_host == "0.0.0.0", "probes and Prometheus come from outside the pod"
    (env_from,) = _container()["envFrom"]
    assert env_from["configMapRef"]["name"] == _k8s("ConfigMap")["metadata"]["name"]


def test_statefulset_runs_the_image_command() -> None:
    statefulset = _k8s("StatefulSet")
    assert statefulset["spec"]["podManagementPolicy"] == "Parallel"
    assert statefulset["spec"]["replicas"] >= 2
    assert _container()["command"] == json.loads(_dockerfile("CMD")[0])


def test_probes_use_the_metrics_port() -> None:
    container = _container()
    port = _settings(_configmap_env()).metrics_port
    assert port == int(_dockerfile_env()["STREAM_FM_METRICS_PORT"])
    named = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert named.get("metrics") == port

    def probe_target(probe: str) -> tuple[str, int]:
        get = container[probe]["httpGet"]
        target = get["port"]
        return get["path"], named[target] if isinstance(target, str) else int(target)

    assert probe_target("livenessProbe") == ("/healthz", port)
    assert probe_target("readinessProbe") == ("/readyz", port)
    assert probe_target("startupProbe") == ("/healthz", port)


def test_startup_probe_waits_for_numba_compilation() -> None:
    probe = _container()["startupProbe"]
    budget = (
        probe.get("initialDelaySeconds", 0) + probe["periodSeconds"] * probe["failureThreshold"]
    )
    assert budget >= STARTUP_BUDGET_S


def test_checkpoint_volume_is_mounted_at_checkpoint_dir() -> None:
    checkpoint_dir = _settings(_configmap_env()).checkpoint_dir
    assert checkpoint_dir == _dockerfile_env()["STREAM_FM_CHECKPOINT_DIR"]
    mounts = {m["mountPath"]: m["name"] for m in _container()["volumeMounts"]}
    assert checkpoint_dir in mounts
    claims = {t["metadata"]["name"] for t in _k8s("StatefulSet")["spec"]["volumeClaimTemplates"]}
    assert mounts[checkpoint_dir] in claims


def test_termination_grace_outlasts_the_drain() -> None:
    grace = _pod_spec()["terminationGracePeriodSeconds"]
    assert grace > _drain_s(_settings(_configmap_env()))


def test_pod_security_matches_the_image() -> None:
    pod = _pod_spec()["securityContext"]
    assert pod["runAsNonRoot"] is True
    assert pod["runAsUser"] == _dockerfile_uid()
    assert pod["fsGroup"] == _dockerfile_uid(), "the checkpoint volume must be writable"
    container = _container()["securityContext"]
    assert container["allowPrivilegeEscalation"] is False
    assert container["capabilities"]["drop"] == ["ALL"]
    assert container["readOnlyRootFilesystem"] is True
    # With a read-only root, numba's cache directory must sit on a writable emptyDir.
    numba_cache = Path(_dockerfile_env()["NUMBA_CACHE_DIR"])
    empty_dirs = {v["name"] for v in _pod_spec()["volumes"] if "emptyDir" in v}
    writable = [
        Path(m["mountPath"]) for m in _container()["volumeMounts"] if m["name"] in empty_dirs
    ]
    assert any(numba_cache.is_relative_to(path) for path in writable)


def test_the_image_carries_compiled_kernels_and_k8s_seeds_them() -> None:
    # The Dockerfile compiles as the app user after NUMBA_CACHE_DIR is set ...
    steps = _dockerfile_instructions()
    compile_at = steps.index(("RUN", "stream-fm compile"))
    assert ("USER", "streamfm") in steps[:compile_at]
    cache = _dockerfile_env()["NUMBA_CACHE_DIR"]
    # ... and the init container copies that cache to the volume the worker mounts there.
    (init,) = _pod_spec()["initContainers"]
    assert init["image"] == _container()["image"]
    assert f"{cache}/." in " ".join(init["command"])
    (seed,) = init["volumeMounts"]
    mounts = {m["mountPath"]: m["name"] for m in _container()["volumeMounts"]}
    assert mounts[cache] == seed["name"]
    assert seed["mountPath"] in " ".join(init["command"])


def test_service_is_headless_and_selects_the_pods() -> None:
    service = _k8s("Service")
    statefulset = _k8s("StatefulSet")
    assert service["spec"]["clusterIP"] == "None"
    assert statefulset["spec"]["serviceName"] == service["metadata"]["name"]
    assert service["spec"]["selector"].items() <= _pod_labels().items()
    assert statefulset["spec"]["selector"]["matchLabels"].items() <= _pod_labels().items()
    port = _settings(_configmap_env()).metrics_port
    (service_port,) = service["spec"]["ports"]
    assert service_port["name"] == "metrics"
    assert service_port["port"] == port
    assert service_port["targetPort"] in ("metrics", port)


@pytest.mark.parametrize("owner", ["Service", "pod template"])
def test_scrape_annotations_name_the_metrics_port(owner: str) -> None:
    metadata = (
        _k8s("Service")["metadata"]
        if owner == "Service"
        else _k8s("StatefulSet")["spec"]["template"]["metadata"]
    )
    annotations = metadata["annotations"]
    port = _settings(_configmap_env()).metrics_port
    assert [annotations[key] for key in SCRAPE_ANNOTATIONS] == ["true", str(port), "/metrics"]


def test_pdb_selects_the_worker_pods() -> None:
    pdb = _k8s("PodDisruptionBudget")
    assert pdb["spec"]["maxUnavailable"] == 1
    selector = pdb["spec"]["selector"]["matchLabels"]
    assert selector.items() <= _pod_labels().items()
    assert selector == _k8s("StatefulSet")["spec"]["selector"]["matchLabels"]


def test_kustomize_renders_every_resource() -> None:
    if shutil.which("kubectl"):
        command = ["kubectl", "kustomize", str(K8S)]
    else:
        command = [_tool("kustomize", _cache_bin() / "kustomize"), "build", str(K8S)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    kinds = sorted(str(d["kind"]) for d in _yaml().safe_load_all(result.stdout) if d)
    assert kinds == ["ConfigMap", "PodDisruptionBudget", "Service", "StatefulSet"]


# docker compose


def test_compose_has_the_stack() -> None:
    services = set(_compose()["services"])
    assert {"kafka", "worker", "simulator", "prometheus", "grafana"} <= services


def test_compose_env_names_are_real_settings() -> None:
    checked = 0
    for name, service in _compose()["services"].items():
        env = _compose_env(service)
        if any(var.startswith(ENV_PREFIX) for var in env):
            try:
                _settings(env)
            except ConfigError as error:
                pytest.fail(f"docker-compose.yml service {name}: {error}")
            checked += 1
    assert checked, f"no compose service sets {ENV_PREFIX}* variables"


def test_compose_worker_serves_metrics_and_drains_in_time() -> None:
    worker = _service("worker")
    settings = _settings(_dockerfile_env() | _compose_env(worker))
    assert settings.metrics_host == "0.0.0.0"
    assert settings.metrics_port in _container_ports(worker)
    assert _duration_s(str(worker["stop_grace_period"])) > _drain_s(settings)
    # The image's HEALTHCHECK (on /healthz) applies unless compose replaces it.
    healthcheck = worker.get("healthcheck")
    if healthcheck is None:
        assert "/healthz" in _dockerfile("HEALTHCHECK")[0]
    else:
        assert not healthcheck.get("disable", False)
        assert "/healthz" in " ".join(map(str, healthcheck["test"]))
    assert settings.checkpoint_dir in _named_volume_targets(worker)


def test_compose_prometheus_mounts_its_config_and_rules() -> None:
    mounts = _bind_mounts(_service("prometheus"))
    config_target = "/etc/prometheus/prometheus.yml"
    assert mounts.get(config_target) == PROMETHEUS_COMPOSE_CONFIG.resolve()
    for host_path in mounts.values():
        assert host_path.exists(), f"prometheus mounts {host_path}, which does not exist"
    # rule_files resolve relative to the config file, inside the container.
    rule_files = _load_yaml(PROMETHEUS_COMPOSE_CONFIG)["rule_files"]
    assert rule_files
    for rule_file in rule_files:
        target = str(Path(config_target).parent / rule_file)
        assert mounts.get(target) == ALERTS.resolve(), f"rule file {target} is not mounted"


def test_compose_scrape_config_targets_the_worker_metrics_port() -> None:
    compose_config = _load_yaml(PROMETHEUS_COMPOSE_CONFIG)
    assert compose_config["global"]["scrape_interval"] == "15s"
    (job,) = compose_config["scrape_configs"]
    (static,) = job["static_configs"]
    port = _settings(_dockerfile_env() | _compose_env(_service("worker"))).metrics_port
    assert static["targets"] == [f"worker:{port}"]
    # Same job name as the reference config, and the one the alert rules select.
    reference_jobs = {j["job_name"] for j in _load_yaml(PROMETHEUS_K8S_CONFIG)["scrape_configs"]}
    assert job["job_name"] in reference_jobs
    assert f'job="{job["job_name"]}"' in ALERTS.read_text()


def test_compose_grafana_is_provisioned_from_the_repo() -> None:
    grafana = _service("grafana")
    mounts = _bind_mounts(grafana)
    provisioning = mounts.get("/etc/grafana/provisioning")
    dashboards = mounts.get("/var/lib/grafana/dashboards")
    assert provisioning == (GRAFANA / "provisioning").resolve()
    assert dashboards == (GRAFANA / "dashboards").resolve()
    assert (provisioning / "datasources").is_dir()
    assert (provisioning / "dashboards").is_dir()
    assert sorted(dashboards.glob("*.json")), "no dashboard to provision"
    env = _compose_env(grafana)
    assert env.get("GF_AUTH_ANONYMOUS_ENABLED") == "true"
    assert env.get("GF_AUTH_ANONYMOUS_ORG_ROLE") == "Viewer"
    home = env.get("GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH")
    if home is not None:
        assert (dashboards / Path(home).relative_to("/var/lib/grafana/dashboards")).is_file()
    # Every dashboard provider reads the directory the dashboards are mounted at.
    for provider_file in sorted((provisioning / "dashboards").glob("*.y*ml")):
        for provider in _load_yaml(provider_file)["providers"]:
            assert provider["options"]["path"] == "/var/lib/grafana/dashboards"


def test_compose_grafana_datasource_reaches_compose_prometheus() -> None:
    grafana_env = _compose_env(_service("grafana"))
    urls: list[str] = []
    for path in sorted((GRAFANA / "provisioning" / "datasources").glob("*.y*ml")):
        for datasource in _load_yaml(path)["datasources"]:
            if datasource["type"] == "prometheus":
                urls.append(_expand_like_grafana(str(datasource["url"]), grafana_env))
    assert urls, "no Prometheus datasource is provisioned"
    assert "prometheus" in _compose()["services"]
    # 9090: the port Prometheus listens on inside its container (published as 127.0.0.1:9090).
    assert 9090 in _container_ports(_service("prometheus"))
    assert "http://prometheus:9090" in urls, f"datasource urls as Grafana expands them: {urls}"


def test_dashboard_datasources_resolve() -> None:
    """Each panel's datasource is the provisioned uid or a datasource-type dashboard variable."""
    uids = {
        str(datasource["uid"])
        for path in sorted((GRAFANA / "provisioning" / "datasources").glob("*.y*ml"))
        for datasource in _load_yaml(path)["datasources"]
        if "uid" in datasource
    }
    for path in sorted((GRAFANA / "dashboards").glob("*.json")):
        dashboard = json.loads(path.read_text())
        variables = {
            v["name"]
            for v in dashboard.get("templating", {}).get("list", [])
            if v.get("type") == "datasource"
        }
        allowed = uids | {f"${{{name}}}" for name in variables} | {f"${name}" for name in variables}
        used = set(re.findall(r'"datasource":\s*\{[^{}]*?"uid":\s*"([^"]*)"', path.read_text()))
        assert used <= allowed, f"{path.name}: unknown datasource uid(s) {sorted(used - allowed)}"


def test_docker_compose_config_is_valid() -> None:
    # make test builds the compose plugin (no engine is needed to validate a file); without a
    # docker CLI the plugin binary runs on its own.
    if _tool_works("docker", "compose", "version"):
        command = ["docker", "compose"]
    else:
        plugins = Path(os.environ.get("DOCKER_CONFIG") or os.path.expanduser("~/.docker"))
        command = [_tool("docker-compose", plugins / "cli-plugins" / "docker-compose")]
    result = subprocess.run(
        [*command, "-f", str(COMPOSE), "config", "-q"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
