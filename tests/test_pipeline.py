"""The Kubeflow pipeline: the committed compiled YAML, its DAG and placement, parameters, submission."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from mole.pipeline.run import compile_pipeline, parse_experts, parse_params, pipeline_parameters

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "pipelines" / "mole_pipeline.yaml"
GPU_TASKS = {"stage1", "expert-face", "expert-hand", "gates", "evaluate", "evaluate-stage1"}
ONE_GPU_TASKS = {"evaluate", "evaluate-stage1"}  # generation needs one GPU whatever training used
TRAINING_TASKS = {"stage1", "stage1-launch-trainjob", "expert-face", "expert-hand", "gates"}


@pytest.fixture(autouse=True)
def _default_image(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MOLE_IMAGE", raising=False)


def _load(path: Path) -> tuple[dict, dict]:
    docs = list(yaml.safe_load_all(path.read_text(encoding="utf-8")))
    return docs[0], docs[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]


def _tasks(spec: dict) -> dict[str, tuple[dict, str]]:
    """Every task of every DAG by display name: (task, the DAG component it sits in)."""
    out = {}
    dags = {"root": spec["root"], **spec["components"]}
    for dag_name, comp in dags.items():
        for name, task in comp.get("dag", {}).get("tasks", {}).items():
            out[task.get("taskInfo", {}).get("name", name)] = (task, dag_name)
    return out


def test_committed_yaml_is_current(tmp_path: Path) -> None:
    fresh = compile_pipeline(tmp_path / "p.yaml")
    assert fresh.read_text() == PACKAGE.read_text(), "pipelines/mole_pipeline.yaml is stale: run `make pipeline`"


def test_kfp_cli_compiles_it(tmp_path: Path) -> None:
    kfp = Path(sys.executable).parent / "kfp"
    out = tmp_path / "cli.yaml"
    subprocess.run([str(kfp), "dsl", "compile", "--py", "pipelines/mole_pipeline.py", "--function", "mole_pipeline",
                    "--output", str(out)], cwd=ROOT, check=True, capture_output=True)  # fmt: skip

    # The same pipeline; only kfp's header comment may order dict defaults differently (by hash seed).
    def body(text: str) -> list[str]:
        return [line for line in text.splitlines() if not line.startswith("#")]

    assert body(out.read_text()) == body(PACKAGE.read_text())


def test_experts_run_in_parallel_after_stage1() -> None:
    spec, _ = _load(PACKAGE)
    tasks = _tasks(spec)
    exit_dag = spec["components"]["comp-exit-handler-1"]["dag"]["tasks"]
    key_of = {t.get("taskInfo", {}).get("name"): k for k, t in exit_dag.items()}
    stage1_group = next(k for k, t in exit_dag.items() if k.startswith("condition-branches"))
    for expert in ("expert-face", "expert-hand"):
        deps = set(tasks[expert][0].get("dependentTasks", []))
        assert stage1_group in deps, f"{expert} must wait for stage 1"
        assert not deps & {key_of["expert-face"], key_of["expert-hand"]}, f"{expert} depends on another expert"
        assert deps <= {stage1_group, key_of["start"], *(k for k in exit_dag if k.startswith("data-op"))}
    gates_deps = set(tasks["gates"][0]["dependentTasks"])
    assert {key_of["expert-face"], key_of["expert-hand"]} <= gates_deps
    assert key_of["gates"] in tasks["evaluate"][0]["dependentTasks"]
    assert key_of["evaluate"] in tasks["promote"][0]["dependentTasks"]
    # The stage-1 baseline is scored beside the experts (after stage 1 only) and before promotion reads it.
    baseline_deps = set(tasks["evaluate-stage1"][0]["dependentTasks"])
    assert stage1_group in baseline_deps and not baseline_deps & {key_of["expert-face"], key_of["gates"]}
    assert key_of["evaluate-stage1"] in tasks["promote"][0]["dependentTasks"]
    assert "baseline" in tasks["promote"][0]["inputs"]["parameters"]
    # The exit handler: finish runs whatever happens and gets the final status.
    finish = spec["root"]["dag"]["tasks"]["finish-op"]
    assert finish["triggerPolicy"]["strategy"] == "ALL_UPSTREAM_TASKS_COMPLETED"
    assert "status" in finish["inputs"]["parameters"]


def test_gpu_steps_are_placed_on_the_a100_pool() -> None:
    spec, executors = _load(PACKAGE)
    tasks = _tasks(spec)
    params = spec["root"]["inputDefinitions"]["parameters"]
    assert params["node_selector"]["defaultValue"] == {"nvidia.com/gpu.product": "NVIDIA-A100-SXM4-80GB"}
    assert params["tolerations"]["defaultValue"][0]["key"] == "nvidia.com/gpu"
    for name in GPU_TASKS:
        task, _ = tasks[name]
        executor = spec["components"][task["componentRef"]["name"]]["executorLabel"]
        container = spec["deploymentSpec"]["executors"][executor]["container"]
        accel = container["resources"]["accelerator"]
        assert accel["resourceType"] == "nvidia.com/gpu", name
        if name in ONE_GPU_TASKS:
            assert accel["resourceCount"] == "1", name
        else:
            assert "gpus" in accel["resourceCount"], name  # the `gpus` pipeline parameter
        k8s = executors[executor]
        assert "node_selector" in k8s["nodeSelector"]["nodeSelectorJson"]["componentInputParameter"], name
        assert "tolerations" in k8s["tolerations"][0]["tolerationJson"]["componentInputParameter"], name
        shm = k8s["emptyDirMounts"][0]
        assert shm["mountPath"] == "/dev/shm" and shm["medium"] == "Memory", name
        assert "image" in container["image"], name  # re-pointed at the `image` parameter
    # The multi-node launcher pod only follows the TrainJob: no GPU of its own.
    task, _ = tasks["stage1-launch-trainjob"]
    executor = spec["components"][task["componentRef"]["name"]]["executorLabel"]
    assert "accelerator" not in spec["deploymentSpec"]["executors"][executor]["container"].get("resources", {})


def test_secrets_are_referenced_never_inlined() -> None:
    spec, executors = _load(PACKAGE)
    text = PACKAGE.read_text()
    for executor, k8s in executors.items():
        names = {s["secretNameParameter"]["componentInputParameter"] for s in k8s["secretAsEnv"]}
        assert any("s3_secret" in n for n in names) and any("mlflow_secret" in n for n in names), executor
        # Required: the MLflow user and the tracking URI (no silent fall-back to a pod-local store). Optional:
        # the S3 keys (a workload identity may stand in) and the S3 endpoints.
        optional = {s["secretNameParameter"]["componentInputParameter"]: s.get("optional", False)
                    for s in k8s["secretAsEnv"]}  # fmt: skip
        assert {("s3" in n, o) for n, o in optional.items()} == {(True, True), (False, False)}, executor
        maps = {e["envVar"]: c.get("optional", False) for c in k8s["configMapAsEnv"] for e in c["keyToEnv"]}
        assert maps == {"MLFLOW_TRACKING_URI": False, "MLFLOW_S3_ENDPOINT_URL": True, "AWS_ENDPOINT_URL_S3": True}
        envs = {e["envVar"] for s in k8s["secretAsEnv"] for e in s["keyToEnv"]}
        assert {"AWS_SECRET_ACCESS_KEY", "MLFLOW_TRACKING_PASSWORD"} <= envs
        assert k8s["pvcMount"][0]["mountPath"] == "/workspace"
    for executor in spec["deploymentSpec"]["executors"].values():
        for env in executor["container"].get("env", []):
            assert not any(w in env["name"] for w in ("SECRET", "PASSWORD", "TOKEN")), env
    assert "AKIA" not in text and "password:" not in text.lower()


def test_caching_and_retries() -> None:
    spec, _ = _load(PACKAGE)
    tasks = _tasks(spec)
    for name in ("stage1", "stage1-launch-trainjob", "expert-face", "expert-hand", "gates", "evaluate",
                 "evaluate-stage1", "promote", "start"):  # fmt: skip
        assert tasks[name][0]["cachingOptions"].get("enableCache") is not True, f"{name} must not be cached"
    for name in ("data-scenes", "data-faces", "data-hands"):
        task = tasks[name][0]
        assert task["cachingOptions"]["enableCache"] is True
        # The cache key is the task's inputs: nothing that differs from run to run may be among them.
        inputs = task["inputs"]["parameters"]
        assert not {"workdir", "parent_run_id", "job_id"} & set(inputs), name
        assert not any("taskOutputParameter" in v for v in inputs.values()), name
        assert not any("PIPELINE_JOB" in json.dumps(v) or "pipelinejob" in json.dumps(v).lower()
                       for v in inputs.values()), name  # fmt: skip
    for name in ("data-scenes", "evaluate", "evaluate-stage1", "promote", "start", "finish", *TRAINING_TASKS):
        assert tasks[name][0]["retryPolicy"]["maxRetryCount"] == 3, name


def test_one_parallel_expert_task_per_listed_expert(tmp_path: Path) -> None:
    experts = parse_experts(["face=faces", "hand", "feet"])
    assert experts == {"face": "faces", "hand": "hands", "feet": "feet"}
    spec, _ = _load(compile_pipeline(tmp_path / "three.yaml", experts))
    tasks = _tasks(spec)
    names = {f"expert-{n}" for n in experts}
    assert names <= set(tasks)
    for name in names:
        deps = tasks[name][0]["dependentTasks"]
        assert not any(d.startswith("expert-op") for d in deps)
    assert len([d for d in tasks["gates"][0]["dependentTasks"] if d.startswith("expert-op")]) == 3
    assert "data-feet" in tasks


def test_parameters_are_typed() -> None:
    declared = pipeline_parameters(PACKAGE)
    # `kfp run create` decodes JSON parameter values: structured parameters must be dicts / lists, not JSON text.
    for name in ("scorer_config", "raw_inputs", "node_selector", "step_timeouts"):
        assert declared[name]["parameterType"] == "STRUCT", name
    assert declared["tolerations"]["parameterType"] == "LIST"
    assert declared["step_timeouts"]["defaultValue"]["stage1"] > 0
    params = parse_params(["stage1_max_steps=5", 'node_selector={"pool": "a100"}', "gate=local",
                           'tolerations=[{"key": "k", "operator": "Exists"}]'], declared)  # fmt: skip
    assert params == {"stage1_max_steps": 5, "node_selector": {"pool": "a100"}, "gate": "local",
                      "tolerations": [{"key": "k", "operator": "Exists"}]}  # fmt: skip
    with pytest.raises(ValueError, match="unknown pipeline parameter 'stage_1_steps'"):
        parse_params(["stage_1_steps=5"], declared)
    with pytest.raises(ValueError, match="stage1_max_steps='five'"):
        parse_params(["stage1_max_steps=five"], declared)
    with pytest.raises(ValueError, match="expected a JSON object"):
        parse_params(["node_selector=[1]"], declared)
    with pytest.raises(ValueError, match="must look like KEY=VALUE"):
        parse_params(["gate"], declared)


def test_submit_goes_through_the_kfp_client(monkeypatch: pytest.MonkeyPatch) -> None:
    import kfp

    calls = {}

    class FakeClient:
        def __init__(self, **kw) -> None:
            calls["init"] = kw

        def create_run_from_pipeline_package(self, package, **kw):
            calls["run"] = (package, kw)
            return type("R", (), {"run_id": "run-123"})()

    monkeypatch.setattr(kfp, "Client", FakeClient)
    monkeypatch.setenv("KFP_TOKEN", "tok-secret-value")
    from typer.testing import CliRunner

    from mole.cli import app

    result = CliRunner().invoke(app, ["pipeline", "submit", "--host", "http://kfp.example:8888", "--package",
                                      str(PACKAGE), "--experiment", "exp", "stage1_nodes=4",
                                      "stage1_launcher=trainjob"])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "run-123" in result.output and "tok-secret-value" not in result.output
    assert calls["init"]["host"] == "http://kfp.example:8888" and calls["init"]["existing_token"] == "tok-secret-value"
    package, kw = calls["run"]
    assert package == str(PACKAGE) and kw["experiment_name"] == "exp"
    assert kw["arguments"] == {"stage1_nodes": 4, "stage1_launcher": "trainjob"}
    bad = CliRunner().invoke(app, ["pipeline", "submit", "--host", "http://x", "--package", str(PACKAGE), "nope=1"])
    assert bad.exit_code == 2 and "unknown pipeline parameter 'nope'" in bad.output


def test_stage1_and_gates_train_on_every_data_step() -> None:
    """The paper's human-centric dataset: scenes, faces and hands together (`mole train --data` splits on ';')."""
    spec, _ = _load(PACKAGE)
    tasks = _tasks(spec)
    data_outputs = {f"pipelinechannel--{k}-Output" for k in ("data-op", "data-op-2", "data-op-3")}
    for name in ("stage1", "stage1-launch-trainjob", "gates"):
        data = tasks[name][0]["inputs"]["parameters"]["data"]["runtimeValue"]["constant"]
        entries = dict(e.split("=", 1) for e in data.split(";"))
        assert list(entries) == ["scenes", "faces", "hands"], data
        assert {v.split("'")[1] for v in entries.values()} == data_outputs
    expert = tasks["expert-face"][0]["inputs"]["parameters"]["data"]
    assert "componentInputParameter" in expert or "taskOutputParameter" in expert  # experts: their own kind only


