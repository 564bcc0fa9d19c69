#!/usr/bin/env bash
# Everything only a GPU can show, in one script for a lent GPU machine (no network there: it uses that
# machine's python3, which has torch, triton, transformers, peft and pytest-benchmark). Each stage writes
# its log and numbers, with the machine's facts, to OUT_DIR (default benchmarks/results/<gpu name>), the
# files to commit under benchmarks/results/:
#   env      env.txt: date, commit, GPU, driver, python / torch / triton / transformers / peft versions
#   build    build.log: the extension mtp_kernels._C built in place with its CUDA part
#   tests    tests.log: the whole test suite, the GPU tests included (needs the build)
#   bench    benchmarks.json + bench.log: `pytest benchmarks --benchmark-only`
#   eval     demo_eval_gpu.json / .png + eval.log: `mtp eval` of the shipped demo model on the GPU
#   all      every stage in this order (longer than one 10-minute device call: run stages one by one there)
# Usage: scripts/gpu_results.sh STAGE... [--out OUT_DIR]
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
stages=()
out=""
while [ $# -gt 0 ]; do
  case "$1" in
    --out) out=$2; shift 2 ;;
    all) stages+=(env build tests bench eval); shift ;;
    env|build|tests|bench|eval) stages+=("$1"); shift ;;
    *) echo "gpu_results: unknown stage '$1' (env, build, tests, bench, eval, all)" >&2; exit 2 ;;
  esac
done
[ ${#stages[@]} -gt 0 ] || { echo "usage: scripts/gpu_results.sh STAGE... [--out OUT_DIR]" >&2; exit 2; }
if [ -z "$out" ]; then
  device=$("$PY" -c 'import torch; print(torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu")')
  out="benchmarks/results/$(echo "$device" | tr -c 'A-Za-z0-9\n' '-' | tr -s '-' | sed 's/-$//')"
fi
mkdir -p "$out"
status=0

run_stage() {  # name, log file, command...: runs, keeps the log, remembers a failure
  local name=$1 log=$2
  shift 2
  echo "== $name: $*" | tee "$out/$log"
  local start=$SECONDS
  "$@" >>"$out/$log" 2>&1
  local code=$?
  echo "== $name: exit $code after $((SECONDS - start)) s" | tee -a "$out/$log"
  tail -n 5 "$out/$log"
  [ $code -eq 0 ] || status=1
}

for stage in "${stages[@]}"; do
  case "$stage" in
    env)
      {
        echo "date: $(date -u +%Y-%m-%dT%H:%MZ)"
        echo "commit: $(git rev-parse HEAD 2>/dev/null || echo unknown)"
        nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || echo "nvidia-smi: none"
        "$PY" - <<'EOF'
import importlib, platform
print("python", platform.python_version())
for name in ("torch", "triton", "transformers", "peft", "pytest_benchmark"):
    try:
        print(name, importlib.import_module(name).__version__)
    except Exception as error:
        print(name, "missing:", error)
import torch
print("cuda", torch.version.cuda, "| device", torch.cuda.get_device_name() if torch.cuda.is_available() else "none")
EOF
      } >"$out/env.txt" 2>&1
      cat "$out/env.txt" ;;
    build)
      run_stage build build.log "$PY" setup.py build_ext --inplace ;;
    tests)
      run_stage tests tests.log "$PY" -m pytest tests -q -p no:cacheprovider ;;
    bench)
      run_stage bench bench.log "$PY" -m pytest benchmarks --benchmark-only -q -p no:cacheprovider \
        --benchmark-json "$out/benchmarks.json" ;;
    eval)
      # A copy of the adapter: `mtp eval` only reads it, but nothing here should touch the shipped files.
      adapter=$(mktemp -d)
      cp -r mtp_model/demo_model/adapter/. "$adapter/"
      run_stage eval eval.log "$PY" -m mtp_model.cli eval --model mtp_model/demo_model --adapter "$adapter" \
        --prompts mtp_model/demo_model/heldout.jsonl --per-domain 5 --out "$out/demo_eval_gpu.json"
      rm -rf "$adapter" ;;
  esac
done
echo "gpu_results: wrote $out ($( [ $status -eq 0 ] && echo "every stage passed" || echo "a stage FAILED: see its log"))"
exit $status
