#!/usr/bin/env bash
# Everything only a GPU can show, in one script for a lent GPU machine (no network there: it uses that
# machine's python3, which has torch, triton, transformers, peft, pytest-xdist and pytest-benchmark).
# Each stage writes its log and numbers, with the machine's facts, to OUT_DIR (default
# benchmarks/results/<gpu name>), the files to commit under benchmarks/results/:
#   env       env.txt: date, commit, GPU, driver, nvcc, python / torch / triton / transformers / peft
#   build     build.log: the extension mtp_kernels._C built in place for sm_90 with its CUDA part, and
#             checked to hold the CUDA kv_compact (the build itself falls back to CPU-only quietly)
#   gputests  gputests.log: the tests marked gpu (compiled kernels, lossless generate on the GPU)
#   targets   targets.json + targets.log: the op benchmarks that state a target, at the shapes issue 23
#             names (16 benchmarks, ~80 s on an H200), each figure printed as `target NAME: FIGURE = ...`
#   tests     tests.log: the whole test suite, on 8 workers
#   bench     benchmarks.json + bench.log: the whole grid, `pytest benchmarks --benchmark-only` (499
#             benchmarks: about 10 minutes on an H200, more than one device call leaves after the others)
#   eval      demo_eval_gpu.json / .png + eval.log: `mtp eval` of the shipped demo model on the GPU, 3
#             prompts per domain at 4 and 8 masks (the full sweep at 5 prompts outran 170 s there)
#   compile   compile_step_demo_gpu*.json + compile*.log: the compiled step against eager on the GPU
#             (inductor, then CUDA graphs)
#   all       every stage in this order: more than one 10-minute device call; on a fresh machine run
#             `env build gputests targets` in one call and `build eval compile tests` in the next
# Each stage runs under a time limit (STAGE_TIMEOUT seconds, default 300; the build BUILD_TIMEOUT, 240),
# so that one slow stage still leaves the others their turn inside one device call; at the limit a stage
# gets SIGINT first, so that pytest still prints what failed so far. A first Triton compile of each kernel
# variant costs seconds on a fresh machine: the gpu tests took over 4 minutes there (2026-12-04).
# The device tool sends at most 64 MiB of working tree, and data/ makes this repository larger: leave it out
# of the copy for the call (`git rm -r -q --cached data && echo /data/ >> .git/info/exclude`), and put it
# back afterwards (`git reset -q data`, then delete that line of .git/info/exclude).
# SmolLM2's adapter trained on the GPU is another script's job, two calls of its own: scripts/gpu_smollm2.sh.
# Usage: scripts/gpu_results.sh STAGE... [--out OUT_DIR]
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
LIMIT=${STAGE_TIMEOUT:-300}
export PYTHONUNBUFFERED=1
stages=()
out=""
while [ $# -gt 0 ]; do
  case "$1" in
    --out) out=$2; shift 2 ;;
    all) stages+=(env build gputests targets tests eval compile bench); shift ;;
    env|build|gputests|targets|tests|bench|eval|compile) stages+=("$1"); shift ;;
    *) echo "gpu_results: unknown stage '$1' (env, build, gputests, targets, tests, bench, eval, compile, all)" >&2
       exit 2 ;;
  esac
done
[ ${#stages[@]} -gt 0 ] || { echo "usage: scripts/gpu_results.sh STAGE... [--out OUT_DIR]" >&2; exit 2; }
if [ -z "$out" ]; then
  device=$("$PY" -c 'import torch; print(torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu")')
  out="benchmarks/results/$(echo "$device" | tr -c 'A-Za-z0-9\n' '-' | tr -s '-' | sed 's/-$//')"
fi
mkdir -p "$out"
status=0

run_stage() {  # name, log file, seconds, command...: runs under a limit, keeps the log, remembers a failure
  local name=$1 log=$2 seconds=$3
  shift 3
  echo "== $name: $*" | tee "$out/$log"
  local start=$SECONDS
  timeout --signal=INT --kill-after=15 "$seconds" "$@" >>"$out/$log" 2>&1
  local code=$?
  echo "== $name: exit $code after $((SECONDS - start)) s$( [ $code -eq 124 ] && echo " (time limit)")" | tee -a "$out/$log"
  grep -h "^target \|^FAILED\|^ERROR\| passed\| failed" "$out/$log" | cut -c1-200 | tail -n 40
  [ $code -eq 0 ] || status=1
}

for stage in "${stages[@]}"; do
  case "$stage" in
    env)
      {
        echo "date: $(date -u +%Y-%m-%dT%H:%MZ)"
        echo "commit: $(git rev-parse HEAD 2>/dev/null || echo unknown) (plus the working tree's changes, if any)"
        nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader 2>/dev/null \
          || echo "nvidia-smi: none"
        nvcc --version 2>/dev/null | tail -n 1 || echo "nvcc: none"
        "$PY" - <<'EOF'
import importlib, platform
print("python", platform.python_version())
for name in ("torch", "triton", "transformers", "peft", "pytest_benchmark", "xdist"):
    try:
        print(name, importlib.import_module(name).__version__)
    except Exception as error:
        print(name, "missing:", error)
import torch
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("cuda", torch.version.cuda, "| device", p.name, f"sm_{p.major}{p.minor}", p.multi_processor_count, "SMs",
          f"{p.total_memory / 2**30:.0f} GiB")
else:
    print("cuda: no device")
EOF
      } >"$out/env.txt" 2>&1
      cat "$out/env.txt" ;;
    build)
      TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16} \
        run_stage build build.log "${BUILD_TIMEOUT:-240}" "$PY" setup.py build_ext --inplace
      run_stage build-check build-check.log 60 "$PY" -c 'import torch, mtp_kernels
