#!/usr/bin/env bash
# Figure 7 a/b on the embedded default: do the learned global gates open the face expert more on face prompts
# and the hand expert more on hand prompts? Runs the three stages on the tiny model and synthetic data, then
# `mole evaluate gates`, and prints the four numbers. docs/evaluation.md ("Gate specialisation") has the result.
#
#   scripts/gate_specialisation.sh [WORKDIR]        (default out/gate-spec; a few minutes on 2 CPU cores)
#
# The recipe differs from configs/tiny.yaml's smoke-test settings only in length and data, all through --set
# and --max-steps (the config itself is unchanged):
#   stage 1 on a mix of scenes, faces and hands (the paper's stage 1 data holds the close-ups too), long enough
#   for the base to learn the kinds; experts longer; gates on a mix of faces and hands close-ups. Latents are
#   cached (cache_latents needs random_flip off), which makes a tiny step ~0.1 s.
# Step counts can be changed through the environment: STAGE1_STEPS, EXPERT_STEPS, GATE_STEPS, COUNT.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
MOLE="${MOLE:-$ROOT/.venv/bin/mole}"
PY="${PY:-$ROOT/.venv/bin/python}"
CFG="$ROOT/configs/tiny.yaml"
WORK="${1:-out/gate-spec}"
STAGE1_STEPS="${STAGE1_STEPS:-1500}"
EXPERT_STEPS="${EXPERT_STEPS:-600}"
GATE_STEPS="${GATE_STEPS:-300}"
COUNT="${COUNT:-64}"
export MOLE_TRACKING="${MOLE_TRACKING:-off}"

mkdir -p "$WORK"
cd "$WORK"
cached() { echo "--set $1.cache_latents=true --set $1.random_flip=false --set $1.checkpoint_every=100000 --set $1.log_every=100"; }

[ -f model/model_index.json ] || "$MOLE" tiny init --output model
for kind in faces hands scenes; do
  [ -f "data/$kind/dataset.json" ] || "$MOLE" tiny data --kind "$kind" --count "$COUNT" --output "data/$kind"
done
# Mixed datasets: the same synthetic samples, interleaved kind by kind, written as one mole-shards dataset.
"$PY" - "$COUNT" <<'EOF'
import sys
from pathlib import Path

from mole.data.shards import ShardWriter
from mole.data.synthetic import generate

count = int(sys.argv[1])
for name, kinds in {"mix3": ("faces", "hands", "scenes"), "mix2": ("faces", "hands")}.items():
    if (Path("data") / name / "dataset.json").exists():
        continue
    draws = {k: generate(k, count, seed=0) for k in kinds}
    with ShardWriter(f"data/{name}", name="synthetic-" + "+".join(kinds), kind="mixed") as writer:
        for i in range(count):
            for k in kinds:
                image, caption, meta = next(draws[k])
                writer.write(image, caption, meta, key=f"{k}-{i:06d}")
EOF

"$MOLE" train stage1 --config "$CFG" --base model --data data/mix3 --output stage1 --max-steps "$STAGE1_STEPS" \
  $(cached stage1) --set stage1.optimizer.lr=3e-4 --set 'stage1.validation_prompts=[]'
for name in face hand; do
  "$MOLE" train expert --name "$name" --config "$CFG" --base stage1/model --data "data/${name}s" \
    --output "expert-$name" --max-steps "$EXPERT_STEPS" $(cached "experts.$name")
done
"$MOLE" train gates --config "$CFG" --base stage1/model --experts face=expert-face --experts hand=expert-hand \
  --data data/mix2 --output gates --max-steps "$GATE_STEPS" $(cached gates) --set gates.cache_text=true
"$MOLE" evaluate gates --model stage1/model --experts face=expert-face --experts hand=expert-hand \
  --gates gates/gates.safetensors --output gate-stats --steps 20

"$PY" - <<'EOF'
import json

stats = json.load(open("gate-stats/gate_stats.json"))
mean = stats["mean_global_by_group"]
face, hand = stats["experts"].index("face"), stats["experts"].index("hand")
print("mean global gate (20 DDIM steps, 3 prompts a group)")
print(f"face expert: face prompts {mean['face'][face]:.3f}, hand prompts {mean['hand'][face]:.3f}")
print(f"hand expert: hand prompts {mean['hand'][hand]:.3f}, face prompts {mean['face'][hand]:.3f}")
EOF
