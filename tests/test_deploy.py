"""The Dockerfile and Kubernetes manifests agree with the configuration they feed the sidecar."""

from __future__ import annotations

import re
import shlex
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from sidecar.app import STORE_CHECK_TIMEOUT
from sidecar.config import Config, ConfigError, load, split_addr

ROOT = Path(__file__).resolve().parent.parent
KUBE = ROOT / "deploy" / "kubernetes"


def manifests() -> dict[str, Any]:
    """Every document under deploy/kubernetes by kind; each file must parse as YAML."""
    by_kind: dict[str, Any] = {}
    for path in sorted(KUBE.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")):
            if doc:
                by_kind[doc["kind"]] = doc
    return by_kind


def pod_spec() -> dict[str, Any]:
    spec: dict[str, Any] = manifests()["Deployment"]["spec"]["template"]["spec"]
    return spec


def all_containers() -> list[dict[str, Any]]:
    spec = pod_spec()
    return [*spec.get("initContainers", []), *spec["containers"]]


def container(name: str) -> dict[str, Any]:
    return next(c for c in all_containers() if c["name"] == name)


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = (ROOT / "Dockerfile").read_text(encoding="utf-8")
    lines = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    out = []
    for line in joined.splitlines():
        if line.strip():
            word, _, rest = line.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def image_env(stage: str = "") -> dict[str, str]:
    """The ENV settings of the stage named ``stage`` (``FROM ... AS stage``), or of the final one."""
    env: dict[str, str] = {}
    current = ""
    for instruction, args in dockerfile_instructions():
        if instruction == "FROM":
            if env and stage and current == stage:
                break
            env, current = {}, args.split()[-1] if " AS " in args.upper() else ""  # a new stage starts empty
        elif instruction == "ENV":
            env.update(dict(pair.split("=", 1) for pair in shlex.split(args)))
    return env


def test_the_kubernetes_example_has_a_deployment_a_volume_claim_and_a_secret() -> None:
    assert {"Deployment", "PersistentVolumeClaim", "Secret"} <= manifests().keys()


def test_the_sidecar_container_env_is_a_valid_configuration() -> None:
    secret = manifests()["Secret"]["stringData"]
    env = {}
    for item in container("sidecar")["env"]:
        if item["name"].startswith("SIDECAR_"):
            ref = item.get("valueFrom", {}).get("secretKeyRef")
            env[item["name"]] = secret[ref["key"]] if ref else item["value"]
    known = {"SIDECAR_" + name.upper() for name in Config.__dataclass_fields__}
    assert env.keys() <= known, "a misspelt SIDECAR_ variable would be ignored silently"
    config = load(env={**image_env(), **env})
    assert config.response_url == "http://localhost:3000/botpress"


def test_every_secret_key_the_pod_reads_is_in_the_example_secret() -> None:
    secret = manifests()["Secret"]
    for c in all_containers():
        for item in c.get("env", []):
            ref = item.get("valueFrom", {}).get("secretKeyRef")
            if ref:
                assert ref["name"] == secret["metadata"]["name"]
                assert ref["key"] in secret["stringData"]


def test_sqlite_gets_one_replica_replaced_not_rolled() -> None:
    spec = manifests()["Deployment"]["spec"]
    assert spec["replicas"] == 1
    assert spec["strategy"]["type"] == "Recreate"
    mounts = {m["mountPath"]: m["name"] for m in container("sidecar")["volumeMounts"]}
    volumes = {v["name"]: v for v in pod_spec()["volumes"]}
    assert "persistentVolumeClaim" in volumes[mounts["/var/lib/sidecar"]]


def test_the_sidecar_is_a_native_sidecar_started_before_and_stopped_after_the_backend() -> None:
    (sidecar,) = pod_spec()["initContainers"]
    assert (sidecar["name"], sidecar["restartPolicy"]) == ("sidecar", "Always")
    # The backend starts once the sidecar is ready: every listener up, the store writable.
    assert sidecar["startupProbe"]["httpGet"] == {"path": "/readyz", "port": "admin"}
    assert [c["name"] for c in pod_spec()["containers"]] == ["backend"]


def test_the_grace_period_covers_the_backend_then_the_drain_with_margin() -> None:
    """A native sidecar stops after the backend, within the same grace period: the
    backend's own shutdown (10 s assumed in the manifest), then the drain, then ~1 s."""
    env = {e["name"]: e.get("value") for e in container("sidecar")["env"]}
    assert pod_spec()["terminationGracePeriodSeconds"] >= 10 + float(env["SIDECAR_DRAIN_TIMEOUT"]) + 5


def test_probes_use_the_admin_port_health_endpoints() -> None:
    sidecar = container("sidecar")
    ports = {p["name"]: p["containerPort"] for p in sidecar["ports"]}
    _, admin_port = split_addr(image_env()["SIDECAR_ADMIN_ADDR"], "admin_addr")
    assert ports["admin"] == admin_port
    assert sidecar["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "admin"}
    assert sidecar["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "admin"}


def test_readyz_probes_wait_longer_than_its_store_check() -> None:
    """/readyz bounds its store write at STORE_CHECK_TIMEOUT and then answers 503 with the
    reason; a probe that gives up first (Kubernetes' default is 1 s) reports a bare timeout."""
    sidecar = container("sidecar")
    for probe in ("startupProbe", "readinessProbe"):
        assert sidecar[probe]["httpGet"]["path"] == "/readyz"
        assert sidecar[probe].get("timeoutSeconds", 1) > STORE_CHECK_TIMEOUT, probe


def test_the_memory_limit_holds_the_sidecar_at_rest_and_every_stream_it_admits() -> None:
    """~70 MiB at rest, ~24 KiB per idle Subscribe (docs/performance.md) and a full queue
    (max_pending_bytes estimates its memory), with a third to spare for bursts."""
    secret = manifests()["Secret"]["stringData"]
    env = {
        e["name"]: e["value"] if "value" in e else secret[e["valueFrom"]["secretKeyRef"]["key"]]
        for e in container("sidecar")["env"]
    }
    config = load(env={**image_env(), **{k: v for k, v in env.items() if k.startswith("SIDECAR_")}})
    limit = container("sidecar")["resources"]["limits"]["memory"]
    assert limit.endswith("Mi")
    queue = config.max_pending_bytes / 2**20
    assert (70 + config.max_streams * 24 / 1024 + queue) * 1.33 <= int(limit[:-2])


def test_the_pod_runs_locked_down() -> None:
    assert pod_spec()["securityContext"]["runAsNonRoot"] is True
    for c in all_containers():
        assert c["securityContext"]["readOnlyRootFilesystem"] is True
        assert c["securityContext"]["allowPrivilegeEscalation"] is False
        assert {"requests", "limits"} <= c["resources"].keys()


def test_the_image_exposes_the_ports_it_listens_on_and_checks_health_on_the_admin_port() -> None:
    env = image_env()
    ports = {split_addr(env[var], var)[1] for var in ("SIDECAR_HTTP_ADDR", "SIDECAR_GRPC_ADDR", "SIDECAR_ADMIN_ADDR")}
    instructions = dict(dockerfile_instructions())
    assert {int(p) for p in instructions["EXPOSE"].split()} == ports
    admin_port = split_addr(env["SIDECAR_ADMIN_ADDR"], "admin_addr")[1]
    assert f"http://127.0.0.1:{admin_port}/healthz" in instructions["HEALTHCHECK"]


def test_the_image_refuses_to_start_without_tokens_and_starts_with_them() -> None:
    env = image_env()
    with pytest.raises(ConfigError, match="SIDECAR_AUTH_TOKENS"):
        load(env=env)
    config = load(env={**env, "SIDECAR_AUTH_TOKENS": "t"})
    assert config.store == "sqlite:////var/lib/sidecar/sidecar.db"


def test_every_declared_dependency_is_pinned_in_the_constraints_make_and_the_image_use() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    declared = [*project["dependencies"], *(r for extra in project["optional-dependencies"].values() for r in extra)]

    def name(requirement: str) -> str:
        return re.split(r"[<>=!~;\[ ]", requirement, maxsplit=1)[0].lower().replace("_", "-")

    pinned = {}
    for line in (ROOT / "constraints.txt").read_text(encoding="utf-8").splitlines():
        if line and not line.startswith("#"):
            package, _, version = line.partition("==")
            assert version, f"constraints.txt: {line!r} is not an exact pin"
            pinned[name(package)] = version
    assert {name(r) for r in declared} <= pinned.keys(), "run make constraints"
    assert "-c constraints.txt" in (ROOT / "Makefile").read_text(encoding="utf-8")
    copied = " ".join(args for instruction, args in dockerfile_instructions() if instruction == "COPY")
    assert "constraints.txt" in copied
    # The build backend too: PIP_CONSTRAINT binds pip's isolated build of the wheel, -c does not.
    backend = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["build-system"]["requires"]
    assert {name(r) for r in backend} <= pinned.keys()
    assert image_env("builder")["PIP_CONSTRAINT"] == "/src/constraints.txt"


def test_the_image_build_imports_what_serve_runs() -> None:
    """`sidecar --help` imports neither grpc nor the generated code (the CLI loads the
    server lazily): the build must import them, or a broken dependency ships."""
    runs = " ".join(args for instruction, args in dockerfile_instructions() if instruction == "RUN")
    assert "import sidecar.app" in runs and "pip check" in runs
