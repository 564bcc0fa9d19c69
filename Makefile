# Two commands for a newcomer: `make demo` (the main job) and `make test` (the test suite).
# Both create or reuse .venv and install the package first.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.mtp-installed

.PHONY: setup demo test bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml setup.py $(wildcard csrc/*) scripts/setup_env.sh
	bash scripts/setup_env.sh $(VENV)
	touch $@

demo: $(STAMP)
	$(PY) -m mtp_model.cli demo

# Unit tests plus one smoke run of every benchmark (timing is off on CPU; on a GPU use `make bench`).
test: $(STAMP)
	$(PY) -m pytest tests benchmarks --benchmark-disable -q

bench: $(STAMP)
	$(PY) -m pytest benchmarks --benchmark-only

clean:
	rm -rf build *.egg-info mtp_kernels/_C*.so
