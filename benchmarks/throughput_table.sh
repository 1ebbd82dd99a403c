#!/usr/bin/env bash
# Every row of the throughput table in benchmarks/README.md, one run after the other (run it on
# an otherwise idle machine: each run measures its own matmul peak, but other processes distort
# the step times). Every training row times its recipe's step (throughput.py --recipe auto:
# drop path, layer scale, masked-patch count, norm-pix loss, clipping, Mixup / CutMix soft
# targets). Prints the markdown rows; the JSON lines go to $OUT (default
# ./throughput_table.jsonl). About 25 minutes on the 2-core development CPU.
#   ROWS="MAE-B pretrain|CAE-B pretrain" bash benchmarks/throughput_table.sh   # only these rows
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-throughput_table.jsonl}
ROWS=${ROWS:-}
: > "$OUT"
FAILED=()
run() {  # a row that gives no result is reported with its last error line; the others still run
  local label=$1; shift
  if [ -n "$ROWS" ] && ! printf '%s' "|$ROWS|" | grep -qF "|$label|"; then return 0; fi
  echo "== $label" >&2
  local err
  err=$(mktemp)
  if ! env "$@" --json 2>"$err" | tee -a /dev/stderr | grep '^{' \
      | sed "s/^{/{\"label\": \"$label\", /" >> "$OUT"; then
    echo "== $label: no result: $(grep -v '^[[:space:]]*$' "$err" | tail -n 1)" >&2
    FAILED+=("$label")
  fi
  rm -f "$err"
}
# EXTRA: more flags for every run (a smoke test: EXTRA="--input_size 32 --steps 1 --warmup 0 --peak_size 256")
EXTRA=${EXTRA:-}
PY=${PYTHON:-python}
T="$PY benchmarks/throughput.py --batch_size 8 --steps 5 --warmup 2 $EXTRA"
run "MAE-B pretrain"      $T --model mae_vit_base_patch16
run "MAE-B pretrain, 2 processes" $T --model mae_vit_base_patch16 --nproc 2
run "CAE-B pretrain"      $T --model cae_base_patch16_224_8k_vocab
run "CAE-B pretrain, no tokenizer" $T --model cae_base_patch16_224_8k_vocab --no_tokenizer
run "BootMAE-B pretrain"  $T --model bootmae_base
run "ViT-B finetune"      $T --model vit_base_patch16 --phase finetune
run "ViT-B finetune, reference ops" PADDLE_CAE_FUSED_OPS=0 $T --model vit_base_patch16 --phase finetune --explicit_attention
run "ViT-B finetune, MKL default code path" MKL_DEBUG_CPU_TYPE= $T --model vit_base_patch16 --phase finetune
run "ViT-B finetune, 2 processes" $T --model vit_base_patch16 --phase finetune --nproc 2
run "ViT-B linprobe"      $T --model vit_base_patch16 --phase linprobe
modes="dynamic fp32 bf16"
if ! $PY -c "import sys; from paddle_cae.inference.predictor import cpu_has_bf16; sys.exit(not cpu_has_bf16())"; then
  modes="dynamic fp32"  # the exported bf16 row needs avx512_bf16 or amx_bf16
  echo "== ViT-B infer bf16: skipped, this CPU has no native bf16 (avx512_bf16 / amx_bf16)" >&2
fi
for mode in $modes; do
  run "ViT-B infer $mode" $PY benchmarks/throughput.py --model vit_base_patch16 --phase infer \
      --infer_mode $mode --batch_size 8 --steps 5 --warmup 2 $EXTRA
done
$PY - "$OUT" <<'PY'
import json, sys
print("| run | img/s | step s (median) | peak RSS MB | model TFLOP / step | peak GFLOP/s | MFU | load |")
print("|---|---|---|---|---|---|---|---|")
for line in open(sys.argv[1]):
    r = json.loads(line)
    print(f"| {r['label']} | {r['images_per_s']:.2f} | {r['step_s_median']:.2f} | {r['peak_mem_mb']:.0f} "
          f"| {r['model_tflops_per_step']:.3f} | {r['peak_gflops']:.0f} | {100 * r['mfu']:.1f}% "
          f"| {r['loadavg_1min']} |")
PY
if [ ${#FAILED[@]} -gt 0 ]; then
  printf 'rows without a result: %s\n' "${FAILED[*]}" >&2
  exit 1
fi
