"""`mole study`: a study from evaluation runs, votes in SQLite and a real PostgreSQL, the API's validation and
limits, and the report's numbers recomputed by hand."""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from tests.study_helpers import PROMPTS, postgres_bin, running_postgres, write_eval_run
from typer.testing import CliRunner

from mole.cli import app as cli_app
from mole.evaluate.study.app import COOKIE, StudySettings, create_study_app
from mole.evaluate.study.design import StudyError, create_study, load_study, parse_questions
from mole.evaluate.study.report import study_report, write_report
from mole.evaluate.study.stats import krippendorff_alpha_nominal, pairwise_agreement, wilson
from mole.evaluate.study.store import VoteRefused, VoteStore, database_url

runner = CliRunner()
PG_BIN = postgres_bin()


@pytest.fixture(scope="module")
def postgres_url() -> Iterator[str]:
    if PG_BIN is None:
        pytest.skip("no PostgreSQL server binaries (`make setup` installs Debian's postgresql)")
    with running_postgres(PG_BIN) as url:
        yield url


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Every store test runs against SQLite and, when its binaries are installed, a real PostgreSQL server."""
    if request.param == "sqlite":
        return database_url(None, tmp_path)
    return request.getfixturevalue("postgres_url")


@pytest.fixture
def two_runs(tmp_path: Path) -> tuple[Path, Path]:
    a = write_eval_run(tmp_path / "eval-base", "base", (200, 0, 0), scores={"clip": [20.0, 25.0, 30.0]})
    b = write_eval_run(tmp_path / "eval-mole", "MoLE", (0, 0, 200), scores={"clip": [21.0, 24.0, 31.0]})
    return a, b


def test_create_copies_images_and_pairs_every_model_pair(two_runs, tmp_path: Path) -> None:
    c = write_eval_run(tmp_path / "eval-x", "x", (0, 200, 0))
    study = create_study([*two_runs, c], tmp_path / "study", questions=parse_questions(["overall", "hand"]))
    again = load_study(tmp_path / "study")
    assert again == study
    assert [m.label for m in study.models] == ["base", "MoLE", "x"]
    assert len(study.items) == 3 and len(study.pairs) == 9  # 3 prompts × 3 model pairs
    assert {(p.a, p.b) for p in study.pairs} == {(0, 1), (0, 2), (1, 2)}
    assert study.question_keys == ["overall", "hand"]
    assert study.items[1].scores == {"base": {"clip": 25.0}, "MoLE": {"clip": 24.0}, "x": {}}
    assert study.models[0].scorers == ("clip",) and study.models[2].scorers == ()
    for m, run in enumerate([*two_runs, c]):
        for it in study.items:
            copy = study.image_path(m, it.item)
            assert copy.read_bytes() == (run / "images" / "r0" / f"{it.index:05d}.png").read_bytes()
    sampled = create_study(two_runs, tmp_path / "s2", max_items=2, seed=3)
    assert len(sampled.items) == 2 and len(sampled.pairs) == 2


def test_create_refuses_runs_of_other_prompts_or_seeds(two_runs, tmp_path: Path) -> None:
    base, _ = two_runs
    other = write_eval_run(tmp_path / "other-prompt", "o", (1, 2, 3), prompts=[PROMPTS[0], "a dog", PROMPTS[2]])
    with pytest.raises(StudyError, match=r"repeat 0 index 1: prompt 'a dog' vs 'a man waving his hand'"):
        create_study([base, other], tmp_path / "s")
    seeded = write_eval_run(tmp_path / "other-seed", "s", (1, 2, 3), seed=9)
    with pytest.raises(StudyError, match=r"repeat 0 index 0: seed"):
        create_study([base, seeded], tmp_path / "s")
    short = write_eval_run(tmp_path / "short", "short", (1, 2, 3), prompts=PROMPTS[:2])
    with pytest.raises(StudyError, match=r"2 vs 3 rows; missing \(repeat, index\) \[\(0, 2\)\]"):
        create_study([base, short], tmp_path / "s")
    with pytest.raises(StudyError, match="at least two"):
        create_study([base], tmp_path / "s")
    with pytest.raises(StudyError, match="labels must differ"):
        create_study([base, base], tmp_path / "s")
    gone = write_eval_run(tmp_path / "gone", "gone", (1, 2, 3))
    (gone / "images" / "r0" / "00001.png").unlink()
    with pytest.raises(StudyError, match=r"00001\.png is missing"):
        create_study([base, gone], tmp_path / "s")
    assert not (tmp_path / "s" / "study.json").exists()
    broken = write_eval_run(tmp_path / "broken", "broken", (1, 2, 3), scores={"clip": [1.0, "oops", 2.0]})
    with pytest.raises(StudyError, match=r"'broken', repeat 0 index 1: a score is not a number"):
        create_study([base, broken], tmp_path / "s")
    with pytest.raises(StudyError, match="needs a text"):
        parse_questions(["feet"])
    with pytest.raises(StudyError, match="must be 1-32 lower-case"):
        parse_questions(["Bad Key=text"])
    # The CLI says the same, with exit code 2.
    result = runner.invoke(cli_app, ["study", "create", "--runs", str(base), "--runs", str(seeded),
                                     "--output", str(tmp_path / "s")])  # fmt: skip
    assert result.exit_code == 2 and "seed" in result.output


def test_store_never_shows_a_pair_twice_and_validates_votes(two_runs, tmp_path: Path, db_url: str) -> None:
    from mole.evaluate.study.assign import next_pair

    study = create_study(two_runs, tmp_path / "study")
    store = VoteStore(db_url, study.study_id)
    try:
        rater, token = store.new_rater()
        assert store.rater_of(token) == rater and store.rater_of("x" * 40) is None
        assert token not in json.dumps(store.all_votes(), default=str)
        seen = []
        rng = random.Random(0)
        while (nxt := next_pair(study, store, rater, rng)).assignment is not None:
            a = nxt.assignment
            assert next_pair(study, store, rater, rng).assignment == a  # a reload shows the same pair
            assert nxt.answered == len(seen)
            pair = study.pairs[a.pair_id]
            keys = study.question_keys
            with pytest.raises(VoteRefused, match="not in this study") as err:
                store.record(rater, a.token, {**dict.fromkeys(keys, "tie"), "feet": "left"}, keys, (pair.a, pair.b))
            assert err.value.status == 422
            with pytest.raises(VoteRefused, match="not answered") as err:
                store.record(rater, a.token, {"overall": "left"}, keys, (pair.a, pair.b))
            assert err.value.status == 422
            with pytest.raises(VoteRefused, match="one of") as err:
                store.record(rater, a.token, dict.fromkeys(keys, "both"), keys, (pair.a, pair.b))
            other_rater, _ = store.new_rater()
            with pytest.raises(VoteRefused, match="not shown to you") as err:
                store.record(other_rater, a.token, dict.fromkeys(keys, "left"), keys, (pair.a, pair.b))
            assert err.value.status == 403
            assert store.record(rater, a.token, dict.fromkeys(keys, "left"), keys, (pair.a, pair.b)) == 4
            with pytest.raises(VoteRefused, match="answered already") as err:
                store.record(rater, a.token, dict.fromkeys(keys, "left"), keys, (pair.a, pair.b))
            assert err.value.status == 409
            seen.append(a.pair_id)
        assert sorted(seen) == [p.pair for p in study.pairs]  # every pair once, none twice
        assert store.add_assignment(rater, seen[0], True) is None  # the database refuses a second showing
        votes = store.all_votes()
        assert len(votes) == 4 * len(seen) and {v["rater_id"] for v in votes} == {rater}
        for v in votes:  # the winner is whichever model was shown on the left
            assert v["choice"] == "left" and v["winner"] == v["left_model"] and v["created_at"] is not None
    finally:
        store.close()


def _client(study, store, **settings) -> TestClient:
    return TestClient(create_study_app(study, store, StudySettings(**settings)))


def test_api_rater_completes_a_study_and_the_report_counts_it(two_runs, tmp_path: Path, db_url: str) -> None:
    study = create_study(two_runs, tmp_path / "study", questions=parse_questions(["overall", "face"]))
    store = VoteStore(db_url, study.study_id)
    try:
        expected = {("overall", "MoLE"): 0, ("overall", "tie"): 0, ("face", "base"): 0, ("face", "tie"): 0}
        with _client(study, store) as client:
            for _ in range(len(study.pairs)):
                body = client.post("/api/next").json()
                pair = body["pair"]
                assert pair["prompt"] in PROMPTS and "MoLE" not in json.dumps(pair)  # nothing unblinds the pair
                left = client.get(pair["left"])
                assert left.status_code == 200 and left.headers["content-type"] == "image/png"
                # The rater wants MoLE overall (the blue image) and says tie for faces.
                from io import BytesIO

                from PIL import Image

                blue_left = Image.open(BytesIO(left.content)).getpixel((8, 8))[2] == 200
                answers = {"overall": "left" if blue_left else "right", "face": "tie"}
                assert client.post("/api/vote", json={"token": pair["token"], "answers": answers}).json() == {
                    "stored": 2
                }
                expected[("overall", "MoLE")] += 1
                expected[("face", "tie")] += 1
            done = client.post("/api/next").json()
            assert done["pair"] is None and done["progress"] == {"answered": 3, "total": 3}
            assert client.cookies.get(COOKIE) and done["rater"] != client.cookies.get(COOKIE)
        report = study_report(study, store.all_votes())
    finally:
        store.close()
    (overall, face) = report["win_rates"]
    assert (overall["question"], overall["votes"], overall["b_wins"]["count"]) == ("overall", 3, 3)
    assert overall["a_wins"]["count"] == 0 and overall["b_wins"]["rate"] == 1.0
    assert overall["b_wins"]["ci95"] == pytest.approx(list(wilson(3, 3)))
    assert face["ties"]["count"] == 3 and report["raters"] == 1 and report["votes"] == 6


def test_api_refuses_votes_it_did_not_ask_for(two_runs, tmp_path: Path) -> None:
    study = create_study(two_runs, tmp_path / "study")
    store = VoteStore(database_url(None, study.root), study.study_id)
    answers = dict.fromkeys(study.question_keys, "left")
    try:
        with _client(study, store) as alice, _client(study, store) as mallory:
            pair = alice.post("/api/next").json()["pair"]
            mallory.post("/api/next")
            # Another rater can neither see nor vote on alice's pair; a made-up token is refused too.
            assert mallory.get(pair["left"]).status_code == 404
            r = mallory.post("/api/vote", json={"token": pair["token"], "answers": answers})
            assert r.status_code == 403 and "not shown" in r.json()["message"]
            r = alice.post("/api/vote", json={"token": "A" * 32, "answers": answers})
            assert r.status_code == 403
            # No cookie: no rater, no vote.
            with TestClient(alice.app) as anonymous:
                assert (
                    anonymous.post("/api/vote", json={"token": pair["token"], "answers": answers}).status_code == 403
                )
            # An aspect that is not configured, a bad choice, an extra field: 422 with a message.
            r = alice.post("/api/vote", json={"token": pair["token"], "answers": {**answers, "feet": "left"}})
            assert r.status_code == 422 and "feet" in r.json()["message"]
            r = alice.post("/api/vote", json={"token": pair["token"], "answers": {**answers, "overall": "both"}})
            assert r.status_code == 422
            r = alice.post("/api/vote", json={"token": pair["token"], "answers": answers, "winner": "MoLE"})
            assert r.status_code == 422
            assert alice.post("/api/vote", json={"token": pair["token"], "answers": answers}).status_code == 200
            assert alice.post("/api/vote", json={"token": pair["token"], "answers": answers}).status_code == 409
            page = alice.get("/")
            assert "script-src 'self'" in page.headers["content-security-policy"]
            assert "<script>" not in page.text  # the only script is /study.js
        assert len(store.all_votes()) == 4
    finally:
        store.close()


def test_api_rate_limits_requests_and_new_raters(two_runs, tmp_path: Path) -> None:
    study = create_study(two_runs, tmp_path / "study")
    store = VoteStore(database_url(None, study.root), study.study_id)
    try:
        with _client(study, store, requests_per_minute=1, burst=3) as client:
            # The first request (no rater yet) counts against the address, the next ones against the rater.
            codes = [client.post("/api/next").status_code for _ in range(6)]
            assert codes == [200, 200, 200, 200, 429, 429]
            r = client.post("/api/next")
            assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
        with _client(study, store, new_raters_per_hour=2) as client:
            codes = []
            for _ in range(4):
                client.cookies.clear()
                codes.append(client.post("/api/next").status_code)
            assert codes == [200, 200, 429, 429]
    finally:
        store.close()


def test_stats_against_published_values() -> None:
    # Krippendorff (2011), "Computing Krippendorff's alpha-reliability", the nominal example: alpha = 0.743.
    rows = [[1, 2, 3, 3, 2, 1, 4, 1, 2, None, None, None], [1, 2, 3, 3, 2, 2, 4, 1, 2, 5, None, 3],
            [None, 3, 3, 3, 2, 3, 4, 2, 2, 5, 1, None], [1, 2, 3, 3, 2, 4, 4, 1, 2, 5, 1, None]]  # fmt: skip
    units = {i: [r[i] for r in rows if r[i] is not None] for i in range(12)}
    assert krippendorff_alpha_nominal(units) == pytest.approx(0.743, abs=5e-4)
    assert krippendorff_alpha_nominal({0: ["a", "a"], 1: ["b", "b"]}) == pytest.approx(1.0)
    assert krippendorff_alpha_nominal({0: ["a", "a"], 1: ["a"]}) is None  # no variation: undefined
    assert pairwise_agreement({0: ["a", "a", "b"], 1: ["c", "c"]}) == (pytest.approx(2 / 4), 4)
    assert wilson(7, 10) == pytest.approx((0.3968, 0.8922), abs=1e-4)  # the textbook value
    assert wilson(0, 10)[0] == 0.0 and wilson(0, 0) == (0.0, 1.0)


@pytest.mark.slow
def test_report_agreement_scorers_and_mlflow(two_runs, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Three raters with known answers: every count, the rater agreement and the scorer agreement by hand; the
    report lands on both evaluation runs' MLflow runs."""
    import mlflow

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("MOLE_TRACKING", "on")
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    mlflow.set_experiment("study")  # never the active experiment an earlier test left in this process
    run_ids = []
    for _ in range(2):
        with mlflow.start_run() as run:
            run_ids.append(run.info.run_id)
    a = write_eval_run(tmp_path / "a", "base", (200, 0, 0), scores={"clip": [20.0, 25.0, 30.0]},
                       mlflow_run_id=run_ids[0])  # fmt: skip
    b = write_eval_run(tmp_path / "b", "MoLE", (0, 0, 200), scores={"clip": [21.0, 24.0, 31.0]},
                       mlflow_run_id=run_ids[1])  # fmt: skip
    study = create_study([a, b], tmp_path / "study", questions=parse_questions(["overall"]))
    # clip prefers MoLE on items 0 and 2, base on item 1. Votes (winner model index; None = tie):
    answers = {"r1": [1, 0, 1], "r2": [1, 1, 1], "r3": [None, 0, 1]}
    votes = [{"rater_id": r, "pair_id": p, "question": "overall", "winner": w,
              "choice": "tie" if w is None else ("left" if (w + p) % 2 else "right"), "left_model": 0}
             for r, ws in answers.items() for p, w in enumerate(ws)]  # fmt: skip
    votes.append({"rater_id": "r1", "pair_id": 0, "question": "removed", "winner": 1, "choice": "left",
                  "left_model": 1})  # fmt: skip
    report = write_report(study, votes)
    (row,) = report["win_rates"]
    assert (row["votes"], row["a_wins"]["count"], row["ties"]["count"], row["b_wins"]["count"]) == (9, 2, 1, 6)
    assert report["left_out_votes"] == 1
    # Units: pair 0 [1, 1, tie], pair 1 [0, 1, 0], pair 2 [1, 1, 1] -> 9 rater pairs, 1 + 1 + 3 agree.
    assert report["agreement"]["overall"]["percent"] == pytest.approx(5 / 9)
    assert report["agreement"]["overall"]["alpha"] == pytest.approx(
        krippendorff_alpha_nominal({0: [1, 1, "tie"], 1: [0, 1, 0], 2: [1, 1, 1]})
    )
    (clip,) = report["scorer_agreement"]
    # Non-tie votes agreeing with clip: pair 0: 2 of 2, pair 1: 2 of 3, pair 2: 3 of 3; majorities: all 3 agree.
    assert (clip["votes"]["count"], clip["votes"]["rate"]) == (7, pytest.approx(7 / 8))
    assert clip["majority_pairs"]["count"] == 3 and clip["scorer_prefers_a"] == 1
    md = (tmp_path / "study" / "report" / "report.md").read_text()
    assert "| base | MoLE | overall | 9 | 22.2 % [" in md and "Krippendorff" in md and "Wilson" in md
    assert (tmp_path / "study" / "report" / "win_rates.png").stat().st_size > 1000
    client = mlflow.MlflowClient()
    for run_id, own in zip(run_ids, ("a_wins", "b_wins"), strict=True):
        data = client.get_run(run_id).data
        assert data.metrics["study.overall.win_vs." + ("MoLE" if own == "a_wins" else "base")] == pytest.approx(
            row[own]["rate"]
        )
        assert data.metrics["study.overall.votes_vs." + ("MoLE" if own == "a_wins" else "base")] == 9
        assert data.tags["mole.study"] == study.study_id
        names = {f.path for f in client.list_artifacts(run_id, f"study/{study.study_id}")}
        assert {f"study/{study.study_id}/report.md", f"study/{study.study_id}/win_rates.png"} <= names


