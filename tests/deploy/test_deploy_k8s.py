"""Kubernetes and KServe manifests: kustomize builds, schema validation offline, and wiring."""

from __future__ import annotations

import copy
from functools import cache
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
from crd_schemas import SCHEMAS, validate_custom_resource
from deploy_helpers import K8S_DIR, KSERVE_DIR, load_yaml_all, require_tool, run

#: Kubernetes versions validated against (oldest still common, newest shipped by kubernetes-validate).
K8S_VERSIONS = ("1.29.0", kubernetes_validate.utils.latest_version())
BUILDS = {"cpu": K8S_DIR, "gpu": K8S_DIR / "overlays" / "gpu", "tls": K8S_DIR / "overlays" / "tls", "kserve": KSERVE_DIR,
          "kserve-grpc": KSERVE_DIR.parent / "kserve-grpc"}


@cache
def build(name: str) -> tuple[dict[str, Any], ...]:
    kubectl = require_tool("kubectl")
    out = run([kubectl, "kustomize", str(BUILDS[name])], timeout=60)
    return tuple(load_yaml_all(out.stdout))


def by_kind(name: str) -> dict[str, dict[str, Any]]:
    docs = build(name)
    kinds = [d["kind"] for d in docs]
    assert len(kinds) == len(set(kinds)), kinds
    return {d["kind"]: d for d in docs}


def _validate(doc: dict[str, Any], version: str) -> None:
    if (doc["apiVersion"], doc["kind"]) in SCHEMAS:
        validate_custom_resource(doc, version)
    else:
        kubernetes_validate.validate(doc, version, strict=True)


@pytest.mark.parametrize("name", sorted(BUILDS))
def test_kustomize_builds(name: str) -> None:
    assert build(name)


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("name", sorted(BUILDS))
def test_manifests_validate_against_schemas(name: str, version: str) -> None:
    for doc in build(name):
        try:
            _validate(doc, version)
        except (kubernetes_validate.ValidationError, jsonschema.ValidationError) as e:
            pytest.fail(f"{name}: {doc['kind']}/{doc['metadata']['name']} invalid for Kubernetes {version}: {e.message} "
                        f"at {'/'.join(map(str, e.absolute_path))}", pytrace=False)


