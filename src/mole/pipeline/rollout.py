"""Roll the generation service onto a new champion: the promote step's last act on a cluster.

``mole serve --model models:/mole@champion`` resolves the alias once, when it loads. A promotion therefore only
reaches the service through a rollout: the promote step writes the new version into the Deployment's pod
template (an annotation), which makes Kubernetes replace the pods one at a time (the chart's ``maxSurge: 0``:
no spare GPU needed), and scales a Deployment that waits at zero replicas for its first champion up to its
configured size. Until then no serve pod exists, so none holds a GPU. The Kubernetes API is reached only through
:class:`AppsApi`, which tests replace.
"""

from __future__ import annotations

import logging
from typing import Any

logger = logging.getLogger(__name__)

#: The pod-template annotation that carries the served version (changing it starts a rollout).
VERSION_ANNOTATION = "mole.ai/model-version"


class AppsApi:
    """The two Deployment calls a rollout needs, and nothing else."""

    def __init__(self) -> None:
        from kubernetes import client, config

        try:
            config.load_incluster_config()
        except config.ConfigException:
            config.load_kube_config()
        self.apps = client.AppsV1Api()

    def replicas(self, namespace: str, name: str) -> int:
        return int(self.apps.read_namespaced_deployment(name, namespace).spec.replicas or 0)

    def patch(self, namespace: str, name: str, body: dict[str, Any]) -> None:
        self.apps.patch_namespaced_deployment(name, namespace, body)


def roll_out(
    deployment: str, namespace: str, model: str, version: str, replicas: int, api: AppsApi | None = None
) -> str:
    """Point the pods of ``deployment`` at ``model`` version ``version`` and give it at least ``replicas`` pods
    (it may run more: an autoscaler's choice is kept). Returns what was done."""
    api = api or AppsApi()
    current = api.replicas(namespace, deployment)
    target = max(current, replicas)
    body: dict[str, Any] = {
        "spec": {"template": {"metadata": {"annotations": {VERSION_ANNOTATION: f"{model}/{version}"}}}}
    }
    if target != current:
        body["spec"]["replicas"] = target
    api.patch(namespace, deployment, body)
    what = f"rolled {namespace}/{deployment} onto {model} version {version}"
    if target != current:
        what += f", scaled {current} -> {target} pods"
    logger.info(what)
    return what
