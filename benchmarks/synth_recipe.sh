#!/usr/bin/env bash
# The synthetic-data recipe of docs/synth.md, end to end, plus the distillation comparison; prints a summary.
#   bash benchmarks/synth_recipe.sh [WORKDIR]          (smollm2-135m: run it alone, e.g. under a lock)
# Sizes: MODEL (teacher, student base; default smollm2-135m), SAMPLES (160), NEW_TOKENS (64), STEPS (40),
# DIST_STEPS (30), PORT (8765). A tiny check: MODEL=path/to/tiny-model-folder SAMPLES=16 STEPS=2 DIST_STEPS=2.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
WORK=${1:-runs/synth-recipe}
MODEL=${MODEL:-smollm2-135m} SAMPLES=${SAMPLES:-160} NEW_TOKENS=${NEW_TOKENS:-64} STEPS=${STEPS:-40}
DIST_STEPS=${DIST_STEPS:-30} PORT=${PORT:-8765}
PY=${PYTHON:-$REPO/.venv/bin/python}
[ -x "$PY" ] || PY=python3
SHARED=${POCKETLM_SHARED_DATA:-$REPO/../shared/data}
PL=("$PY" -m pocketlm)
export PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH}
mkdir -p "$WORK" && cd "$WORK"

"$PY" - "$SHARED" <<'PY'
import json, random, sys
db = json.load(open(f"{sys.argv[1]}/greentext/wholesomegreentext_ocr_db.json"))
texts = [r["verified"].strip() for r in db.values() if r.get("verified")]
random.Random(0).shuffle(texts)
for name, part in (("train", texts[:244]), ("heldout", texts[244:])):
    open(f"greentext_{name}.jsonl", "w").write("".join(json.dumps({"text": t}) + "\n" for t in part))
open("greentext_heldout.txt", "w").write("\n\n".join(texts[244:]) + "\n")
open("template.yaml", "w").write('template: "{examples}\\n\\n"\nexamples:\n  corpus: greentext_train.jsonl\n'
                                 '  k: 2\n  max_chars: 400\n')
PY

"${PL[@]}" serve "$MODEL" --port "$PORT" > serve.log 2>&1 &
SERVE=$!
trap 'kill $SERVE 2>/dev/null || true' EXIT
for _ in $(seq 1 600); do curl -sf "http://127.0.0.1:$PORT/health" > /dev/null && break; sleep 1; done
"${PL[@]}" synth --teacher "http://127.0.0.1:$PORT" --prompts template.yaml --samples "$SAMPLES" --out synth.jsonl \
  --sample-prefix '>be me\n>' --max-new-tokens "$NEW_TOKENS" --temperature 0.8 --top-p 0.95 --validate greentext \
  --min-chars 60 --dedupe minhash --dedupe-against greentext_heldout.jsonl --concurrency 8 --quiet
kill $SERVE; wait $SERVE 2>/dev/null || true

# A finished stage is reused only while its inputs are unchanged: stamps/NAME holds the sha256 of what it was
# made from (the source file, the data set's manifest, the settings). Without this, a rerun after a new synth
# (or other SAMPLES/STEPS) reused the old data-mixed and run-mixed, and "real" and "real+synthetic" could be
# the same student.
mkdir -p stamps
key() { { cat "$@"; echo "$MODEL $STEPS $DIST_STEPS"; } | sha256sum | cut -c1-64; }
fresh() { local name=$1; shift; [ -e "$name" ] && [ "$(cat "stamps/$name" 2>/dev/null)" = "$(key "$@")" ]; }
stamp() { local name=$1; shift; key "$@" > "stamps/$name"; }

cat greentext_train.jsonl synth.jsonl > mixed.jsonl
for name in train mixed; do
  src=$( [ $name = train ] && echo greentext_train.jsonl || echo mixed.jsonl )
  fresh "data-$name" "$src" && continue
  rm -rf "data-$name"
  "${PL[@]}" prepare "$src" --text-field text --tokenizer "$MODEL" --out "data-$name" --val-documents 20 --no-progress
  stamp "data-$name" "$src"