def test_validation_is_strict() -> None:
    """A misspelled field is rejected, for built-in and custom resources alike."""
    docs = by_kind("cpu")
    bad = copy.deepcopy(docs["Deployment"])
    bad["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        _validate(bad, K8S_VERSIONS[-1])
    bad = copy.deepcopy(docs["ServiceMonitor"])
    bad["spec"]["endpoints"][0]["intervall"] = "15s"
    with pytest.raises(jsonschema.ValidationError):
        _validate(bad, K8S_VERSIONS[-1])
    bad = copy.deepcopy(by_kind("kserve")["InferenceService"])
    bad["spec"]["predictor"]["model"]["protocolVersion"] = "v3"
    with pytest.raises(jsonschema.ValidationError):
        _validate(bad, K8S_VERSIONS[-1])


def test_base_has_every_resource() -> None:
    assert set(by_kind("cpu")) == {"ConfigMap", "Deployment", "Service", "HorizontalPodAutoscaler",
                                   "PodDisruptionBudget", "ServiceMonitor", "PrometheusRule"}
    assert by_kind("cpu")["HorizontalPodAutoscaler"]["apiVersion"] == "autoscaling/v2"


def _container(deployment: dict[str, Any]) -> dict[str, Any]:
    (c,) = deployment["spec"]["template"]["spec"]["containers"]
    return c


@pytest.mark.parametrize("name", ["cpu", "gpu", "tls"])
def test_deployment_probes_resources_and_config(name: str) -> None:
    docs = by_kind(name)
    dep = docs["Deployment"]
    c = _container(dep)
    assert c["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    assert c["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
        assert c[probe]["httpGet"]["port"] in ports
    res = c["resources"]
    assert {"cpu", "memory"} <= set(res["requests"]) and {"cpu", "memory"} <= set(res["limits"])
    (env_from,) = c["envFrom"]
    assert env_from["configMapRef"]["name"] == docs["ConfigMap"]["metadata"]["name"]
    cm = docs["ConfigMap"]["data"]
    assert int(cm["HJSERVE_PORT"]) == ports["http"]
    assert all(k.startswith("HJSERVE_") for k in cm)
    pod = dep["spec"]["template"]["spec"]
    assert pod["enableServiceLinks"] is False   # the Service "hjserve" would write HJSERVE_PORT=tcp://...
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert c["securityContext"]["allowPrivilegeEscalation"] is False


def _bytes(quantity: str) -> int:
    """A Kubernetes quantity of bytes ("1Gi", "512M", "1000")."""
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}
    for unit, factor in units.items():
        if quantity.endswith(unit):
            return int(float(quantity[: -len(unit)]) * factor)
    return int(quantity)


@pytest.mark.parametrize("name", ["cpu", "gpu"])
def test_batch_spool_fits_the_tmp_volume(name: str) -> None:
    """Batch bodies spill to /tmp, an emptyDir with a sizeLimit past which the kubelet evicts the pod
    (every model with it): the server's total spool limit keeps the spool well below it (a legal job
    under the default 4 GiB limit once could fill the 1 GiB volume)."""
    docs = by_kind(name)
    pod = docs["Deployment"]["spec"]["template"]["spec"]
    (mount,) = [m for m in _container(docs["Deployment"])["volumeMounts"] if m["mountPath"] == "/tmp"]
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    cm = docs["ConfigMap"]["data"]
    assert cm.get("HJSERVE_SPOOL_DIR", "/tmp").startswith("/tmp")
    assert int(cm["HJSERVE_MAX_SPOOL_BYTES"]) <= 0.8 * _bytes(volume["emptyDir"]["sizeLimit"])


def _settings_and_memory_limit(name: str) -> tuple[dict[str, str], int]:
    """The HJSERVE_* settings a build gives the server, and its container's memory limit."""
    docs = by_kind(name)
    if name.startswith("kserve"):
        (c,) = docs["ServingRuntime"]["spec"]["containers"]
        env = {e["name"]: e["value"] for e in c["env"] if "value" in e}
        return env, _bytes(docs["InferenceService"]["spec"]["predictor"]["model"]["resources"]["limits"]["memory"])
    return docs["ConfigMap"]["data"], _bytes(_container(docs["Deployment"])["resources"]["limits"]["memory"])


@pytest.mark.parametrize("name", sorted(BUILDS))
def test_request_memory_fits_the_memory_limit(name: str) -> None:
    """What inference bodies may take in memory (the server's estimate) stays below the container's
    memory limit with 512 MiB left for the process and its models, and one largest JSON body fits it
    (else every such body would be refused). The defaults (4 GiB, 64 MiB bodies) would not fit 2Gi."""
    from service.codecs import PARSE_BYTES_PER_BYTE

    cm, limit = _settings_and_memory_limit(name)
    budget = int(cm["HJSERVE_MAX_REQUEST_MEMORY_BYTES"])
    assert budget + 2**29 <= limit
    assert PARSE_BYTES_PER_BYTE * int(cm["HJSERVE_MAX_BODY_BYTES"]) <= budget


@pytest.mark.parametrize("name", sorted(BUILDS))
def test_as_many_grpc_messages_arrive_at_once_as_with_the_defaults(name: str) -> None:
    """A ModelInfer call reserves twice HJSERVE_GRPC_MAX_MESSAGE_BYTES of the request-memory budget
    while its message arrives: the manifests' smaller budget comes with a smaller message limit, so
    that as many calls (32) receive at once as the defaults allow, not 8."""
    from service.settings import Settings

    cm, _ = _settings_and_memory_limit(name)
    message = int(cm.get("HJSERVE_GRPC_MAX_MESSAGE_BYTES", Settings.model_fields["grpc_max_message_bytes"].default))
    assert int(cm["HJSERVE_MAX_REQUEST_MEMORY_BYTES"]) // (2 * message) >= 32
    assert message >= int(cm["HJSERVE_MAX_BODY_BYTES"])     # a body REST takes fits a gRPC message


@pytest.mark.parametrize("name", ["cpu", "gpu", "tls"])
def test_the_pod_is_given_time_to_drain(name: str) -> None:
    """Kubernetes kills the container terminationGracePeriodSeconds after it starts the preStop hook;
    the server's own drain (HJSERVE_SHUTDOWN_GRACE_S, after the hook's sleep) must end before that,
    or a batch stream is cut instead of ending with its shutting_down line."""
    from service.settings import Settings

    docs = by_kind(name)
    pod = docs["Deployment"]["spec"]["template"]["spec"]
    hook = _container(docs["Deployment"])["lifecycle"]["preStop"]["exec"]["command"]
    (sleep_s,) = [float(word) for part in hook for word in part.replace("(", " ").replace(")", " ").split()
                  if word.replace(".", "", 1).isdigit()]
    grace = float(docs["ConfigMap"]["data"].get("HJSERVE_SHUTDOWN_GRACE_S",
                                                 Settings.model_fields["shutdown_grace_s"].default))
    assert sleep_s + grace + 5 <= pod["terminationGracePeriodSeconds"]


def test_gpu_overlay() -> None:
    docs = by_kind("gpu")
    c = _container(docs["Deployment"])
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert c["image"].endswith(":cuda")
    assert docs["ConfigMap"]["data"]["HJSERVE_DEVICE"] == "cuda"
    cpu = by_kind("cpu")
    assert _container(cpu["Deployment"])["image"].endswith(":cpu")
    assert cpu["ConfigMap"]["data"]["HJSERVE_DEVICE"] == "cpu"
    assert "nvidia.com/gpu" not in _container(cpu["Deployment"])["resources"]["limits"]


def test_tls_overlay_serves_its_secret_and_is_probed_and_scraped_over_https() -> None:
    """The server's TLS files are the mounted Secret's, readable by the pod's group only; the kubelet
    probes and Prometheus speak HTTPS to it (Prometheus verifying it with the Secret's CA)."""
    docs = by_kind("tls")
    c = _container(docs["Deployment"])
    pod = docs["Deployment"]["spec"]["template"]["spec"]
    (volume,) = [v for v in pod["volumes"] if "secret" in v]
    (mount,) = [m for m in c["volumeMounts"] if m["name"] == volume["name"]]
    assert mount["readOnly"] is True and volume["secret"]["defaultMode"] & 0o007 == 0
    assert volume["secret"]["defaultMode"] & 0o040 and pod["securityContext"]["fsGroup"] == pod["securityContext"]["runAsGroup"]
    cm = docs["ConfigMap"]["data"]
    assert cm["HJSERVE_TLS_CERT_FILE"] == mount["mountPath"] + "/tls.crt"
    assert cm["HJSERVE_TLS_KEY_FILE"] == mount["mountPath"] + "/tls.key"
    for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
        assert c[probe]["httpGet"]["scheme"] == "HTTPS"
    (endpoint,) = docs["ServiceMonitor"]["spec"]["endpoints"]
    assert endpoint["scheme"] == "https"
    assert endpoint["tlsConfig"]["ca"]["secret"] == {"name": volume["secret"]["secretName"], "key": "ca.crt"}
    assert "insecureSkipVerify" not in endpoint["tlsConfig"]
    assert not any(k.startswith("HJSERVE_TLS") for k in by_kind("cpu")["ConfigMap"]["data"])


@pytest.mark.parametrize("name", ["cpu", "gpu", "tls"])
def test_selectors_and_ports_line_up(name: str) -> None:
    docs = by_kind(name)
    pod_labels = docs["Deployment"]["spec"]["template"]["metadata"]["labels"]

    def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
        return bool(selector) and all(labels.get(k) == v for k, v in selector.items())

    assert selects(docs["Deployment"]["spec"]["selector"]["matchLabels"], pod_labels)
    svc = docs["Service"]
    assert selects(svc["spec"]["selector"], pod_labels)
    assert selects(docs["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"], pod_labels)
    hpa = docs["HorizontalPodAutoscaler"]["spec"]
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                     "name": docs["Deployment"]["metadata"]["name"]}
    assert 1 <= hpa["minReplicas"] <= hpa["maxReplicas"]
    # PDB minAvailable below the HPA minimum would block every drain when scaled in; keep it below.
    assert docs["PodDisruptionBudget"]["spec"]["minAvailable"] <= max(1, hpa["minReplicas"] - 1) or hpa["minReplicas"] == 1
    container_ports = {p["name"]: p["containerPort"] for p in _container(docs["Deployment"])["ports"]}
    svc_port, grpc_port = svc["spec"]["ports"]
    assert svc_port["targetPort"] in container_ports and grpc_port["targetPort"] in container_ports
    # the gRPC port is the one the server is told to listen on, and carries HTTP/2 cleartext (over TLS
    # with the tls overlay)
    assert container_ports["grpc"] == int(docs["ConfigMap"]["data"]["HJSERVE_GRPC_PORT"]) == grpc_port["port"]
    assert grpc_port["appProtocol"] == ("grpc" if name == "tls" else "kubernetes.io/h2c")
    sm = docs["ServiceMonitor"]["spec"]
    assert selects(sm["selector"]["matchLabels"], svc["metadata"]["labels"])
    assert [e["port"] for e in sm["endpoints"]] == [svc_port["name"]]
    assert sm["endpoints"][0]["path"] == "/metrics"
    # The alert rules select job="hjserve": the ServiceMonitor's default job label is the Service name.
    assert svc["metadata"]["name"] == "hjserve" and "jobLabel" not in sm


