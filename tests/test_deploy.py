"""What can be checked of the deployment files without a Docker engine: the compose file parses
and points at real files, the images install with the script CI runs, and every metric the
Prometheus rules and the Grafana dashboard query is one the service exports."""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
import yaml
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from compression import compress_uniform
from compression.layout import RowClass

from service.metrics import ServiceMetrics
from service.registry import TableRegistry

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
DOCKERFILES = [ROOT / "docker" / "Dockerfile", ROOT / "docker" / "Dockerfile.cuda"]


def test_compose_services_and_their_files() -> None:
    services = COMPOSE["services"]
    replicas = sorted(name for name in services if name.startswith("embserve-"))
    assert replicas == ["embserve-1", "embserve-2"]
    assert {"redis", "seed", "prometheus", "grafana", "locust"} <= set(services)
    assert services["locust"]["profiles"] == ["load"]
    redis_cmd = services["redis"]["command"]
    assert redis_cmd[redis_cmd.index("--appendonly") + 1] == "yes" and redis_cmd[redis_cmd.index("--appendfsync") + 1] == "always"
    assert any(v.startswith("redis-data:") for v in services["redis"]["volumes"])
    ids, tables_volumes, host_ports = set(), set(), set()
    for name in replicas:
        service = services[name]
        env = service["environment"]
        assert env["REDIS_URL"].startswith("redis://redis:") and float(env["EMBSERVE_REPLICA_TTL_S"]) > 0
        # the stream is trimmed: safe only because each replica's tables folder is a named volume of
        # its own that outlives its container (with the folder in the container, the docker test
        # lost every update acknowledged before a down/up), and its trim record keeps one fixed id
        assert env["EMBSERVE_TRIM_LOG"] == "true"
        ids.add(env["EMBSERVE_REPLICA_ID"])
        tables_dir = env.get("EMBSERVE_TABLES_DIR", "/var/lib/embserve/tables")
        tables_volumes |= {v.split(":")[0] for v in service["volumes"] if v.split(":")[1:2] == [tables_dir]}
        assert service.get("deploy", {}).get("replicas", 1) == 1, f"{name}: scaled copies would share one tables volume and one id"
        host_ports |= {p.split(":")[0] for p in service["ports"]}
        assert env["EMBSERVE_TOKEN_FILE"] == "/run/secrets/embserve_token" and "embserve_token" in COMPOSE["secrets"]
        assert service["depends_on"]["redis"]["condition"] == "service_healthy"
        assert service["depends_on"]["seed"]["condition"] == "service_completed_successfully"
    assert len(ids) == len(tables_volumes) == len(host_ports) == len(replicas)
    assert tables_volumes <= set(COMPOSE["volumes"])
    assert set(services["prometheus"]["depends_on"]) == set(replicas)
    for name, service in services.items():
        for volume in service.get("volumes", []):
            source = volume.split(":", 1)[0]
            if source.startswith("."):
                assert (ROOT / source).exists(), f"{name}: {source} does not exist"
            else:
                assert source in COMPOSE["volumes"], f"{name}: undeclared volume {source}"
        build = service.get("build")
        if build:
            assert (ROOT / build["context"] / build["dockerfile"]).is_file()
    locust_cmd = services["locust"]["command"]
    assert (ROOT / services["locust"]["entrypoint"][1]).is_file() and "--seconds" in locust_cmd


def test_images_install_with_the_ci_script_as_a_non_root_user() -> None:
    ci = (ROOT / ".ci" / "run").read_text()
    assert "bash docker/install.sh" in ci
    for dockerfile in DOCKERFILES:
        text = dockerfile.read_text()
        assert text.count("FROM ") >= 2, f"{dockerfile.name}: not multi-stage"
        assert "bash docker/install.sh" in text
        assert re.search(r"^USER embserve$", text, re.M) and "useradd" in text
        assert 'HEALTHCHECK' in text and '"probe", "/readyz"' in text
        for line in text.splitlines():
            if line.startswith("COPY ") and "--from=" not in line:
                for source in line.split()[1:-1]:
                    assert (ROOT / source).exists(), f"{dockerfile.name}: COPY {source} missing"


def _exported_metric_names() -> set[str]:
    registry = TableRegistry("cpu")
    registry.add("t", compress_uniform(torch.randn(8, 4), RowClass(4, 8)))
    metrics = ServiceMetrics(registry)
    names: set[str] = set()
    for family in text_string_to_metric_families(generate_latest(metrics.registry).decode()):
        names.add(family.name)
        names.update(sample.name for sample in family.samples)
    return names