def test_components_can_pin_the_image_by_digest(tmp_path: Path) -> None:
    from mole.pipeline.components.constants import image_reference

    digest = "sha256:" + "0f" * 32
    assert image_reference({"MOLE_IMAGE_DIGEST": digest}) == f"ghcr.io/mole-project/mole@{digest}"
    assert image_reference({}).startswith("ghcr.io/mole-project/mole:")
    with pytest.raises(ValueError, match="MOLE_IMAGE_DIGEST"):
        image_reference({"MOLE_IMAGE_DIGEST": "latest"})
    # Compiled with the digest: every step and the `image` parameter's default carry it.
    env = {**os.environ, "MOLE_IMAGE_DIGEST": digest}
    env.pop("MOLE_IMAGE", None)
    out = tmp_path / "pinned.yaml"
    subprocess.run([sys.executable, "-m", "mole", "pipeline", "compile", "--output", str(out)], cwd=ROOT, env=env,
                   check=True, capture_output=True)  # fmt: skip
    spec, _ = _load(out)
    assert (
        spec["root"]["inputDefinitions"]["parameters"]["image"]["defaultValue"]
        == f"ghcr.io/mole-project/mole@{digest}"
    )
    images = {e["container"]["image"] for e in spec["deploymentSpec"]["executors"].values()}
    assert all(digest in i or "image" in i for i in images), images


