"""Promotion against a real MLflow server: a run promotes the version it registered, never whatever the shared
``candidate`` alias points to, and concurrent promotions leave ``champion`` on the best contender."""

from __future__ import annotations

import json
import threading
import uuid

import pytest

pytest.importorskip("mlflow")


@pytest.fixture
def registry(mlflow_server, s3_server, monkeypatch: pytest.MonkeyPatch):
    """A fresh registered model on the real server: ``new_version(score)`` registers a scored version and points
    ``candidate`` at it, as a run's gates and evaluate steps do."""
    import mlflow

    monkeypatch.setenv("MOLE_TRACKING", "on")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.uri)
    monkeypatch.setenv("MLFLOW_S3_ENDPOINT_URL", s3_server.endpoint_url)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_server.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_server.secret_key)
    client = mlflow.MlflowClient()
    name = f"mole-race-{uuid.uuid4().hex[:8]}"
    client.create_registered_model(name)
    experiment = client.create_experiment(name)

    def new_version(score: float) -> str:
        run = client.create_run(experiment)
        client.log_text(run.info.run_id, "weights", "model/weights.txt")
        mv = client.create_model_version(name, f"runs:/{run.info.run_id}/model", run_id=run.info.run_id)
        client.set_model_version_tag(name, mv.version, "mole.metric.hps", str(score))
        client.set_registered_model_alias(name, "candidate", mv.version)
        return str(mv.version)

    return client, name, new_version


def _report(score: float) -> str:
    return json.dumps({"scores": {"hps": {"mean": score, "sem": 0.0}}})


def test_a_run_promotes_its_own_version_not_the_candidate_alias(registry) -> None:
    from mole.pipeline import steps

    client, name, new_version = registry
    mine = new_version(0.7)
    theirs = new_version(0.2)  # a concurrent run registered after mine: `candidate` now points at theirs
    assert client.get_model_version_by_alias(name, "candidate").version == theirs
    why = steps.promote("hps", _report(0.7), f"models:/{name}/{mine}")
    assert client.get_model_version_by_alias(name, "champion").version == mine, why
    # The worse version of the other run does not beat it.
    why = steps.promote("hps", _report(0.2), f"models:/{name}/{theirs}")
    assert "does not beat" in why and client.get_model_version_by_alias(name, "champion").version == mine
    with pytest.raises(ValueError, match="registered version"):
        steps.promote("hps", _report(0.2), f"models:/{name}@candidate")


def test_concurrent_promotions_end_on_the_best_version(registry, monkeypatch: pytest.MonkeyPatch) -> None:
    """Forced worst case: the worse run decides first and its alias write lands last. Without the settle loop
    the champion ends on the worse version."""
    import mlflow

    from mole.pipeline import steps

    client, name, new_version = registry
    worse, better = new_version(0.3), new_version(0.9)
    worse_writing = threading.Event()
    real_set_alias = mlflow.MlflowClient.set_registered_model_alias

    def slow_for_worse(self, model, alias, version):
        if model == name and alias == "champion" and str(version) == worse and not worse_writing.is_set():
            worse_writing.set()
            threading.Event().wait(1.0)  # the better run promotes meanwhile; this write lands after it
        return real_set_alias(self, model, alias, version)

    monkeypatch.setattr(mlflow.MlflowClient, "set_registered_model_alias", slow_for_worse)
    results: dict[str, str] = {}

    def run(version: str, score: float, wait: threading.Event | None) -> None:
        if wait is not None:
            wait.wait(10)
        results[version] = steps.promote("hps", _report(score), f"models:/{name}/{version}")

    threads = [threading.Thread(target=run, args=(worse, 0.3, None)),
               threading.Thread(target=run, args=(better, 0.9, worse_writing))]  # fmt: skip
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert worse_writing.is_set(), "the interleaving under test did not happen"
    assert client.get_model_version_by_alias(name, "champion").version == better, results
    assert results[better].startswith("champion -> version")
    assert f"version {better} scores better" in results[worse]


def test_free_running_concurrent_promotions(registry) -> None:
    from mole.pipeline import steps

    client, name, new_version = registry
    scores = {new_version(s): s for s in (0.1, 0.5, 0.8, 0.4)}
    barrier = threading.Barrier(len(scores))

    def run(version: str) -> None:
        barrier.wait(10)
        steps.promote("hps", _report(scores[version]), f"models:/{name}/{version}")

    threads = [threading.Thread(target=run, args=(v,)) for v in scores]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    best = max(scores, key=scores.get)
    assert client.get_model_version_by_alias(name, "champion").version == best


def test_a_rollback_by_hand_is_not_undone_by_old_contenders(registry, monkeypatch: pytest.MonkeyPatch) -> None:
    from mole import tracking
    from mole.pipeline import steps

    client, name, new_version = registry
    good, bad = new_version(0.5), new_version(0.9)
    steps.promote("hps", _report(0.5), f"models:/{name}/{good}")
    steps.promote("hps", _report(0.9), f"models:/{name}/{bad}")
    client.set_registered_model_alias(name, "champion", good)  # a person rolls the bad model back
    monkeypatch.setattr(tracking, "PROMOTION_WINDOW_S", 0.0)  # ... an hour later
    newer = new_version(0.6)
    steps.promote("hps", _report(0.6), f"models:/{name}/{newer}")
    assert client.get_model_version_by_alias(name, "champion").version == newer


def test_a_promotion_rolls_the_service_onto_the_new_champion(registry, monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.test_pipeline_steps import FakeApps

    from mole.pipeline import rollout, steps

    _client, name, new_version = registry
    apps = FakeApps(0)
    monkeypatch.setattr(rollout, "AppsApi", lambda: apps)
    first = new_version(0.4)
    why = steps.promote("hps", _report(0.4), f"models:/{name}/{first}", serve_deployment="mole-serve",
                        serve_replicas=2, namespace="kubeflow")  # fmt: skip
    assert "scaled 0 -> 2" in why and apps.deployment["spec"]["replicas"] == 2
    worse = new_version(0.1)
    steps.promote("hps", _report(0.1), f"models:/{name}/{worse}", serve_deployment="mole-serve", namespace="kubeflow")
    assert len(apps.patches) == 1  # not promoted: nothing rolled
