"""deploy/: the manifests parse and reference the image and commands that exist."""

from __future__ import annotations

import re
import shlex
import tomllib
from pathlib import Path

import ray
import yaml
from typer.main import get_command

from raydiff.cli.main import app

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
PYPROJECT = tomllib.loads((DEPLOY.parent / "pyproject.toml").read_text())
VERSION = PYPROJECT["project"]["version"]


def _docs():
    out = {}
    for f in sorted(DEPLOY.glob("*.yaml")):
        for doc in yaml.safe_load_all(f.read_text()):
            out[(f.name, doc["kind"], doc["metadata"]["name"])] = doc
    return out


def _containers(obj):
    if isinstance(obj, dict):
        if "containers" in obj:
            yield from obj["containers"]
        for v in obj.values():
            yield from _containers(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _containers(v)


def _raydiff_commands(docs):
    for doc in docs.values():
        for c in _containers(doc):
            if c.get("command"):
                yield c["command"]
        if doc["kind"] == "RayJob":
            yield shlex.split(doc["spec"]["entrypoint"])


def test_manifests_parse_and_use_the_built_image():
    docs = _docs()
    kinds = {k[1] for k in docs}
    assert {"RayCluster", "RayJob", "CronJob", "Secret", "ConfigMap", "Deployment", "Service"} <= kinds
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    built = set(re.findall(r"-t (raydiff:[\w.-]+)", dockerfile))
    assert built == {f"raydiff:{VERSION}", f"raydiff:{VERSION}-gpu"}
    images = {c["image"] for d in docs.values() for c in _containers(d)}
    assert images == built
    (cluster,) = [d for k, d in docs.items() if k[1] == "RayCluster"]
    base_tag = re.search(r"ARG BASE_IMAGE=rayproject/ray:([\d.]+)-", dockerfile).group(1)
    assert cluster["spec"]["rayVersion"] == base_tag == ray.__version__, "image, cluster and driver Ray must agree"
    groups = {g["groupName"]: g for g in cluster["spec"]["workerGroupSpecs"]}
    assert set(groups) == {"cpu-workers", "gpu-workers"}
    gpu = next(_containers(groups["gpu-workers"]))
    assert gpu["resources"]["limits"]["nvidia.com/gpu"] == "1" and gpu["image"].endswith("-gpu")
    secrets = {k[2] for k in docs if k[1] == "Secret"}
    for d in docs.values():
        for c in _containers(d):
            for ref in c.get("envFrom", []):
                assert ref["secretRef"]["name"] in secrets


def test_manifest_commands_exist_in_the_cli():
    commands = get_command(app).commands
    seen = 0
    for argv in _raydiff_commands(_docs()):
        assert argv[0] == "raydiff"
        assert argv[1] in commands, argv
        options = {o for p in commands[argv[1]].params for o in p.opts}
        for arg in argv[2:]:
            if arg.startswith("--"):
                assert arg.split("=")[0] in options, (argv[1], arg)
        seen += 1
    assert seen >= 2


def test_the_webhook_service_reaches_the_watch_listener():
    from raydiff.watch.webhook import HEALTH, SECRET_ENV, parse_address

    docs = _docs()
    (deployment,) = [d for k, d in docs.items() if k[1] == "Deployment"]
    (service,) = [d for k, d in docs.items() if k[1] == "Service"]
    pod = deployment["spec"]["template"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    (c,) = pod["spec"]["containers"]
    argv = c["command"]
    assert argv[:2] == ["raydiff", "watch"] and "--once" not in argv
    host, port = parse_address(argv[argv.index("--webhook") + 1])
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    (sp,) = service["spec"]["ports"]
    assert host == "0.0.0.0" and ports[sp["targetPort"]] == port
    for probe in (c["livenessProbe"], c["readinessProbe"]):
        assert probe["httpGet"] == {"path": HEALTH, "port": sp["targetPort"]}
    # the secret comes from the Secret, never the command line
    (secret,) = [d for k, d in docs.items() if k[1] == "Secret" and k[2] == c["envFrom"][0]["secretRef"]["name"]]
    assert SECRET_ENV in secret["stringData"] and not any(SECRET_ENV in a for a in argv)
    volume = pod["spec"]["volumes"][0]["configMap"]["name"]
    assert ("cronjob.yaml", "ConfigMap", volume) in docs  # the same watch list as the CronJob


def test_cronjob_watch_list_is_valid():
    from raydiff.watch import parse

    (cm,) = [d for k, d in _docs().items() if k[1] == "ConfigMap"]
    watch = parse(tomllib.loads(cm["data"]["watch.toml"]), "watch.toml", store="/tmp/unused-store")
    assert watch.base.startswith("allenai/") and watch.tuned
