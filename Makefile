# PRESENCE reproduction: one target per stage. `make help` lists them with hardware and time.
# Override the preset with `make <target> PRESET=small`, or a preset file: PRESET=presets/variants/tiny_x10.yaml.
PRESET ?= tiny
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# Which torch build `env` installs. On Linux without an NVIDIA driver (no nvidia-smi on the PATH) the CPU
# wheel, through PyTorch's CPU index (about 200 MB; PyPI's Linux wheel is the CUDA build, several GB with
# its nvidia-* packages). Elsewhere PyPI's default: Linux with a GPU gets CUDA, macOS the CPU build.
# Choose another: make env TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cu128" (or "" for PyPI).
TORCH_CPU_INDEX := https://download.pytorch.org/whl/cpu
ifeq ($(shell uname -s)$(shell command -v nvidia-smi),Linux)
TORCH_PIP_ARGS ?= --extra-index-url $(TORCH_CPU_INDEX)
endif
TORCH_PIP_ARGS ?=
# 04_finetune reads local XTREME data (XTREME's download layout) from $PRESENCE_XTREME_DIR when it is set:
#   make finetune PRESENCE_XTREME_DIR=/data/xtreme      (see 04_finetune/README.md)

# Progress bars redraw at most every few seconds, so logs of non-interactive runs stay readable.
export TQDM_MININTERVAL ?= 5

STAMP := $(VENV)/.installed

.PHONY: help env peers data pretrain si noise finetune figures bench gpu-bundle reproduce test clean

