#!/usr/bin/env bash
# SmolLM2-135M-Instruct's adapter trained on a lent GPU machine (issue 20: the CPU's hours of training are
# what limits the shipped adapter), in two device calls, because the model cannot travel in one: the
# device tool sends at most 64 MiB (working tree plus carried paths) and the model's GGUF file alone is
# 98 MB. Here the GGUF is cut in two halves, each carried by one call; the machine keeps the first half
# while it stays warm (30 s after a call on an H200), so the second call must follow the first at once.
#
#   here    scripts/gpu_smollm2.sh pack      .smollm2-gpu/part1 and part2 (the GGUF halves, the gguf wheel for
#                                            the device's Python 3.12, the training prompts, the replies
#                                            distilled so far and the public evaluation prompts); leaves
#                                            data/ and the shipped SmolLM2 adapter out of the copy (git's
#                                            index and .git/info/exclude) so that the tree is ~13 MB
#   device  scripts/gpu_smollm2.sh stash     call 1, carry [".smollm2-gpu/part1"]: keeps the first half in
#                                            /tmp (seconds; the same call may go on with other GPU work,
#                                            e.g. `... stash && scripts/gpu_results.sh env build gputests`)
#   device  scripts/gpu_smollm2.sh run       call 2, carry [".smollm2-gpu/part2"]: joins and converts the
#                                            model, distills more replies, trains (constant rate, then an
#                                            anneal), drafts on the public prompts (8 masks, quadratic:
#                                            the figure issue 20 targets); writes to OUT_DIR
#                                            (default $OUT): run.log, adapter_config.json,
#                                            adapter_model.safetensors.part00/01 (the device returns files
#                                            of at most 16 MiB: `cat` them back together), the evaluation's
#                                            JSON and chart, distilled.jsonl.gz (every reply, old and new)
#   here    scripts/gpu_smollm2.sh restore   puts data/ and the adapter back into git's index
#
# Tried out on the CPU with DEVICE=cpu and a fraction of a minute for each stage.
# Minutes of call 2 (the device command's limit is 10): DISTILL_MINUTES (default 1.5), TRAIN_MINUTES (3),
# ANNEAL_MINUTES (1), EVAL_MINUTES (2), plus about a minute to convert the model; BATCH (16 sequences of
# up to 448 tokens). The full evaluation (every mask count and mode, prompt lookup, the wall clock) is for
# the CPU afterwards: on the GPU each op call is host-bound (benchmarks/results/README.md), so a step of
# this small model costs tens of milliseconds and the sweep would not fit. The training options are the recipe's (`mtp_model/recipes.py`, _SMOLLM2_TRAIN) but for
# the batch and the residual sampler from the start. The run ends each stage at its limit and goes on.
# Back here: join the parts, evaluate the adapter with the command of benchmarks/results/README.md
# (tokens per step do not depend on the machine, the wall clock does) and ship it if it drafts more.
set -euo pipefail
cd "$(dirname "$0")/.."
PACK=.smollm2-gpu
NAME=smollm2-135m-instruct
ADAPTER_DIR=mtp_model/adapters/$NAME
WORK=/tmp/smollm2-gpu

exclude() {  # path: left out of the copy the device tool sends (and out of `git status`)
  grep -qxF "/$1/" .git/info/exclude 2>/dev/null || echo "/$1/" >>.git/info/exclude
}

include() {  # path: back into git's index, no longer excluded
  sed -i "\|^/$1/\$|d" .git/info/exclude
  git reset -q -- "$1"
}

minutes_to_seconds() { python3 -c "import sys; print(int(float(sys.argv[1]) * 60))" "$1"; }