def test_the_gates_step_hands_back_each_result_under_its_own_name() -> None:
    """`model` (the registered version, "" with tracking off) goes to evaluation and promotion, `gates` (the gates
    file) to evaluation only: no output means a URI under one setting and a file under another."""
    spec, _ = _load(PACKAGE)
    tasks = _tasks(spec)
    gates_comp = spec["components"][tasks["gates"][0]["componentRef"]["name"]]
    assert set(gates_comp["outputDefinitions"]["parameters"]) == {"model", "gates"}
    evaluate = tasks["evaluate"][0]["inputs"]["parameters"]
    assert evaluate["model"]["taskOutputParameter"]["outputParameterKey"] == "model"
    assert evaluate["gates"]["taskOutputParameter"]["outputParameterKey"] == "gates"
    promote = tasks["promote"][0]["inputs"]["parameters"]
    assert promote["model"]["taskOutputParameter"]["outputParameterKey"] == "model"


def test_the_pipeline_is_an_importable_part_of_the_package(tmp_path: Path) -> None:
    """Compiled from a folder that is not the checkout, with no MOLE_HOME: no sys.path edit, no file loading."""
    env = {k: v for k, v in os.environ.items() if k not in ("MOLE_HOME", "MOLE_IMAGE")}
    env["PYTHONPATH"] = str(ROOT / "src")  # the package alone: neither components/ nor pipelines/ on the path
    out = tmp_path / "elsewhere.yaml"
    code = (
        "import sys; from mole.pipeline import dsl, components; from mole.pipeline.run import compile_pipeline; "
        f"compile_pipeline({str(out)!r}); "
        "assert not any(p.endswith(('components', 'pipelines')) for p in sys.path), sys.path"
    )
    subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, check=True, capture_output=True)
    assert out.read_text() == PACKAGE.read_text()