def test_rules_and_dashboard_query_exported_metrics() -> None:
    exported = _exported_metric_names()
    rules = yaml.safe_load((ROOT / "docker" / "prometheus" / "rules.yml").read_text())
    recorded = {r["record"] for g in rules["groups"] for r in g["rules"] if "record" in r}
    exprs = [r["expr"] for g in rules["groups"] for r in g["rules"]]
    dashboard = json.loads((ROOT / "docker" / "grafana" / "dashboards" / "embserve.json").read_text())
    exprs += [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    assert len(exprs) > 15
    for expr in exprs:
        for name in re.findall(r"\bembserve[_:][a-z0-9_:]+", expr):
            base = re.sub(r"_(bucket|count|sum|total)$", "", name)  # the parser names counter families without _total
            assert name in recorded or name in exported or base in exported, f"{name} in {expr!r} is not exported"
    config = yaml.safe_load((ROOT / "docker" / "prometheus" / "prometheus.yml").read_text())
    replicas = {name for name in COMPOSE["services"] if name.startswith("embserve-")}
    assert set(config["scrape_configs"][0]["static_configs"][0]["targets"]) == {f"{r}:8080" for r in replicas}


def test_volume_mount_points_belong_to_the_service_user() -> None:
    # A new volume takes the owner of the folder it covers; a folder the image lacks is created
    # for root, and the service (uid 10001) could then write neither seeds nor snapshots.
    seed_targets = {v.split(":")[1] for s in COMPOSE["services"].values() for v in s.get("volumes", []) if v.startswith("seed:")}
    for dockerfile in DOCKERFILES:
        text = dockerfile.read_text()
        volumes = re.findall(r'^VOLUME \["([^"]+)"\]', text, re.M)
        owned = re.search(r"install -d -o embserve -g embserve ([^\n\\]+)", text)
        assert owned, f"{dockerfile.name}: no folder made for the embserve user"
        assert set(volumes) | seed_targets <= set(owned.group(1).split()), f"{dockerfile.name}: {owned.group(1)}"


class _ComposeLoader(yaml.SafeLoader):
    """Reads compose's merge tags (!reset, !override) as the plain values they carry."""


def _untagged(loader: yaml.SafeLoader, node: yaml.Node) -> object:
    """The value as if the tag were absent (``!reset null`` reads as None)."""
    if isinstance(node, yaml.SequenceNode):
        return loader.construct_sequence(node)
    if isinstance(node, yaml.MappingNode):
        return loader.construct_mapping(node)
    return yaml.safe_load(node.value)


for _tag in ("!reset", "!override"):
    _ComposeLoader.add_constructor(_tag, _untagged)


def test_offline_override_runs_every_service_on_loopback() -> None:
    offline = yaml.load((ROOT / "docker-compose.offline.yml").read_text(), Loader=_ComposeLoader)  # noqa: S506 (a safe loader)
    services = offline["services"]
    assert services["grafana"]["profiles"] == ["grafana"]  # no Debian package: not started offline
    replicas = [name for name in services if name.startswith("embserve")]
    assert replicas == ["embserve-1", "embserve-2"]
    for name in ("redis", "seed", "prometheus", *replicas):
        assert services[name]["network_mode"] == "host", name
    ports = {services[r]["environment"]["EMBSERVE_PORT"] for r in replicas}
    assert len(ports) == 2 and all(services[r]["environment"]["EMBSERVE_HOST"] == "127.0.0.1" for r in replicas)
    assert "--bind" in services["redis"]["command"] and "127.0.0.1" in services["redis"]["command"]
    assert any(a.startswith("--web.listen-address=127.0.0.1:") for a in services["prometheus"]["command"])
    config = yaml.safe_load(offline["configs"]["prometheus-host"]["content"])
    assert set(config["scrape_configs"][0]["static_configs"][0]["targets"]) == {f"127.0.0.1:{p}" for p in ports}
    assert services["embserve-2"]["build"] is None  # one build: the image embserve-1 builds
    build = services["embserve-1"]["build"]
    assert build["args"]["PIP_OFFLINE"] == "1" and build["network"] == "host"
    dockerfile = (ROOT / "docker" / "Dockerfile").read_text()
    assert all(f"ARG {arg}" in dockerfile for arg in build["args"])
    for name in ("redis", "prometheus"):
        b = services[name]["build"]
        assert (ROOT / b["context"] / b["dockerfile"]).is_file()
