"""The Helm chart, rendered by the real Helm engine (helm-python-sdk) and schema-validated.

Built-in kinds are checked against the Kubernetes OpenAPI schemas of kubernetes-validate
(strict: unknown fields fail). The Prometheus Operator kinds have no schema here: their rules
go through promtool and their fields are checked by hand below.
"""

from __future__ import annotations

import filecmp
import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploy.promtool import promtool, write_yaml
from tests.deploy.tooling import REPO, require_module

CHART = REPO / "helm" / "gpuflops"
EXAMPLE_POD = REPO / "helm" / "examples" / "training-pod.yaml"
RULES = REPO / "exporters" / "prometheus" / "gpuflops.rules.yml"
DASHBOARDS = REPO / "exporters" / "grafana" / "dashboards"
# The oldest Kubernetes the chart declares (Chart.yaml kubeVersion) and a current one.
KUBE_VERSIONS = ("1.25", "1.33")
EVERYTHING_ON = {
    "serviceMonitor": {"enabled": True, "basicAuthSecret": "gpuflops-scrape"},
    "prometheusRule": {"enabled": True},
    "grafanaDashboards": {"enabled": True},
    "webConfig": {"enabled": True, "secretName": "gpuflops-web", "tls": True},
    "podResources": {"enabled": True},
}
# Defaults in gpuflops.rules.yml the chart substitutes (templates/prometheusrule.yaml).
SUBSTITUTED = {
    'up{job=~".*gpuflops.*"}': 'up{job=~"kube-gpu-.*"}',
    "[6h], 2592000)": "[6h], 604800)",
    ") > 0.2": ") > 0.35",
    "gpuflops_sampler_last_sample_timestamp_seconds > 120":
        "gpuflops_sampler_last_sample_timestamp_seconds > 300",
    "gpuflops_central_ship_lag_seconds > 900": "gpuflops_central_ship_lag_seconds > 1800",
}
CUSTOM_RULE_VALUES = {
    "scrapeJobRegex": "kube-gpu-.*",
    "predictionHorizonSeconds": 604800,
    "unattributedShare": 0.35,
    "samplerStaleSeconds": 300,
    "centralShipLagSeconds": 1800,
}


def render(values: dict[str, Any] | None = None) -> dict[str, list[dict[str, Any]]]:
    """Template path -> the Kubernetes objects it renders."""
    helm = require_module("helm_python", "helm-python-sdk")
    with helm.Chart.load(str(CHART)) as chart:
        manifests = chart.render(values or {}, name="gpu", namespace="monitoring")
    return {
        path: [doc for doc in yaml.safe_load_all(text) if doc]
        for path, text in manifests.items()
        if path.endswith(".yaml")
    }


def objects(values: dict[str, Any] | None = None) -> dict[str, dict[str, Any]]:
    """Kind -> object for the release's main objects, "Kind:name" for the others."""
    found: dict[str, dict[str, Any]] = {}
    for docs in render(values).values():
        for doc in docs:
            name = doc["metadata"]["name"]
            key = doc["kind"] if name == "gpu-gpuflops" else f"{doc['kind']}:{name}"
            assert key not in found, key
            found[key] = doc
    return found


def test_lint_is_clean() -> None:
    helm = require_module("helm_python", "helm-python-sdk")
    for values in ({}, EVERYTHING_ON):
        report = helm.lint(str(CHART), values, strict=True)
        assert report["errors"] == []
        # Severity 2 and 3 are warnings and errors; 1 is "icon is recommended".
        assert [m for m in report["messages"] if m["severity"] >= 2] == []


@pytest.mark.parametrize("values", [{}, EVERYTHING_ON], ids=["defaults", "everything-on"])
def test_builtin_kinds_validate_against_kubernetes_schemas(values: dict[str, Any]) -> None:
    kv = require_module("kubernetes_validate", "kubernetes-validate")
    found = objects(values)
    builtin = [o for o in found.values() if o["apiVersion"] in ("v1", "apps/v1")]
    assert {o["kind"] for o in builtin} >= {"DaemonSet", "Service", "ConfigMap", "ServiceAccount"}
    for version in KUBE_VERSIONS:
        for obj in builtin:
            kv.validate(obj, version, strict=True)


def test_schema_validation_rejects_a_wrong_field() -> None:
    kv = require_module("kubernetes_validate", "kubernetes-validate")
    daemonset = objects()["DaemonSet"]
    daemonset["spec"]["template"]["spec"]["hostPid"] = True
    with pytest.raises(kv.ValidationError):
        kv.validate(daemonset, KUBE_VERSIONS[0], strict=True)


