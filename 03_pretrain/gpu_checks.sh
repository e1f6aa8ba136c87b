#!/usr/bin/env bash
# The GPU checks of 03_pretrain in one script, for any machine with a GPU (about 7 minutes on an H200,
# most of it compiling). In order of importance, each step's output saved as soon as it is made:
#   1. bench_train.py: whole training steps, baseline vs PRESENCE, at the small preset's shape (8 x 64)
#      and with two large microbatches (2 x 64): tokens/s, model TFLOP/s, MFU (against a bf16 matmul
#      measured on the card in the same run), PRESENCE / baseline.
#   2. pretrain.py, baseline and PRESENCE, a few dozen steps on the real packed small-preset data: the
#      training loop itself on the GPU (bf16, compiled, held-out loss, checkpoint, TFLOP/s and MFU).
#   3. bench_si.py at 8 x 32: the SI engine (per microbatch, per sample, the naive per-sample loop).
#   4. bench_optimizer.py: HF's Adafactor, ours (common/adafactor.py) and fused AdamW, per step.
#
# The GPU machine needs no corpus: prepare the small preset's packed data and tokenizer anywhere with
#   make gpu-bundle        (writes gpu_bundle/, ~47 MB, git-ignored)
# copy the repository with gpu_bundle/ to the GPU machine and run there
#   bash 03_pretrain/gpu_checks.sh
# Outputs go to $OUT (default results/<preset>/gpu): log.txt, train_throughput.csv, the two runs' metrics
# and train logs, si_overhead.csv, optimizer.csv.
# Knobs for a CPU smoke test (tests/test_gpu_checks.py): PRESET, DEVICE, SHAPES, STEPS, REPEATS, SI_BATCH, SETS,
# PYTHON.
set -euo pipefail

PRESET=${PRESET:-small}
DEVICE=${DEVICE:-cuda}
SHAPES=${SHAPES:-8x64 2x64}
STEPS=${STEPS:-30}
REPEATS=${REPEATS:-10}       # timed rounds of the benchmarks (median)
SI_BATCH=${SI_BATCH:-256}    # sequences per step of bench_si (8 x 32); SETS must not set pretrain.batch_size too
SETS=${SETS:-}              # extra preset overrides, e.g. "--set model.d_model=64"
PY=${PYTHON:-python3}
OUT=${OUT:-results/$PRESET/gpu}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TQDM_MININTERVAL=30
export PRESENCE_ARTEFACTS=${PRESENCE_ARTEFACTS:-$PWD/gpu_bundle/artefacts}
LOG="$OUT/log.txt"
RUNS=$(mktemp -d)           # run folders stay here; only their metrics and logs are copied to $OUT

# A copy of the tree without .git cannot say which code ran: pass COMMIT=<hash> to record it.
{ date -u
  echo "commit: ${COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}"
  nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,power.draw,temperature.gpu --format=csv || true
  "$PY" -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
} 2>&1 | tee "$LOG"

echo "== 1. bench_train ($SHAPES)" | tee -a "$LOG"
# shellcheck disable=SC2086  # SHAPES and SETS are word lists
"$PY" 03_pretrain/bench_train.py --preset "$PRESET" --device "$DEVICE" --shapes $SHAPES --repeats "$REPEATS" $SETS \
  --out "$OUT/train_throughput.csv" 2>&1 | tee -a "$LOG"

for method in baseline presence; do
  echo "== 2. pretrain $method ($STEPS steps)" | tee -a "$LOG"
  # shellcheck disable=SC2086
  "$PY" 03_pretrain/pretrain.py --preset "$PRESET" --method "$method" --steps "$STEPS" \
    --switch-step $((STEPS / 2)) --run-name "gpu-check-$method" --out "$RUNS/$method" --overwrite $SETS \
    --set pretrain.eval_every=$((STEPS / 2)) --set pretrain.save_every="$STEPS" 2>&1 | tee -a "$LOG"
  cp "$RUNS/$method/metrics.json" "$OUT/pretrain_${method}_metrics.json"
  cp "$RUNS/$method/train_log.csv" "$OUT/pretrain_${method}_train_log.csv"
done

echo "== 3. bench_si (batch $SI_BATCH)" | tee -a "$LOG"
compile_flag=$([ "$DEVICE" = cuda ] && echo --compile || true)
# At 8 x 32 the naive loop's per-sample gradients (256 x 77M floats, 79 GB) fit on the H200; at the
# preset's 512 they would not (bench_si.py then skips the naive loop and says so).
# shellcheck disable=SC2086
"$PY" 03_pretrain/bench_si.py --preset "$PRESET" --device "$DEVICE" $compile_flag --repeats "$REPEATS" \
  --naive-repeats 1 --warmup 1 --set pretrain.batch_size="$SI_BATCH" $SETS --out "$OUT/si_overhead.csv" 2>&1 \
  | tee -a "$LOG"
echo "== 4. bench_optimizer" | tee -a "$LOG"
# shellcheck disable=SC2086
"$PY" 03_pretrain/bench_optimizer.py --preset "$PRESET" --device "$DEVICE" --repeats "$REPEATS" $SETS \
  --out "$OUT/optimizer.csv" 2>&1 | tee -a "$LOG"
echo "== summary" | tee -a "$LOG"
"$PY" - "$OUT" <<'SUMMARY' 2>&1 | tee -a "$LOG"
import csv, json, pathlib, sys
out = pathlib.Path(sys.argv[1])
def show(name, columns):
    for row in csv.DictReader(open(out / name)):
        print(name, " ".join(f"{c}={row[c]}" for c in columns))
show("train_throughput.csv", ["shape", "method", "step_ms", "ratio_to_baseline", "tokens_per_s", "model_tflops", "mfu",
                              "matmul_ceiling_tflops"])
for method in ("baseline", "presence"):
    m = json.loads((out / f"pretrain_{method}_metrics.json").read_text())
    print(f"pretrain {method}:", {k: m.get(k) for k in ("seconds_per_step", "tokens_per_second", "model_tflops", "mfu",
                                                     "peak_memory_gb", "final_heldout_loss")})
show("si_overhead.csv", ["method", "step_ms", "ratio_to_baseline", "peak_mem_mb"])
show("optimizer.csv", ["optimizer", "step_ms", "ratio_to_hf_adafactor", "ops_per_step"])
SUMMARY
echo "== done" | tee -a "$LOG"