case "${1:-}" in
  pack)
    PY=${PYTHON:-.venv/bin/python}
    rm -rf "$PACK" && mkdir -p "$PACK/part1" "$PACK/part2"
    exclude "$PACK"
    gguf=$("$PY" -c "from mtp_model.checkpoints import known_gguf; print(known_gguf('$NAME'))")
    half=$(( ($(stat -c %s "$gguf") + 1) / 2 ))
    head -c "$half" "$gguf" >"$PACK/part1/model.gguf.0"
    tail -c +"$((half + 1))" "$gguf" >"$PACK/part2/model.gguf.1"
    sha256sum "$gguf" | cut -d' ' -f1 >"$PACK/part2/model.gguf.sha256"
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      -d "$PACK/part2" "gguf==$("$PY" -c 'from importlib.metadata import version; print(version("gguf"))')"
    # Every training prompt of the recipe's kind (ShareGPT training split, chat-rendered within the recipe's
    # prompt length), in the recipe's order: the recipe's own lists are its prefixes.
    "$PY" - "$PACK/part1" <<'EOF'
import dataclasses, gzip, json, sys
from pathlib import Path
from transformers import AutoTokenizer
from mtp_model.checkpoints import cache_root, model_directory
from mtp_model.prompts import evaluation_sets
from mtp_model.recipes import RECIPES, training_prompts

name, out = "smollm2-135m-instruct", Path(sys.argv[1])
recipe = dataclasses.replace(RECIPES[name], num_prompts=10**9)
prompts = training_prompts(AutoTokenizer.from_pretrained(model_directory(name)), recipe)
with gzip.open(out / "prompts.jsonl.gz", "wt", encoding="utf-8") as handle:
    handle.writelines(json.dumps(p) + "\n" for p in prompts)
replies = [cache_root() / "build" / name / "distilled.jsonl", Path("data") / name / "distilled.jsonl"]
source = max((p for p in replies if p.is_file()), key=lambda p: sum(1 for _ in p.open()))
with gzip.open(out / "distilled.jsonl.gz", "wt", encoding="utf-8") as handle:
    handle.write(source.read_text(encoding="utf-8"))
with open(out / "public.jsonl", "w", encoding="utf-8") as handle:
    for domain, records in evaluation_sets().items():
        handle.writelines(json.dumps({"id": r["id"], "domain": domain, "messages": [{"role": "user", "content": r["prompt"]}]})
                          + "\n" for r in records)