def test_optional_kinds_are_off_by_default() -> None:
    kubelet_rbac = {"ClusterRole:gpu-gpuflops-kubelet-pods",
                    "ClusterRoleBinding:gpu-gpuflops-kubelet-pods"}
    assert set(objects()) == {"DaemonSet", "Service", "ConfigMap", "ServiceAccount"} | kubelet_rbac
    assert set(objects({"kubelet": {"enabled": False}})) == {
        "DaemonSet", "Service", "ConfigMap", "ServiceAccount"}


def test_kubelet_lookup_gets_only_nodes_proxy_get_and_the_node_ip() -> None:
    found = objects()
    role = found["ClusterRole:gpu-gpuflops-kubelet-pods"]
    assert role["rules"] == [{"apiGroups": [""], "resources": ["nodes/proxy"], "verbs": ["get"]}]
    binding = found["ClusterRoleBinding:gpu-gpuflops-kubelet-pods"]
    assert binding["subjects"][0]["name"] == found["ServiceAccount"]["metadata"]["name"]
    pod = found["DaemonSet"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    args = container["args"]
    assert args[args.index("--kubelet-url") + 1] == "https://$(NODE_IP):10250/pods"
    assert "--kubelet-insecure-tls" not in args
    env = {e["name"]: e for e in container["env"]}
    assert env["NODE_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.hostIP"
    assert pod["automountServiceAccountToken"] is True
    off = objects({"kubelet": {"enabled": False}})["DaemonSet"]["spec"]["template"]["spec"]
    assert "--kubelet-url" not in off["containers"][0]["args"]
    assert off["automountServiceAccountToken"] is False


def test_pod_resources_mount_the_kubelet_socket_read_only_without_rbac() -> None:
    kv = require_module("kubernetes_validate", "kubernetes-validate")
    found = objects({"podResources": {"enabled": True}, "kubelet": {"enabled": False}})
    assert set(found) == {"DaemonSet", "Service", "ConfigMap", "ServiceAccount"}  # no ClusterRole
    pod = found["DaemonSet"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    args = container["args"]
    socket = args[args.index("--pod-resources-socket") + 1]
    assert socket == "/var/lib/kubelet/pod-resources/kubelet.sock"
    assert "--kubelet-url" not in args and pod["automountServiceAccountToken"] is False
    (mount,) = [m for m in container["volumeMounts"] if m["name"] == "pod-resources"]
    assert mount == {"name": "pod-resources", "mountPath": str(Path(socket).parent),
                     "readOnly": True}
    (volume,) = [v for v in pod["volumes"] if v["name"] == "pod-resources"]
    assert volume["hostPath"] == {"path": "/var/lib/kubelet/pod-resources", "type": "Directory"}
    for version in KUBE_VERSIONS:
        kv.validate(found["DaemonSet"], version, strict=True)
    moved = objects({"podResources": {"enabled": True, "hostPath": "/data/kubelet/pod-resources"}})
    volumes = moved["DaemonSet"]["spec"]["template"]["spec"]["volumes"]
    assert {"path": "/data/kubelet/pod-resources", "type": "Directory"} in [
        v.get("hostPath") for v in volumes]
    off = objects()["DaemonSet"]["spec"]["template"]["spec"]
    assert "--pod-resources-socket" not in off["containers"][0]["args"]
    assert all(v["name"] != "pod-resources" for v in off["volumes"])


def test_daemonset_has_the_access_attribution_needs() -> None:
    ds = objects()["DaemonSet"]
    pod = ds["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert pod["hostPID"] is True
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"])
    sc = container["securityContext"]
    assert sc["capabilities"] == {"drop": ["ALL"], "add": ["SYS_PTRACE", "DAC_READ_SEARCH"]}
    assert sc["privileged"] is False and sc["allowPrivilegeEscalation"] is False
    assert sc["readOnlyRootFilesystem"] is True
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["socket"]["hostPath"]["path"] == "/run/gpuflops"
    assert volumes["ledger"]["hostPath"]["path"] == "/var/lib/gpuflops"
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    args = container["args"]
    flags = dict(zip(args[1::2], args[2::2], strict=True))
    assert args[0] == "daemon"
    assert flags["--socket"].startswith(mounts["socket"] + "/")
    assert flags["--state-dir"] == mounts["ledger"]
    assert flags["--listen"] == "0.0.0.0:9450"
    assert flags["--socket-group"] == "9450"
    assert "--web-config" not in flags
    for probe in (container["livenessProbe"], container["readinessProbe"]):
        assert probe["httpGet"] == {"path": "/healthz", "port": "metrics", "scheme": "HTTP"}
    assert container["resources"]["requests"] and container["resources"]["limits"]["memory"]


def test_web_config_switches_probes_and_scrape_to_https() -> None:
    found = objects(EVERYTHING_ON)
    container = found["DaemonSet"]["spec"]["template"]["spec"]["containers"][0]
    args = container["args"]
    web_config = args[args.index("--web-config") + 1]
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert web_config.startswith(mounts["web-config"] + "/")
    assert container["livenessProbe"]["httpGet"]["scheme"] == "HTTPS"
    (endpoint,) = found["ServiceMonitor"]["spec"]["endpoints"]
    assert endpoint["scheme"] == "https"
    # The exporter never emits `job` or `instance`, so nothing needs honor_labels.
    assert "honorLabels" not in endpoint
    assert endpoint["basicAuth"]["password"] == {"name": "gpuflops-scrape", "key": "password"}
    assert {"sourceLabels": ["__meta_kubernetes_pod_node_name"], "targetLabel": "node"} in (
        endpoint["relabelings"]
    )


def test_web_config_without_a_secret_fails_clearly() -> None:
    helm = require_module("helm_python", "helm-python-sdk")
    with pytest.raises(helm.HelmError, match=r"webConfig\.secretName"):
        render({"webConfig": {"enabled": True}})


def test_service_selects_the_daemonset_pods() -> None:
    found = objects()
    selector = found["Service"]["spec"]["selector"]
    labels = found["DaemonSet"]["spec"]["template"]["metadata"]["labels"]
    assert selector.items() <= labels.items()
    assert found["Service"]["spec"]["ports"][0]["targetPort"] == "metrics"


def test_chart_copies_are_in_sync() -> None:
    assert filecmp.cmp(RULES, CHART / "files" / RULES.name, shallow=False), (
        "cp exporters/prometheus/gpuflops.rules.yml helm/gpuflops/files/"
    )
    sources = sorted(p.name for p in DASHBOARDS.glob("*.json"))
    assert sorted(p.name for p in (CHART / "files" / "dashboards").glob("*.json")) == sources
    for name in sources:
        assert filecmp.cmp(DASHBOARDS / name, CHART / "files" / "dashboards" / name,
                           shallow=False), f"cp exporters/grafana/dashboards/{name} helm/..."


def test_prometheus_rule_with_defaults_equals_the_rules_file(tmp_path: Path) -> None:
    rule = objects({"prometheusRule": {"enabled": True}})["PrometheusRule"]
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    assert rule["spec"]["groups"] == yaml.safe_load(RULES.read_text())["groups"]


def test_prometheus_rule_substitutes_every_tunable(tmp_path: Path) -> None:
    text = RULES.read_text()
    for default in SUBSTITUTED:
        assert text.count(default) == 1, f"{default!r} must occur once to be substituted"
    rule = objects({"prometheusRule": {"enabled": True, **CUSTOM_RULE_VALUES}})["PrometheusRule"]
    expected = text
    for default, custom in SUBSTITUTED.items():
        expected = expected.replace(default, custom)
    assert rule["spec"]["groups"] == yaml.safe_load(expected)["groups"]
    path = write_yaml(tmp_path / "rendered.rules.yml", {"groups": rule["spec"]["groups"]})
    result = promtool("check", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr


def test_prometheus_rule_points_runbooks_at_the_configured_base() -> None:
    base = "https://wiki.example.com/gpuflops/alerts.md"
    rule = objects({"prometheusRule": {"enabled": True, "runbookBaseUrl": base}})["PrometheusRule"]
    alerts = [r for g in rule["spec"]["groups"] for r in g["rules"] if "alert" in r]
    assert alerts and all(
        r["annotations"]["runbook_url"] == f"{base}#{r['alert'].lower()}" for r in alerts)


def test_dashboard_configmap_carries_both_dashboards() -> None:
    cm = objects({"grafanaDashboards": {"enabled": True}})["ConfigMap:gpu-gpuflops-dashboards"]
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert sorted(cm["data"]) == sorted(p.name for p in DASHBOARDS.glob("*.json"))
    for name, text in cm["data"].items():
        assert json.loads(text) == json.loads((DASHBOARDS / name).read_text())


def test_example_training_pod_mounts_the_socket_and_validates() -> None:
    kv = require_module("kubernetes_validate", "kubernetes-validate")
    pod = yaml.safe_load(EXAMPLE_POD.read_text())
    for version in KUBE_VERSIONS:
        kv.validate(pod, version, strict=True)
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    volume = next(v for v in pod["spec"]["volumes"] if "hostPath" in v)
    assert volume["hostPath"]["path"] == values["socket"]["hostPath"]
    assert values["daemon"]["socketGroupId"] in pod["spec"]["securityContext"]["supplementalGroups"]


def _daemon_flags() -> set[str]:
    from gpuflops.cli.daemon import daemon_command as daemon

    return {opt for p in daemon.params for opt in (*p.opts, *p.secondary_opts)}


def test_chart_and_unit_pass_only_flags_the_daemon_accepts() -> None:
    flags = _daemon_flags()
    values = {"kubelet": {"insecureSkipVerify": True}, "podResources": {"enabled": True},
              "webConfig": {"enabled": True, "secretName": "s"}}
    (container,) = objects(values)["DaemonSet"]["spec"]["template"]["spec"]["containers"]
    assert container["args"][0] == "daemon"
    used = {a for a in container["args"] if a.startswith("--")}
    unit = (REPO / "systemd" / "gpuflops.service").read_text()
    used |= {tok for tok in unit.split() if tok.startswith("--")}
    assert used - flags == set()
    assert {"--kubelet-url", "--kubelet-insecure-tls", "--web-config", "--socket-group",
            "--pod-resources-socket"} <= used


def test_values_schema_refuses_misspelt_and_mistyped_values() -> None:
    helm = require_module("helm_python", "helm-python-sdk")
    for bad, says in (({"serviceMonitor": {"enabld": True}}, "enabld"),
                      ({"daemon": {"port": "9450"}}, "/daemon/port"),
                      ({"prometheusRule": {"unattributedShare": 2}}, "unattributedShare"),
                      ({"extraEnv": {"A": "b"}}, "/extraEnv"),
                      ({"podResources": {"hostPath": "var/lib/kubelet"}}, "hostPath")):
        with pytest.raises(helm.HelmError, match=says):
            render(bad)
    schema = json.loads((CHART / "values.schema.json").read_text())
    defaults = yaml.safe_load((CHART / "values.yaml").read_text())
    assert set(schema["properties"]) == set(defaults)  # every top-level value is described


def test_extra_env_volumes_mounts_and_relabelings_are_rendered_and_valid() -> None:
    kv = require_module("kubernetes_validate", "kubernetes-validate")
    values = {
        "extraEnv": [{"name": "GPUFLOPS_SERIES_TTL_S", "value": "7200"},
                     {"name": "GPUFLOPS_PROGRAM_CONFIG", "value": "/etc/gpuflops/programs.toml"}],
        "extraVolumes": [{"name": "programs", "configMap": {"name": "gpuflops-programs"}}],
        "extraVolumeMounts": [{"name": "programs", "mountPath": "/etc/gpuflops/programs.toml",
                               "subPath": "programs.toml", "readOnly": True}],
        "resources": {"requests": {"cpu": "100m", "memory": "256Mi"},
                      "limits": {"memory": "1Gi"}},
        "serviceMonitor": {"enabled": True,
                           "relabelings": [{"targetLabel": "cluster", "replacement": "eu-1"}],
                           "metricRelabelings": [{"sourceLabels": ["__name__"],
                                                  "regex": "gpuflops_process_.*",
                                                  "action": "drop"}]},
    }
    found = objects(values)
    pod = found["DaemonSet"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    env = {e["name"]: e for e in container["env"]}
    assert env["GPUFLOPS_SERIES_TTL_S"]["value"] == "7200" and "NODE_IP" in env
    assert {"name": "programs", "configMap": {"name": "gpuflops-programs"}} in pod["volumes"]
    assert any(m["name"] == "programs" for m in container["volumeMounts"])
    assert container["resources"] == values["resources"]
    for version in KUBE_VERSIONS:
        kv.validate(found["DaemonSet"], version, strict=True)
    (endpoint,) = found["ServiceMonitor"]["spec"]["endpoints"]
    assert endpoint["relabelings"][0]["targetLabel"] == "node"  # the chart's own stays first
    assert endpoint["relabelings"][1] == {"targetLabel": "cluster", "replacement": "eu-1"}
    assert endpoint["metricRelabelings"] == values["serviceMonitor"]["metricRelabelings"]
    assert "metricRelabelings" not in objects({"serviceMonitor": {"enabled": True}})[
        "ServiceMonitor"]["spec"]["endpoints"][0]