@pytest.mark.slow
def test_study_of_real_tracked_evaluations(tiny_model_dir: Path, tmp_path: Path, monkeypatch) -> None:
    """Two real `mole evaluate run`s of the embedded default, tracked: each records its MLflow run id in its
    report.json, the study takes their prompts, seeds, images and CLIP scores, and its report lands on both runs."""
    import mlflow

    from mole.evaluate.runner import EvalSettings, evaluate_tracked
    from mole.evaluate.study.assign import next_pair
    from mole.tiny import init_tiny_clip, init_tiny_model

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("MOLE_TRACKING", "on")
    monkeypatch.setenv("MOLE_SYSTEM_METRICS", "off")
    clip = init_tiny_clip(tmp_path / "clip", train_steps=0)
    other = init_tiny_model(tmp_path / "other", seed=1)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a smiling woman\na man waving his hand\n", encoding="utf-8")
    runs = []
    for label, model in (("base", tiny_model_dir), ("other", other)):
        settings = EvalSettings(model=str(model), prompts=str(prompts), num_prompts=2, repeats=1, steps=2,
                                scorers=["clip"], scorer_config={"clip": {"model": str(clip), "device": "cpu"}},
                                batch_size=2, label=label)  # fmt: skip
        report = evaluate_tracked(settings, tmp_path / label)
        written = json.loads((tmp_path / label / "report.json").read_text())
        assert written["mlflow_run_id"] == report["mlflow_run_id"]
        assert mlflow.MlflowClient().get_run(written["mlflow_run_id"]).data.tags["mole.stage"] == "evaluate"
        runs.append(tmp_path / label)
    study = create_study(runs, tmp_path / "study", questions=parse_questions(["overall"]))
    assert [m.mlflow_run_id for m in study.models] == [
        json.loads((r / "report.json").read_text())["mlflow_run_id"] for r in runs
    ]
    store = VoteStore(database_url(None, study.root), study.study_id)
    try:
        rater, _ = store.new_rater()
        while (a := next_pair(study, store, rater).assignment) is not None:
            pair = study.pairs[a.pair_id]
            store.record(rater, a.token, {"overall": "left"}, ["overall"], (pair.a, pair.b))
        report = write_report(study, store.all_votes())
    finally:
        store.close()
    assert report["votes"] == 2 and report["scorer_agreement"][0]["scorer"] == "clip"
    for model in study.models:
        metrics = mlflow.MlflowClient().get_run(model.mlflow_run_id).data.metrics
        other_label = "other" if model.label == "base" else "base"
        assert metrics[f"study.overall.votes_vs.{other_label}"] == 2