print(f"pack: {len(prompts)} training prompts, replies from {source}")
EOF
    for path in data "$ADAPTER_DIR"; do
      git rm -r -q --cached --ignore-unmatch "$path"
      exclude "$path"
    done
    du -sh "$PACK"/part1 "$PACK"/part2
    echo "pack: the tree that travels: $(git ls-files -z | du -cb --files0-from=- | tail -n 1 | cut -f1) bytes" \
      "(each call: plus its part, 64 MiB in all); afterwards: scripts/gpu_smollm2.sh restore" ;;
  restore)
    for path in data "$ADAPTER_DIR"; do include "$path"; done
    git status --short | head ;;
  stash)
    mkdir -p "$WORK"
    cp "${2:-$PACK/part1}"/* "$WORK/"
    ls -l "$WORK" ;;
  run)
    PY=${PYTHON:-python3}
    out=${OUT_DIR:-${OUT:?set OUT_DIR}}
    part=${2:-$PACK/part2}
    mkdir -p "$out" "$WORK"
    exec > >(tee "$out/run.log") 2>&1
    export PYTHONUNBUFFERED=1
    echo "== $(date -u +%FT%TZ) $(git rev-parse --short HEAD 2>/dev/null)"
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
    "$PY" -c "import torch, transformers; print('torch', torch.__version__, '| transformers', transformers.__version__)"
    cp "$part"/* "$WORK/"
    cat "$WORK/model.gguf.0" "$WORK/model.gguf.1" >"$WORK/$NAME.gguf"
    [ "$(sha256sum "$WORK/$NAME.gguf" | cut -d' ' -f1)" = "$(cat "$WORK/model.gguf.sha256")" ] \
      || { echo "run: the joined GGUF is not the packed one (call 1 missing or from another pack?)"; exit 1; }
    "$PY" -m pip install -q --no-index --no-deps --upgrade --target "$WORK/site" "$WORK"/gguf-*.whl
    export PYTHONPATH=$WORK/site${PYTHONPATH:+:$PYTHONPATH}
    model=$WORK/model
    [ -f "$model/config.json" ] || "$PY" -m mtp_model.cli convert-gguf "$WORK/$NAME.gguf" "$model"
    gunzip -kf "$WORK/prompts.jsonl.gz" "$WORK/distilled.jsonl.gz"
    echo "== distill: $(wc -l <"$WORK/distilled.jsonl") replies so far, ${DISTILL_MINUTES:-1.5} minutes more"
    timeout --signal=INT "$(minutes_to_seconds "${DISTILL_MINUTES:-1.5}")" "$PY" - "$model" "$WORK" <<'EOF' || true
import sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from mtp_model.data import distill_jsonl
model_dir, work = sys.argv[1], sys.argv[2]
tokenizer = AutoTokenizer.from_pretrained(model_dir)
device = "cuda" if torch.cuda.is_available() else "cpu"  # the CPU only to try the script out
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device).eval()
distill_jsonl(model, tokenizer, f"{work}/prompts.jsonl", f"{work}/distilled.jsonl", 160, batch_size=256, chunk=256,
              progress=lambda done, total: print(f"distill: {done}/{total}", flush=True))
EOF
    echo "== distilled: $(wc -l <"$WORK/distilled.jsonl") replies"
    gzip -c "$WORK/distilled.jsonl" >"$out/distilled.jsonl.gz"
    train=("$PY" -m mtp_model.cli train --model "$model" --data "$WORK/distilled.jsonl" --num-masks 8 --rank 16
           --alpha 32 --lr 1e-3 --batch "${BATCH:-16}" --max-length 448 --anchor-fraction 0.5 --regular-weight 0
           --draft-vocab 16384 --sampler-residual --save-steps 100)
    echo "== train: ${TRAIN_MINUTES:-3} minutes at a constant rate"
    "${train[@]}" --out "$WORK/constant" --overwrite --warmup-steps 30 --steps 1000000 --seed 0 \
      --max-minutes "${TRAIN_MINUTES:-3}"
    steps=$("$PY" -c "import glob, json, sys
states = sorted(glob.glob(sys.argv[1] + '/checkpoints/checkpoint-*/trainer_state.json'), key=lambda p: int(p.split('-')[-1].split('/')[0]))
print(json.load(open(states[-1]))['global_step'])" "$WORK/constant")
    anneal=$("$PY" -c "import sys; print(max(10, round(int(sys.argv[1]) * float(sys.argv[2]) / float(sys.argv[3]))))" \
      "$steps" "${ANNEAL_MINUTES:-1}" "${TRAIN_MINUTES:-3}")
    echo "== anneal: $steps steps in ${TRAIN_MINUTES:-3} minutes, so $anneal steps decaying to 0"
    "${train[@]}" --out "$WORK/adapter" --overwrite --init-from "$WORK/constant" --warmup-steps 10 \
      --lr-schedule linear --steps "$anneal" --seed 1 --max-minutes "$(python3 -c "print(1.25 * ${ANNEAL_MINUTES:-1})")"
    cp "$WORK/adapter/adapter_config.json" "$out/"
    split -b 15M -d "$WORK/adapter/adapter_model.safetensors" "$out/adapter_model.safetensors.part"
    echo "== eval: at most ${EVAL_MINUTES:-2} minutes"
    timeout --signal=INT "$(minutes_to_seconds "${EVAL_MINUTES:-2}")" "$PY" -m mtp_model.cli eval --model "$model" \
      --adapter "$WORK/adapter" --device "${DEVICE:-cuda}" --prompts "$WORK/public.jsonl" --per-domain 4 --masks 8 \
      --modes quadratic --max-steps 40 --repeats 1 --prompt-lookup 0 --out "$out/smollm2_eval_gpu.json" || true
    ls -l "$out"
    echo "== $(date -u +%FT%TZ) done" ;;
  *)
    echo "usage: scripts/gpu_smollm2.sh pack|stash|run|restore (see its header)" >&2
    exit 2 ;;
esac
