"""The chart's fleet tier: the daemons' --central flags and the optional `central serve`
Deployment, rendered by Helm's engine and validated against the Kubernetes schemas."""

from __future__ import annotations

from typing import Any

import pytest

from tests.deploy.test_helm_chart import KUBE_VERSIONS, objects
from tests.deploy.tooling import require_module

CENTRAL = {
    "central": {"url": "postgresql://gf_node@pg.example:5432/gpuflops?sslmode=verify-full",
                "passwordSecret": "gpuflops-central", "cluster": "eu-west",
                "serve": {"enabled": True, "url": "postgresql://gf_read@pg.example/gpuflops",
                          "passwordSecret": "gpuflops-central-read"}},
    "serviceMonitor": {"enabled": True},
}


def _flags(command: Any) -> set[str]:
    return {opt for p in command.params for opt in (*p.opts, *p.secondary_opts)}


def test_daemons_ship_with_a_password_file_never_in_argv() -> None:
    found = objects(CENTRAL)
    pod = found["DaemonSet"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    args = container["args"]
    assert args[args.index("--central") + 1] == CENTRAL["central"]["url"]
    assert args[args.index("--node-name") + 1] == "$(NODE_NAME)"
    assert args[args.index("--cluster") + 1] == "eu-west"
    assert args[args.index("--central-password-file") + 1] == "/etc/gpuflops/central/password"
    assert not any("gpuflops-central" in a for a in args)  # the secret's name, not its value
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    assert mounts["central"]["mountPath"] == "/etc/gpuflops/central"
    vols = {v["name"]: v for v in pod["volumes"]}
    assert vols["central"]["secret"]["secretName"] == "gpuflops-central"
    from gpuflops.cli.daemon import daemon_command

    assert {a for a in args if a.startswith("--")} - _flags(daemon_command) == set()


def test_central_serve_deployment_validates_and_selects_only_itself() -> None:
    kv = require_module("kubernetes_validate", "kubernetes-validate")
    found = objects(CENTRAL)
    dep = found["Deployment:gpu-gpuflops-central"]
    svc = found["Service:gpu-gpuflops-central"]
    mon = found["ServiceMonitor:gpu-gpuflops-central"]
    for version in KUBE_VERSIONS:
        kv.validate(dep, version, strict=True)
        kv.validate(svc, version, strict=True)
    sel = dep["spec"]["selector"]["matchLabels"]
    assert svc["spec"]["selector"] == sel == mon["spec"]["selector"]["matchLabels"]
    labels = dep["spec"]["template"]["metadata"]["labels"]
    assert all(labels[k] == v for k, v in sel.items())
    # The daemon's Service, DaemonSet and ServiceMonitor do not select the central pod/Service.
    for daemon_sel in (found["Service"]["spec"]["selector"],
                       found["DaemonSet"]["spec"]["selector"]["matchLabels"],
                       found["ServiceMonitor"]["spec"]["selector"]["matchLabels"]):
        assert not all(labels.get(k) == v for k, v in daemon_sel.items())
        assert not all(svc["metadata"]["labels"].get(k) == v for k, v in daemon_sel.items())
    pod = dep["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    assert pod["securityContext"]["runAsNonRoot"] is True and not pod.get("hostPID")
    assert c["args"][:2] == ["central", "serve"]
    assert c["args"][c["args"].index("--central") + 1] == CENTRAL["central"]["serve"]["url"]
    from gpuflops.cli.central import serve_command

    assert {a for a in c["args"] if a.startswith("--")} - _flags(serve_command) == set()


def test_central_serve_without_a_url_fails_clearly() -> None:
    with pytest.raises(Exception, match=r"central\.serve\.enabled needs"):
        objects({"central": {"serve": {"enabled": True}}})


def test_central_is_off_by_default() -> None:
    found = objects()
    assert not any(k.startswith("Deployment") for k in found)
    assert "--central" not in found["DaemonSet"]["spec"]["template"]["spec"]["containers"][0]["args"]