def test_concurrent_votes_on_one_pair_count_once(two_runs, tmp_path: Path, db_url: str) -> None:
    """Eight submissions of the same pair at once (a double click, a retried request): one is stored, seven get
    409, none is lost or counted twice."""
    from concurrent.futures import ThreadPoolExecutor

    from mole.evaluate.study.assign import next_pair

    study = create_study(two_runs, tmp_path / "study", pairs_per_rater=2)
    store = VoteStore(db_url, study.study_id)
    try:
        rater, _ = store.new_rater()
        a = next_pair(study, store, rater).assignment
        pair = study.pairs[a.pair_id]
        answers = dict.fromkeys(study.question_keys, "right")

        def submit(_: int) -> int:
            try:
                return store.record(rater, a.token, answers, study.question_keys, (pair.a, pair.b))
            except VoteRefused as err:
                return -err.status

        with ThreadPoolExecutor(8) as pool:
            results = sorted(pool.map(submit, range(8)))
        assert results == [-409] * 7 + [4]
        assert len(store.all_votes()) == 4
        # --pairs-per-rater 2: one more pair, then done although a third pair exists.
        b = next_pair(study, store, rater).assignment
        store.record(rater, b.token, answers, study.question_keys, (0, 1))
        done = next_pair(study, store, rater)
        assert done.assignment is None and (done.answered, done.total) == (2, 2)
    finally:
        store.close()


