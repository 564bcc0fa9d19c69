#!/usr/bin/env bash
# Builds the shipped demo model in mtp_model/demo_model/ from scratch: corpus (stdlib + seeded math),
# byte-level BPE tokenizer, ~4M-parameter Llama base model, then its k = 8 MTP adapter through MTPTrainer.
# Every stage is seeded; about 100 minutes on 2 CPU cores. Arguments go to `python -m mtp_model.demo.build`:
#   scripts/build_demo_model.sh                          # everything
#   scripts/build_demo_model.sh --stages adapter         # only the adapter, on the base model already there
#   scripts/build_demo_model.sh --out /tmp/demo --threads 1
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-.venv/bin/python}" -m mtp_model.demo.build "$@"
