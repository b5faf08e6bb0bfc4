"""JSON schemas for the two custom resources xaid ships, over the Kubernetes OpenAPI definitions.

kubernetes-validate holds schemas for built-in kinds only. These schemas check the fields the
manifests use (unknown fields fail) and validate every embedded Kubernetes type (containers,
volumes, selectors, object metadata) against the real Kubernetes definitions.
"""

from __future__ import annotations

import json
from importlib.resources import files
from typing import Any

import jsonschema
import kubernetes_validate
from referencing import Registry, Resource

DEFS = "/api/_definitions.json#/$defs/io.k8s."
META = {"$ref": DEFS + "apimachinery.pkg.apis.meta.v1.ObjectMeta"}
#: The Prometheus Operator's duration pattern.
DURATION = {
    "type": "string",
    "pattern": r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?"
    r"(([0-9]+)s)?(([0-9]+)ms)?)$",
}


def _resource(schema_id: str, api_version: str, kind: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": f"https://kubernetes.io/api/{schema_id}.json",
        "type": "object",
        "additionalProperties": False,
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "apiVersion": {"const": api_version},
            "kind": {"const": kind},
            "metadata": META,
            "spec": spec,
        },
    }


def _strict_object(required: list[str], properties: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "object",
        "additionalProperties": False,
        "required": required,
        "properties": properties,
    }


SERVICE_MONITOR = _resource(
    "servicemonitor-monitoring-v1",
    "monitoring.coreos.com/v1",
    "ServiceMonitor",
    _strict_object(
        ["selector", "endpoints"],
        {
            "selector": {"$ref": DEFS + "apimachinery.pkg.apis.meta.v1.LabelSelector"},
            "jobLabel": {"type": "string"},
            "podTargetLabels": {"type": "array", "items": {"type": "string"}},
            "targetLabels": {"type": "array", "items": {"type": "string"}},
            "endpoints": {
                "type": "array",
                "minItems": 1,
                "items": _strict_object(
                    ["port"],
                    {
                        "port": {"type": "string"},
                        "path": {"type": "string", "pattern": "^/"},
                        "scheme": {"enum": ["http", "https"]},
                        "interval": DURATION,
                        "scrapeTimeout": DURATION,
                        "honorLabels": {"type": "boolean"},
                    },
                ),
            },
        },
    ),
)

INFERENCE_SERVICE = _resource(
    "inferenceservice-serving-v1beta1",
    "serving.kserve.io/v1beta1",
    "InferenceService",
    _strict_object(
        ["predictor"],
        {
            "predictor": _strict_object(
                ["containers"],
                {
                    "minReplicas": {"type": "integer", "minimum": 0},
                    "maxReplicas": {"type": "integer", "minimum": 1},
                    "terminationGracePeriodSeconds": {"type": "integer", "minimum": 0},
                    "serviceAccountName": {"type": "string"},
                    "securityContext": {"$ref": DEFS + "api.core.v1.PodSecurityContext"},
                    "containers": {
                        "type": "array",
                        "minItems": 1,
                        "items": {"$ref": DEFS + "api.core.v1.Container"},
                    },
                    "volumes": {"type": "array", "items": {"$ref": DEFS + "api.core.v1.Volume"}},
                },
            ),
        },
    ),
)


def validator(schema: dict[str, Any]) -> jsonschema.Draft202012Validator:
    """A validator resolving Kubernetes types from kubernetes-validate's strict definitions."""
    version = kubernetes_validate.latest_version()
    definitions = (
        files("kubernetes_validate")
        / "kubernetes-json-schema"
        / f"v{version}-local-strict"
        / "_definitions.json"
    )
    registry: Registry[Any] = (
        Resource.from_contents(json.loads(definitions.read_text())) @ Registry()
    )
    return jsonschema.Draft202012Validator(schema, registry=registry)