assert torch._C._dispatch_has_kernel_for_dispatch_key("mtp_kernels::kv_compact", "CUDA"), "_C has no CUDA kernel"
print("mtp_kernels._C: the CUDA kv_compact is registered")'
      cat "$out/build-check.log" >>"$out/build.log"; rm -f "$out/build-check.log" ;;
    gputests)
      run_stage gputests gputests.log "$LIMIT" "$PY" -m pytest tests -m gpu -q -p no:cacheprovider -rfE --tb=short \
        --durations=10 ;;
    targets)
      B=benchmarks
      run_stage targets targets.log "$LIMIT" "$PY" -m pytest -q -s -p no:cacheprovider -rfE --tb=line \
        --benchmark-only --benchmark-max-time 0.1 --benchmark-min-rounds 3 --benchmark-json "$out/targets.json" \
        "$B/bench_gated_lora.py::test_gated_lora[shape0-1-16]" "$B/bench_gated_lora.py::test_gated_lora[shape4-81-16]" \
        "$B/bench_gated_lora.py::test_gated_lora[shape6-648-16]" "$B/bench_gated_lora.py::test_gated_lora[shape24-81-16]" \
        "$B/bench_gated_lora.py::test_gated_lora[shape7-648-128]" \
        "$B/bench_tree_attention.py::test_tree_attention[1-2048-81]" \
        "$B/bench_tree_attention.py::test_tree_attention[1-32768-81]" \
        "$B/bench_tree_attention.py::test_tree_attention[8-2048-81]" \
        "$B/bench_tree_attention.py::test_tree_attention[1-32768-16]" \
        "$B/bench_kv_compact.py::test_kv_compact[1-4096-9]" "$B/bench_kv_compact.py::test_kv_compact[8-32768-9]" \
        "$B/bench_sampler.py::test_fused_greedy[128256-4096-8]" "$B/bench_sampler.py::test_fused_greedy[128256-4096-64]" \
        "$B/bench_sampler.py::test_fused_sampling[128256-4096-64]" \
        "$B/bench_generate.py::test_step_cost_ratio[1]" "$B/bench_generate.py::test_step_cost_ratio[8]" ;;
    tests)
      run_stage tests tests.log "$LIMIT" "$PY" -m pytest tests -q -p no:cacheprovider -rfE -n 8 ;;
    bench)
      run_stage bench bench.log "$LIMIT" "$PY" -m pytest benchmarks --benchmark-only -q -s -p no:cacheprovider -rfE \
        --tb=line --benchmark-max-time 0.1 --benchmark-min-rounds 3 --benchmark-json "$out/benchmarks.json" ;;
    eval)
      # A copy of the adapter: `mtp eval` only reads it, but nothing here should touch the shipped files.
      adapter=$(mktemp -d)
      cp -r mtp_model/demo_model/adapter/. "$adapter/"
      run_stage eval eval.log "$LIMIT" "$PY" -m mtp_model.cli eval --model mtp_model/demo_model --adapter "$adapter" \
        --device cuda --prompts mtp_model/demo_model/heldout.jsonl --per-domain 3 --masks 4,8 --repeats 1 \
        --out "$out/demo_eval_gpu.json"
      rm -rf "$adapter" ;;
    compile)
      run_stage compile compile.log "$LIMIT" "$PY" benchmarks/measure_compile_step.py --device cuda \
        --out "$out/compile_step_demo_gpu.json"
      run_stage compile-graphs compile-graphs.log "$LIMIT" "$PY" benchmarks/measure_compile_step.py --device cuda \
        --mode reduce-overhead --out "$out/compile_step_demo_gpu_cudagraphs.json" ;;
  esac
done
echo "gpu_results: wrote $out ($( [ $status -eq 0 ] && echo "every stage passed" || echo "a stage FAILED: see its log"))"
exit $status
