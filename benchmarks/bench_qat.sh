#!/bin/bash
# Seed 001's quantization-aware fine-tuning on the sonnets, at equal steps: a float full fine-tune, its int4
# post-training quantization (PTQ), and an int4 QAT run quantized the same way. Prints the validation loss of
# each (one evaluator: `pocketlm eval --data DIR --split val`), the share of the PTQ gap QAT recovers
# (goal >= 0.30), then chrF on the held-out sonnet prompts (greedy) for the three.
#   bash benchmarks/bench_qat.sh [OUT_DIR]      (minutes per run on a CPU; runs are skipped when done)
set -euo pipefail
PY=${PYTHON:-python}
D=${1:-runs/bench-qat}; mkdir -p "$D"
S=${POCKETLM_SHARED_DATA:-../shared/data}/sonnets
STEPS=${STEPS:-20}
BASE=${BASE:-smollm2-135m}
NEW_TOKENS=${NEW_TOKENS:-128}
[ -f "$D/data/manifest.json" ] || $PY -m pocketlm prepare "$S/sonnets.txt" --out "$D/data" --tokenizer "$BASE"
COMMON=(--base "$BASE" --data "$D/data" --method full --max-steps "$STEPS" --lr 1e-4 --warmup-steps 3
        --context 128 --micro-batch 8 --batch-tokens 1024 --eval-every 10 --eval-batches 8 --seed 1 --keep-checkpoints 1)
[ -f "$D/float/summary.json" ] || $PY -m pocketlm finetune "${COMMON[@]}" --out "$D/float"
[ -f "$D/qat/summary.json" ] || $PY -m pocketlm finetune "${COMMON[@]}" --qat int4 --out "$D/qat"
$PY -m pocketlm quantize "$D/float" --format int4 --out "$D/ptq-int4" --overwrite
$PY -m pocketlm quantize "$D/qat" --format int4 --out "$D/qat-int4" --overwrite
for m in float ptq-int4 qat-int4; do
  $PY -m pocketlm eval "$D/$m" --data "$D/data" --split val --json "$D/eval-$m.json" > /dev/null
done
$PY - "$D" <<'PY'
import json, sys
d = sys.argv[1]
L = {m: json.load(open(f"{d}/eval-{m}.json"))["loss"] for m in ("float", "ptq-int4", "qat-int4")}
print("validation loss:", {k: round(v, 4) for k, v in L.items()})
print(f"share of the int4 PTQ gap recovered by QAT: {(L['ptq-int4'] - L['qat-int4']) / (L['ptq-int4'] - L['float']):.2f} (goal >= 0.30)")
PY
for m in float ptq-int4 qat-int4; do
  $PY -m pocketlm eval "$D/$m" --sonnet-prompts "$S/sonnets_held_out_dev.txt" "$S/TRUE_sonnets_held_out_dev.txt" \
      --temperature 0 --max-new-tokens "$NEW_TOKENS" --json "$D/chrf-$m.json" > /dev/null
  $PY -c "import json; print('$m chrF', json.load(open('$D/chrf-$m.json')).get('chrf'))"
done