def test_kserve_inference_service_uses_the_runtime_with_v2() -> None:
    docs = by_kind("kserve")
    isvc, runtime = docs["InferenceService"], docs["ServingRuntime"]
    assert isvc["apiVersion"] == "serving.kserve.io/v1beta1"
    model = isvc["spec"]["predictor"]["model"]
    assert model["protocolVersion"] == "v2"
    assert model["runtime"] == runtime["metadata"]["name"]
    assert model["modelFormat"]["name"] in {f["name"] for f in runtime["spec"]["supportedModelFormats"]}
    assert "v2" in runtime["spec"]["protocolVersions"]
    (c,) = runtime["spec"]["containers"]
    assert c["name"] == "kserve-container"
    assert c["image"].startswith("hjserve:")
    args = c["command"] + c["args"]
    assert args[:3] == ["python", "-m", "service"]
    port = int(args[args.index("--port") + 1])
    assert [p["containerPort"] for p in c["ports"]] == [port]
    assert args[args.index("--model-repository") + 1] == "/mnt/models"
    assert c["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": port}
    assert c["livenessProbe"]["httpGet"] == {"path": "/v2/health/live", "port": port}


def test_kserve_grpc_overlay_routes_grpc_v2_to_the_runtimes_grpc_port() -> None:
    """KServe's grpc-v2: the runtime serves gRPC on its --grpc-port; the InferenceService exposes
    that port named h2c (Knative routes one port per service, h2c = gRPC)."""
    docs = by_kind("kserve-grpc")
    model = docs["InferenceService"]["spec"]["predictor"]["model"]
    runtime = docs["ServingRuntime"]["spec"]
    assert model["protocolVersion"] == "grpc-v2" and "grpc-v2" in runtime["protocolVersions"]
    (c,) = runtime["containers"]
    args = c["command"] + c["args"]
    assert model["ports"] == [{"name": "h2c", "containerPort": int(args[args.index("--grpc-port") + 1]),
                               "protocol": "TCP"}]


@pytest.mark.parametrize("name", sorted(BUILDS))
def test_onnxruntime_threads_follow_the_containers_cpu_limit(name: str) -> None:
    """onnxruntime's default thread count is the node's cores, not the container's CPU limit: every
    manifest sizes the graphs' pools from the limit instead (the Downward API, rounded up)."""
    docs = by_kind(name)
    if "Deployment" in docs:
        c = _container(docs["Deployment"])
        assert "HJSERVE_INTRA_OP_THREADS" not in docs["ConfigMap"]["data"]   # env would win anyway
    else:
        (c,) = docs["ServingRuntime"]["spec"]["containers"]
    assert "cpu" in c["resources"]["limits"]
    (threads,) = [e for e in c["env"] if e["name"] == "HJSERVE_INTRA_OP_THREADS"]
    ref = threads["valueFrom"]["resourceFieldRef"]
    assert ref["resource"] == "limits.cpu" and str(ref["divisor"]) == "1"
    assert ref.get("containerName", c["name"]) == c["name"]