def test_cli_create_serve_report(two_runs, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The three commands as a user runs them: `study serve` in its own process answering on a loopback port."""
    import os
    import socket
    import subprocess
    import sys
    import time
    import urllib.request

    from mole.evaluate.study.store import safe_url

    out = runner.invoke(cli_app, ["study", "create", "--runs", str(two_runs[0]), "--runs", str(two_runs[1]),
                                  "--output", str(tmp_path / "study"), "--question", "overall",
                                  "--labels", "SD,MoLE"])  # fmt: skip
    assert out.exit_code == 0 and "2 models, 3 prompts, 3 pairs, questions overall" in out.output
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen([sys.executable, "-m", "mole", "study", "serve", str(tmp_path / "study"), "--port",
                             str(port)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as r:
                    assert r.status == 200
                    break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read().decode()
                time.sleep(0.2)
        request = urllib.request.Request(f"http://127.0.0.1:{port}/api/next", method="POST", data=b"{}")
        with urllib.request.urlopen(request, timeout=10) as r:
            body = json.loads(r.read())
            assert body["pair"]["prompt"] in PROMPTS and "mole_study_rater=" in r.headers["set-cookie"]
            assert "HttpOnly" in r.headers["set-cookie"] and "SameSite=strict" in r.headers["set-cookie"]
    finally:
        proc.terminate()
        proc.wait(30)
    out = runner.invoke(cli_app, ["study", "report", str(tmp_path / "study"), "--no-track"])
    assert out.exit_code == 0 and "| SD | MoLE | overall | 0 |" in out.output
    assert (tmp_path / "study" / "report" / "win_rates.png").is_file()
    out = runner.invoke(cli_app, ["study", "report", str(tmp_path / "nothing")])
    assert out.exit_code == 2 and "no study at" in out.output
    assert safe_url("postgresql+psycopg://u:s3cret@db/votes") == "postgresql+psycopg://u:***@db/votes"
    # A database that does not answer, a driver that is not installed: a clear error without the password.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    refused = f"postgresql://u:s3cret@127.0.0.1:{closed}/votes"
    no_driver = "mysql://u:s3cret@db/votes"
    for url, why in ((refused, "cannot open the votes database"), (no_driver, "database mysql://u:***@db/votes")):
        out = runner.invoke(cli_app, ["study", "report", str(tmp_path / "study"), "--database", url, "--no-track"])
        assert out.exit_code == 2 and why in out.output and "s3cret" not in out.output, out.output
    (tmp_path / "study" / "study.json").write_text('{"format": 1, "title": "x"}', encoding="utf-8")
    out = runner.invoke(cli_app, ["study", "serve", str(tmp_path / "study")])
    assert out.exit_code == 2 and "not a complete study" in out.output


def test_assignment_spreads_raters_over_the_pairs(two_runs, tmp_path: Path) -> None:
    """Raters who each rate one pair get the least-answered pair: three raters cover the three pairs, the
    fourth gets one of them again; every vote records which model the coin put on the left."""
    from mole.evaluate.study.assign import next_pair

    study = create_study(two_runs, tmp_path / "study", pairs_per_rater=1)
    store = VoteStore(database_url(None, study.root), study.study_id)
    try:
        got, sides = [], []
        for k in range(4):
            rater, _ = store.new_rater()
            a = next_pair(study, store, rater, random.Random(k)).assignment
            pair = study.pairs[a.pair_id]
            store.record(rater, a.token, dict.fromkeys(study.question_keys, "left"), study.question_keys,
                         (pair.a, pair.b))  # fmt: skip
            got.append(a.pair_id)
            sides.append(a.left_is_a)
        assert sorted(got[:3]) == [0, 1, 2] and got[3] in (0, 1, 2)
        # Left-model bookkeeping: a left vote is a win for whichever model the coin put on the left.
        for v, left_is_a in zip(store.all_votes()[::4], sides, strict=True):
            assert v["left_model"] == (0 if left_is_a else 1) and v["winner"] == v["left_model"]
    finally:
        store.close()