done
# The mixed set must hold every real document plus every kept synthetic sample, or the comparison means nothing.
"$PY" - <<'PY'
import json, sys
docs = {n: sum(s["documents"] for s in json.load(open(f"data-{n}/manifest.json"))["splits"].values())
        for n in ("train", "mixed")}
kept = sum(1 for line in open("synth.jsonl") if json.loads(line).get("kept"))
if kept == 0:
    sys.exit("synth_recipe: no synthetic sample was kept, so the real+synthetic student would see the real data "
             "alone: raise SAMPLES or loosen the filters")
if docs["mixed"] != docs["train"] + kept:
    sys.exit(f"synth_recipe: data-mixed holds {docs['mixed']} documents, expected {docs['train']} real + {kept} "
             "synthetic: delete data-mixed and rerun")
PY
TRAIN=(--method lora --rank 8 --targets attn+mlp --lr 1e-3 --max-steps "$STEPS" --warmup-steps 2 --batch-tokens 2048
       --micro-batch 4 --context 256 --eval-every "$STEPS" --eval-batches 4)
for name in train mixed; do
  fresh "run-$name" "data-$name/manifest.json" && [ -f "run-$name/summary.json" ] && continue
  rm -rf "run-$name"
  "${PL[@]}" finetune --base "$MODEL" --data "data-$name" --out "run-$name" "${TRAIN[@]}"
  stamp "run-$name" "data-$name/manifest.json"
done
for src in "$MODEL" run-train run-mixed; do
  "${PL[@]}" eval "$src" --text greentext_heldout.txt --max-tokens 8000 --json "eval-$(basename "$src").json" > /dev/null
done
DIST=(--base "$MODEL" --data data-train --method lora --rank 8 --targets attn+mlp --lr 1e-3 --max-steps "$DIST_STEPS"
      --warmup-steps 2 --batch-tokens 2048 --micro-batch 4 --context 256 --eval-every "$DIST_STEPS" --eval-batches 4)
for name in plain distill; do
  fresh "run-$name" data-train/manifest.json && [ -f "run-$name/summary.json" ] && continue
  rm -rf "run-$name"
  if [ $name = plain ]; then "${PL[@]}" finetune "${DIST[@]}" --out run-plain
  else "${PL[@]}" finetune "${DIST[@]}" --out run-distill --teacher "$MODEL" --distill-alpha 0.5 --distill-temperature 2
  fi
  stamp "run-$name" data-train/manifest.json
done

"$PY" - "$MODEL" <<'PY'
import json, os, sys
r = json.load(open("synth.report.json"))
print(f"synth: {r['records']} samples, {r['kept']} kept ({r['kept_fraction']:.0%}), dropped {r['dropped']}, "
      f"{r['this_run']['samples_per_s']} samples/s")
split = {n: json.load(open(f"data-{n}/manifest.json"))["splits"] for n in ("train", "mixed")}
tokens = {n: sum(s["tokens"] for s in split[n].values()) for n in split}
print(f"mixed data: {sum(s['documents'] for s in split['mixed'].values())} documents, {tokens['mixed'] - tokens['train']:+,} "
      f"tokens against the real set's {tokens['train']:,} (each set holds out 20 of its own documents for validation)")
base = os.path.basename(sys.argv[1])
for name, label in ((base, "base"), ("run-train", "LoRA on real"), ("run-mixed", "LoRA on real+synthetic")):
    e = json.load(open(f"eval-{name}.json"))
    print(f"held-out greentext  {label:<24} loss {e['loss']:.4f}  ppl {e['perplexity']:.2f}")
for name in ("run-plain", "run-distill"):
    s = json.load(open(f"{name}/summary.json"))
    print(f"distillation  {name:<12} steps {s['steps']}  best val_loss {s['best_val_loss']:.4f}  "
          f"tokens/s {s['tokens_per_s']}")
PY
