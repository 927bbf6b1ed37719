#!/usr/bin/env bash
# Figure 7 a/b on the embedded default: do the learned global gates open the face expert more on face prompts
# and the hand expert more on hand prompts? Runs the three stages on the tiny model and synthetic data, then
# `mole evaluate gates`, and prints each expert's mean global gate on its own prompts and on the others'.
# docs/evaluation.md ("Gate specialisation") has the result.
#
#   scripts/gate_specialisation.sh [WORKDIR]        (default out/gate-spec; a few minutes on 2 CPU cores)
#
# The recipe differs from configs/tiny.yaml's smoke-test settings only in length and data, all through --set
# and --max-steps (the config itself is unchanged):
#   stage 1 on a mix of scenes and every close-up kind (the paper's stage 1 data holds the close-ups too), long
#   enough for the base to learn the kinds; experts longer; gates on a mix of the experts' close-ups. Latents
#   are cached, without random flips as when the published figures were measured, which makes a tiny step ~0.1 s.
# Through the environment:
#   CFG                           the recipe (default configs/tiny.yaml; configs/demo.yaml: the demo's batch sizes
#                                 and learning rates, what the README's figures were measured with)
#   STAGE1_STEPS, EXPERT_STEPS, GATE_STEPS, COUNT  lengths, and synthetic samples per kind
#   STAGE1_LR                     stage 1's learning rate (default 3e-4 with tiny.yaml, the config's otherwise)
#   EXPERTS="face hand feet"      the experts (default "face hand"); feet is the paper's footnote-4 third expert
#   CONDITIONS="none timestep"    train a gate set per gates.condition, same seed and data (default "none")
#   CLIP_PROMPTS=4                also score 4 fresh captions a kind x 3 repeats with the tiny CLIP for
#                                 stage 1, + experts and each gate set, and lay them side by side with their
#                                 gate plots (`mole evaluate compare --gate-plots`)
# Steps already done in WORKDIR (model, data, stage 1, experts, gates, tiny CLIP) are reused.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
MOLE="${MOLE:-$ROOT/.venv/bin/mole}"
PY="${PY:-$ROOT/.venv/bin/python}"
CFG="${CFG:-$ROOT/configs/tiny.yaml}"
WORK="${1:-out/gate-spec}"
STAGE1_STEPS="${STAGE1_STEPS:-1500}"
EXPERT_STEPS="${EXPERT_STEPS:-600}"
GATE_STEPS="${GATE_STEPS:-300}"
COUNT="${COUNT:-64}"
EXPERTS="${EXPERTS:-face hand}"
CONDITIONS="${CONDITIONS:-none}"
CLIP_PROMPTS="${CLIP_PROMPTS:-0}"
# Stage 1's learning rate: 3e-4 over tiny.yaml's (its smoke-test lr is too small for 1500 steps); any other CFG
# keeps its own (demo.yaml: AdamW 2e-3). STAGE1_LR=VALUE sets it, STAGE1_LR= keeps the config's.
if [ -z "${STAGE1_LR+set}" ]; then
  case "$CFG" in */tiny.yaml) STAGE1_LR=3e-4 ;; *) STAGE1_LR="" ;; esac
fi
export MOLE_TRACKING="${MOLE_TRACKING:-off}"

mkdir -p "$WORK"
cd "$WORK"
cached() { echo "--set $1.cache_latents=true --set $1.random_flip=false --set $1.checkpoint_every=100000 --set $1.log_every=100"; }
kind_of() { case "$1" in feet) echo feet ;; *) echo "$1s" ;; esac; }
KINDS=""
EXPERT_ARGS=""
for name in $EXPERTS; do
  KINDS="$KINDS $(kind_of "$name")"
  EXPERT_ARGS="$EXPERT_ARGS --experts $name=expert-$name"
done

[ -f model/model_index.json ] || "$MOLE" tiny init --output model
for kind in $KINDS scenes; do
  [ -f "data/$kind/dataset.json" ] || "$MOLE" tiny data --kind "$kind" --count "$COUNT" --output "data/$kind"
done
# Mixed datasets, the same synthetic samples interleaved kind by kind as one mole-shards dataset: mix-stage1
# (every close-up kind and scenes) and mix-gates (the experts' close-up kinds).
# shellcheck disable=SC2086
"$PY" - "$COUNT" $KINDS <<'PY'
import json
import sys
from pathlib import Path

from mole.data.shards import ShardWriter
from mole.data.synthetic import generate

