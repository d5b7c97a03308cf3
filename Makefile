# Each target creates .venv and installs what it needs (fresh machine, nothing pre-installed).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip install --quiet --disable-pip-version-check
# torch is pinned to the CPU build this machine carries; any other spec downloads gigabytes.
TORCH  := torch==2.13.0

.PHONY: demo test bench models sine clean help

help:
	@echo "make demo   - run the digits demo (fold, calibrate, quantize int8 and 4-bit, compare)"
	@echo "make test   - run the test suite (installs the qat and test extras)"
	@echo "make bench  - benchmark against onnxruntime's quantizer, write bench/results.md"
	@echo "make sine   - run the PTQ-vs-QAT sine demo (needs torch)"
	@echo "make models - fetch the real models of models/zoo.json into .cache/zoo/ (network, ~40 MB once)"

$(VENV)/.base: pyproject.toml setup.py zenith_onnx/_native.c
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) --upgrade pip
	$(PIP) -e ".[demo,progress]"
	touch $@

$(VENV)/.full: $(VENV)/.base
	$(PIP) -e ".[test,qat,demo,progress]" "$(TORCH)"
	touch $@

demo: $(VENV)/.base
	$(PY) -m zenith_onnx demo digits

sine: $(VENV)/.full
	$(PY) -m zenith_onnx demo sine

test: $(VENV)/.full
	$(PY) -m pytest -q -p no:cacheprovider

bench: $(VENV)/.full
	$(PY) -m bench $(if $(MODEL),--model $(MODEL)) $(if $(DATA),--data $(DATA)) $(BENCH_ARGS)

# Pillow decodes the sample images at fetch time only (also in the test extra).
$(VENV)/.zoo: $(VENV)/.base
	$(PIP) "pillow>=10"
	touch $@

models: $(VENV)/.zoo
	$(PY) -m zenith_onnx.zoo fetch

clean:
	rm -rf $(VENV) demo-out bench/out .pytest_cache
