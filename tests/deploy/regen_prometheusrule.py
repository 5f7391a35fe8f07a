"""Regenerate deploy/k8s/base/prometheusrule.yaml from deploy/prometheus/alerts.yml.

    python tests/deploy/regen_prometheusrule.py

alerts.yml is the one source of the rules; the PrometheusRule carries the same groups for the
Prometheus Operator. test_deploy_prometheus.py fails when the two differ.
"""

from __future__ import annotations

from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
SOURCE = REPO / "deploy" / "prometheus" / "alerts.yml"
TARGET = REPO / "deploy" / "k8s" / "base" / "prometheusrule.yaml"

HEADER = """\
# The alert and recording rules of deploy/prometheus/alerts.yml for the Prometheus Operator.
# Generated from that file (same groups after parsing; tests/deploy checks it).
# After editing alerts.yml, regenerate with:
#   python tests/deploy/regen_prometheusrule.py
"""


class _Dumper(yaml.SafeDumper):
    pass


def _str(dumper: yaml.SafeDumper, data: str) -> yaml.Node:
    style = "|" if "\n" in data else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", data, style=style)


_Dumper.add_representer(str, _str)


def render() -> str:
    groups = yaml.safe_load(SOURCE.read_text())["groups"]
    doc = {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {
            "name": "hjserve",
            "labels": {"app.kubernetes.io/name": "hjserve", "release": "kube-prometheus-stack"},
        },
        "spec": {"groups": groups},
    }
    return HEADER + yaml.dump(doc, Dumper=_Dumper, sort_keys=False, width=100, allow_unicode=True)


def main() -> None:
    TARGET.write_text(render())
    print(f"wrote {TARGET.relative_to(REPO)}")


if __name__ == "__main__":
    main()