help:  ## list the targets
	@echo "PRESENCE reproduction. Targets (PRESET=$(PRESET); tiny = 2 CPU cores, small = 1 GPU, paper = many GPUs):"
	@echo "  env        create $(VENV) and install the pinned packages                    ~3 min, network to PyPI"
	@echo "             torch: $(if $(strip $(TORCH_PIP_ARGS)),pip install torch==2.13.0 $(TORCH_PIP_ARGS),PyPI's torch==2.13.0 (Linux: the CUDA build, several GB)); set TORCH_PIP_ARGS to choose"
	@echo "             scripts run directly need the environment: . $(VENV)/bin/activate (or $(VENV)/bin/python SCRIPT)"
	@echo "  peers      Opacus, BackPACK for 03_pretrain/bench_si_peers.py (no deps)      < 1 min, network to PyPI"
	@echo "  data       01_data: corpus, tokenizer, span-corrupted packed data, probes   tiny: ~40 s CPU | small: ~3 min CPU"
	@echo "  pretrain   03_pretrain: the preset's methods x seeds                        tiny: ~6 min CPU (4 runs) | small: 1 GPU, ~10 min/run (est.)"
	@echo "  si         02_si_analysis: Figure 1, SI of clean vs noisy probes             tiny: ~1 min CPU | small: 1 GPU, minutes (est.)"
	@echo "  noise      02_si_analysis: the known-noise experiment of a preset with data.noise_rates  tiny_x10: ~5 min CPU"
	@echo "  finetune   04_finetune: XTREME zero-shot (+ offline verse retrieval)        tiny: ~4 min CPU | small: 1 GPU, ~10 min/run (est.)"
	@echo "  figures    05_figures: paper-vs-ours tables and figures from results/        < 1 min CPU"
	@echo "  bench      data, SI-engine, training-step and optimizer benchmarks (ratios)  tiny: ~2 min CPU | small: 1 GPU: 03_pretrain/gpu_checks.sh"
	@echo "  gpu-bundle small-preset packed data + tokenizer in gpu_bundle/ for 03_pretrain/gpu_checks.sh  ~2 min CPU"
	@echo "  reproduce  env + every stage in order at PRESET (tiny: <= 20 min, 2 cores, offline)"
	@echo "  test       env + transformers 4.x in $(VENV)/transformers4 + the whole test suite   <= 20 min, 2 cores"
	@echo "  clean      remove $(VENV) and artefacts/ (results/ is kept)"
	@echo "PRESET may also be a preset file, e.g. PRESET=presets/variants/tiny_x10.yaml (tiny trained 10x longer, ~11 min/run CPU)."

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || { echo "$(PYTHON) is missing or older than \
	Python 3.11, which the pinned numpy, pandas, scipy and matplotlib need. Fix: make env PYTHON=python3.11" >&2; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --no-deps "torch==2.13.0" $(TORCH_PIP_ARGS)
	$(PY) -m pip install --quiet -e ".[test]"
	touch $@

env: $(STAMP)

# The pinned `peers` extra of pyproject.toml without dependencies: BackPACK's torchvision would replace torch.
peers: $(STAMP)
	$(PY) -m pip install --no-deps $$($(PY) -c "import tomllib; print(*tomllib.load(open('pyproject.toml', 'rb'))['project']['optional-dependencies']['peers'])")

run_stage = $(PY) $(1) --preset $(PRESET) $(2)

data: $(STAMP)
	@$(call run_stage,01_data/prepare_data.py)

pretrain: $(STAMP)
	@$(call run_stage,03_pretrain/pretrain_all.py)

si: $(STAMP)
	@$(call run_stage,02_si_analysis/analyze_si.py)

noise: $(STAMP)
	@$(call run_stage,02_si_analysis/analyze_noise.py)

finetune: $(STAMP)
	@$(call run_stage,04_finetune/finetune_all.py)

figures: $(STAMP)
	@$(call run_stage,05_figures/make_figures.py)

bench: $(STAMP)
	@$(call run_stage,01_data/bench_data.py)
	@$(call run_stage,03_pretrain/bench_si.py)
	@$(call run_stage,03_pretrain/bench_train.py)
	@$(call run_stage,03_pretrain/bench_optimizer.py)

# What a GPU machine needs for 03_pretrain/gpu_checks.sh: the small preset's packed data and tokenizer
# (~47 MB, git-ignored), without the corpus text, so the GPU machine needs neither the corpus package
# nor the corpus build.
gpu-bundle: $(STAMP)
	PRESENCE_ARTEFACTS=$(CURDIR)/gpu_bundle/artefacts $(PY) 01_data/prepare_data.py --preset small
	cd gpu_bundle/artefacts/small/data && rm -rf corpus probes.jsonl.gz heldout_parallel_verses.jsonl.gz
	du -sh gpu_bundle

# 02 scores probes with a checkpoint from 03, so pre-training runs before the SI analysis. The tables read
# every run of the preset, also the committed ones this fast path does not retrain: --since marks those
# (†) and the last lines say what was regenerated and what was reused, and why.
REPRODUCE_STAGES := 01_data/prepare_data.py 03_pretrain/pretrain_all.py 02_si_analysis/analyze_si.py \
                    04_finetune/finetune_all.py

reproduce: $(STAMP)
	@set -e; started=$$(date -u +%Y-%m-%dT%H:%M:%S); \
	for script in $(REPRODUCE_STAGES); do echo "== $$script (preset $(PRESET))"; $(PY) $$script --preset $(PRESET); done; \
	echo "== 05_figures/make_figures.py (preset $(PRESET))"; \
	$(PY) 05_figures/make_figures.py --preset $(PRESET) --since $$started

# transformers 4.x beside the pinned 5.x, without dependencies (torch and numpy come from $(VENV)):
# tests/test_portable_checkpoint.py loads a saved checkpoint with it and compares the logits.
TRANSFORMERS4_DIR := $(VENV)/transformers4
TRANSFORMERS4_PACKAGES := transformers==4.57.6 tokenizers==0.22.2 huggingface_hub==0.36.0 requests==2.32.5 \
                          urllib3==2.5.0 charset_normalizer==3.4.4

$(TRANSFORMERS4_DIR)/.installed: $(STAMP)
	$(PY) -m pip install --quiet --no-deps --target $(TRANSFORMERS4_DIR) $(TRANSFORMERS4_PACKAGES)
	touch $@

test: $(STAMP) $(TRANSFORMERS4_DIR)/.installed
	PRESENCE_TRANSFORMERS4_DIR=$(abspath $(TRANSFORMERS4_DIR)) $(PY) -m pytest -q

clean:
	rm -rf $(VENV) artefacts
