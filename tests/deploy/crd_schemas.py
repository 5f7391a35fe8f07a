"""JSON schemas for the custom resources the deploy manifests use, written from the CRDs of the
Prometheus Operator (monitoring.coreos.com/v1) and KServe (serving.kserve.io v1alpha1/v1beta1).

They cover the fields hjserve uses plus their common siblings, with ``additionalProperties: false``
so that a misspelled field fails; embedded Kubernetes types (Container, ResourceRequirements,
LabelSelector, ...) reference the official schemas shipped with kubernetes-validate. No download.
"""

from __future__ import annotations

import json
from functools import cache
from typing import Any

import jsonschema
import kubernetes_validate
from importlib_resources import files
from referencing import Registry, Resource

K8S = "https://kubernetes.io/api/_definitions.json#/$defs/io.k8s."
DURATION = {"type": "string", "pattern": r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"}
STR_MAP = {"type": "object", "additionalProperties": {"type": "string"}}


def _ref(name: str) -> dict[str, str]:
    return {"$ref": K8S + name}


def _obj(properties: dict[str, Any], required: list[str] | None = None) -> dict[str, Any]:
    return {"type": "object", "properties": properties, "required": required or [], "additionalProperties": False}


def _resource(api_version: str, kind: str, spec: dict[str, Any]) -> dict[str, Any]:
    return _obj({
        "apiVersion": {"const": api_version},
        "kind": {"const": kind},
        "metadata": _ref("apimachinery.pkg.apis.meta.v1.ObjectMeta"),
        "spec": spec,
    }, ["apiVersion", "kind", "metadata", "spec"])


_ENDPOINT = _obj({
    "port": {"type": "string"}, "targetPort": {"type": ["integer", "string"]}, "path": {"type": "string"},
    "scheme": {"enum": ["http", "https", "HTTP", "HTTPS"]}, "interval": DURATION, "scrapeTimeout": DURATION,
    "honorLabels": {"type": "boolean"}, "honorTimestamps": {"type": "boolean"}, "params": {"type": "object"},
    "relabelings": {"type": "array"}, "metricRelabelings": {"type": "array"}, "tlsConfig": {"type": "object"},
    "bearerTokenSecret": {"type": "object"}, "basicAuth": {"type": "object"}, "authorization": {"type": "object"},
    "oauth2": {"type": "object"}, "followRedirects": {"type": "boolean"}, "enableHttp2": {"type": "boolean"},
    "filterRunning": {"type": "boolean"}, "proxyUrl": {"type": "string"},
})

SERVICE_MONITOR = _resource("monitoring.coreos.com/v1", "ServiceMonitor", _obj({
    "selector": _ref("apimachinery.pkg.apis.meta.v1.LabelSelector"),
    "endpoints": {"type": "array", "minItems": 1, "items": _ENDPOINT},
    "namespaceSelector": _obj({"any": {"type": "boolean"}, "matchNames": {"type": "array", "items": {"type": "string"}}}),
    "jobLabel": {"type": "string"}, "targetLabels": {"type": "array"}, "podTargetLabels": {"type": "array"},
    "sampleLimit": {"type": "integer"}, "targetLimit": {"type": "integer"}, "attachMetadata": {"type": "object"},
}, ["selector", "endpoints"]))

_RULE = {
    "type": "object",
    "properties": {
        "record": {"type": "string", "pattern": r"^[a-zA-Z_:][a-zA-Z0-9_:]*$"},
        "alert": {"type": "string", "minLength": 1},
        "expr": {"type": ["string", "integer"]},
        "for": DURATION, "keep_firing_for": DURATION,
        "labels": STR_MAP, "annotations": STR_MAP,
    },
    "required": ["expr"],
    "additionalProperties": False,
    "oneOf": [{"required": ["record"], "not": {"required": ["alert"]}},
              {"required": ["alert"], "not": {"required": ["record"]}}],
}

PROMETHEUS_RULE = _resource("monitoring.coreos.com/v1", "PrometheusRule", _obj({
    "groups": {"type": "array", "items": _obj({
        "name": {"type": "string", "minLength": 1}, "interval": DURATION, "limit": {"type": "integer"},
        "partial_response_strategy": {"type": "string"}, "query_offset": DURATION,
        "rules": {"type": "array", "items": _RULE},
    }, ["name"])},
}))

_PROTOCOL = {"enum": ["v1", "v2", "grpc-v1", "grpc-v2"]}

SERVING_RUNTIME = _resource("serving.kserve.io/v1alpha1", "ServingRuntime", _obj({
    "supportedModelFormats": {"type": "array", "items": _obj({
        "name": {"type": "string"}, "version": {"type": "string"}, "autoSelect": {"type": "boolean"},
        "priority": {"type": "integer", "minimum": 1}}, ["name"])},
    "protocolVersions": {"type": "array", "items": _PROTOCOL},
    "multiModel": {"type": "boolean"}, "disabled": {"type": "boolean"},
    "containers": {"type": "array", "minItems": 1, "items": _ref("api.core.v1.Container")},
    "volumes": {"type": "array", "items": _ref("api.core.v1.Volume")},
    "nodeSelector": STR_MAP, "affinity": _ref("api.core.v1.Affinity"),
    "tolerations": {"type": "array", "items": _ref("api.core.v1.Toleration")},
    "labels": STR_MAP, "annotations": STR_MAP,
    "imagePullSecrets": {"type": "array", "items": _ref("api.core.v1.LocalObjectReference")},
    "grpcEndpoint": {"type": "string"}, "grpcDataEndpoint": {"type": "string"}, "httpDataEndpoint": {"type": "string"},
    "replicas": {"type": "integer"}, "storageHelper": {"type": "object"}, "builtInAdapter": {"type": "object"},
    "hostIPC": {"type": "boolean"}, "workerSpec": {"type": "object"},
}, ["containers"]))

_COMPONENT_EXTENSION = {
    "minReplicas": {"type": "integer", "minimum": 0}, "maxReplicas": {"type": "integer", "minimum": 0},
    "scaleTarget": {"type": "integer"}, "scaleMetric": {"enum": ["cpu", "memory", "concurrency", "rps"]},
    "scaleMetricType": {"type": "string"}, "containerConcurrency": {"type": "integer"},
    "timeout": {"type": "integer"}, "canaryTrafficPercent": {"type": "integer"}, "logger": {"type": "object"},
    "batcher": {"type": "object"}, "labels": STR_MAP, "annotations": STR_MAP, "deploymentStrategy": {"type": "object"},
    "autoScaling": {"type": "object"},
}
_POD_SPEC_SUBSET = {
    "containers": {"type": "array", "items": _ref("api.core.v1.Container")},
    "volumes": {"type": "array", "items": _ref("api.core.v1.Volume")},
    "serviceAccountName": {"type": "string"}, "nodeSelector": STR_MAP,
    "tolerations": {"type": "array", "items": _ref("api.core.v1.Toleration")},
    "affinity": _ref("api.core.v1.Affinity"), "securityContext": _ref("api.core.v1.PodSecurityContext"),
    "imagePullSecrets": {"type": "array", "items": _ref("api.core.v1.LocalObjectReference")},
}
_MODEL = _obj({
    "modelFormat": _obj({"name": {"type": "string"}, "version": {"type": "string"}}, ["name"]),
    "runtime": {"type": "string"}, "protocolVersion": _PROTOCOL, "storageUri": {"type": "string"},
    "storage": {"type": "object"},
    "resources": _ref("api.core.v1.ResourceRequirements"),
    "env": {"type": "array", "items": _ref("api.core.v1.EnvVar")},
    "args": {"type": "array", "items": {"type": "string"}},
    "image": {"type": "string"}, "name": {"type": "string"},
    "securityContext": _ref("api.core.v1.SecurityContext"),
    "readinessProbe": _ref("api.core.v1.Probe"), "livenessProbe": _ref("api.core.v1.Probe"),
    "ports": {"type": "array", "items": _ref("api.core.v1.ContainerPort")},
}, ["modelFormat"])

INFERENCE_SERVICE = _resource("serving.kserve.io/v1beta1", "InferenceService", _obj({
    "predictor": _obj({"model": _MODEL, **_COMPONENT_EXTENSION, **_POD_SPEC_SUBSET}),
    "transformer": {"type": "object"}, "explainer": {"type": "object"},
}, ["predictor"]))

SCHEMAS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): SERVICE_MONITOR,
    ("monitoring.coreos.com/v1", "PrometheusRule"): PROMETHEUS_RULE,
    ("serving.kserve.io/v1alpha1", "ServingRuntime"): SERVING_RUNTIME,
    ("serving.kserve.io/v1beta1", "InferenceService"): INFERENCE_SERVICE,
}


@cache
def _registry(k8s_version: str) -> Registry:
    strict_dir = files(kubernetes_validate).joinpath(
        "kubernetes-json-schema", f"v{k8s_version}-local-strict", "_definitions.json")
    definitions = json.loads(strict_dir.read_text())
    return Resource.from_contents(definitions) @ Registry()


def validate_custom_resource(doc: dict[str, Any], k8s_version: str) -> None:
    """Raise jsonschema.ValidationError unless ``doc`` matches its custom resource schema."""
    schema = SCHEMAS[(doc["apiVersion"], doc["kind"])]
    validator = jsonschema.Draft202012Validator(schema, registry=_registry(k8s_version))
    validator.validate(doc)