count, kinds = int(sys.argv[1]), tuple(sys.argv[2:])
for name, mix in {"stage1": (*kinds, "scenes"), "gates": kinds}.items():
    label = "synthetic-" + "+".join(mix)
    done = Path("data") / f"mix-{name}" / "dataset.json"
    if done.exists() and json.loads(done.read_text(encoding="utf-8")).get("name") == label:
        continue
    draws = {k: generate(k, count, seed=0) for k in mix}
    with ShardWriter(f"data/mix-{name}", name=label, kind="mixed") as writer:
        for i in range(count):
            for k in mix:
                image, caption, meta = next(draws[k])
                writer.write(image, caption, meta, key=f"{k}-{i:06d}")
PY

# shellcheck disable=SC2046
[ -f stage1/model/model_index.json ] || "$MOLE" train stage1 --config "$CFG" --base model --data data/mix-stage1 \
  --output stage1 --max-steps "$STAGE1_STEPS" $(cached stage1) ${STAGE1_LR:+--set stage1.optimizer.lr=$STAGE1_LR} \
  --set 'stage1.validation_prompts=[]'
for name in $EXPERTS; do
  if ! ls "expert-$name"/*.safetensors > /dev/null 2>&1; then
    # shellcheck disable=SC2046
    "$MOLE" train expert --name "$name" --config "$CFG" --base stage1/model --data "data/$(kind_of "$name")" \
      --output "expert-$name" --max-steps "$EXPERT_STEPS" $(cached "experts.$name")
  fi
done
for condition in $CONDITIONS; do
  # Every condition from the same seed, data and experts: the runs differ only in the timestep projection.
  # shellcheck disable=SC2046,SC2086
  [ -f "gates-$condition/gates.safetensors" ] || "$MOLE" train gates --config "$CFG" --base stage1/model \
    $EXPERT_ARGS --condition "$condition" --data data/mix-gates --output "gates-$condition" \
    --max-steps "$GATE_STEPS" $(cached gates) --set gates.cache_text=true
  # shellcheck disable=SC2086
  "$MOLE" evaluate gates --model stage1/model $EXPERT_ARGS --gates "gates-$condition/gates.safetensors" \
    --output "gate-stats-$condition" --steps 20
done

# shellcheck disable=SC2086
"$PY" - $CONDITIONS <<'PY'
import json
import sys

for condition in sys.argv[1:]:
    stats = json.load(open(f"gate-stats-{condition}/gate_stats.json", encoding="utf-8"))
    mean, experts = stats["mean_global_by_group"], stats["experts"]
    print(f"gates.condition={condition}: mean global gate over 20 DDIM steps, per prompt group")
    for i, name in enumerate(experts):
        if name in mean:
            others = ", ".join(f"{g} {v[i]:.3f}" for g, v in mean.items() if g in experts and g != name)
            print(f"  {name} expert: own ({name}) {mean[name][i]:.3f}; others: {others}")
PY

if [ "$CLIP_PROMPTS" -gt 0 ]; then
  # Prompts: CLIP_PROMPTS fresh captions (seed 1, not the training draws) of every expert's kind.
  # shellcheck disable=SC2086
  "$PY" - "$CLIP_PROMPTS" $KINDS > prompts.txt <<'PY'
import sys

from mole.data.synthetic import generate

n = int(sys.argv[1])
for kind in sys.argv[2:]:
    for _, caption, _ in generate(kind, n, seed=1):
        print(caption)
PY
  [ -f clip/config.json ] || "$MOLE" tiny clip --output clip
  printf 'clip:\n  model: clip\n  device: cpu\n' > scorers.yaml
  total=$(wc -l < prompts.txt)
  evaluate() {  # LABEL OUTPUT [model arguments ...]
    local label="$1" out="$2"
    shift 2
    "$MOLE" evaluate run --model stage1/model "$@" --prompts prompts.txt --num-prompts "$total" --repeats 3 \
      --scorers clip --scorer-config scorers.yaml --seed 0 --steps 20 --label "$label" --output "$out"
  }
  evaluate "stage 1" eval-stage1
  # shellcheck disable=SC2086
  evaluate "+ experts (weight 1)" eval-experts $EXPERT_ARGS
  runs="eval-stage1 eval-experts"
  for condition in $CONDITIONS; do
    # shellcheck disable=SC2086
    evaluate "MoLE, condition $condition" "eval-$condition" $EXPERT_ARGS --gates "gates-$condition/gates.safetensors"
    runs="$runs eval-$condition"
  done
  # shellcheck disable=SC2086
  "$MOLE" evaluate compare $runs --output compare --gate-plots compare-plots --gate-steps 20
  cat compare.md compare-plots/gate_specialisation.md
fi