def test_config_presets_resolve_from_any_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`configs/paper.yaml` (the pipeline's default `config`) names the preset the package ships."""
    from mole.pipeline import steps
    from mole.presets import available, resolve
    from mole.train import load_config

    monkeypatch.delenv("MOLE_HOME", raising=False)
    monkeypatch.chdir(tmp_path)
    assert {"configs/paper.yaml", "configs/tiny.yaml", "configs/curate.yaml", "configs/accelerate/zero2.yaml"} <= set(
        available()
    )
    assert resolve("configs/tiny.yaml").read_text() == (ROOT / "configs" / "tiny.yaml").read_text()
    assert load_config("configs/paper.yaml").model.base  # the recipe, validated
    args = steps.mole_train_args("stage1", "configs/paper.yaml", "d", "", tmp_path / "o")
    assert Path(args[args.index("--config") + 1]).is_absolute()  # a multi-node pod runs elsewhere
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "tiny.yaml").write_text("seed: 7\n")
    assert resolve("configs/tiny.yaml") == Path("configs/tiny.yaml")  # a local file wins over the preset
    with pytest.raises(FileNotFoundError, match=r"shipped presets.*configs/paper\.yaml"):
        resolve("configs/nope.yaml")
    with pytest.raises(FileNotFoundError):
        resolve("configs/../pyproject.toml")


def test_both_evaluations_compile_the_unet_when_asked(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """`eval_compile` (default off) reaches both evaluation tasks, and the step hands it to the evaluation."""
    spec, _ = _load(PACKAGE)
    assert spec["root"]["inputDefinitions"]["parameters"]["eval_compile"]["defaultValue"] is False
    tasks = _tasks(spec)
    for name in ("evaluate", "evaluate-stage1"):
        arg = tasks[name][0]["inputs"]["parameters"]["compile_unet"]
        assert arg["componentInputParameter"].endswith("eval_compile"), (name, arg)

    from mole.evaluate import runner
    from mole.pipeline import steps

    seen = {}

    def fake_evaluate(settings, output):
        seen["settings"] = settings
        return {"label": settings.label, "num_prompts": 1, "repeats": 1, "scores": {}}

    monkeypatch.setattr(runner, "evaluate_tracked", fake_evaluate)
    monkeypatch.setenv("MOLE_TRACKING", "off")
    steps.evaluate("", "BASE", [], "", "prompts.txt", str(tmp_path), scorers="clip", scorer_config={},
                   num_prompts=1, repeats=1, steps=2, compile_unet=True)  # fmt: skip
    assert seen["settings"].compile_unet is True
