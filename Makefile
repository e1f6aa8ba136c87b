# PRESENCE reproduction: one target per stage. `make help` lists them with hardware and time.
# Override the preset with `make <target> PRESET=small`, or a preset file: PRESET=presets/variants/tiny_x10.yaml.
PRESET ?= tiny
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# Extra pip arguments for torch, e.g. --index-url https://download.pytorch.org/whl/cpu for a CPU build
TORCH_PIP_ARGS ?=
# Local XTREME data in XTREME's download layout (optional; see 04_finetune/README.md)
XTREME_DIR ?= $(wildcard ../shared/xtreme)
ifneq ($(strip $(XTREME_DIR)),)
export PRESENCE_XTREME_DIR ?= $(abspath $(XTREME_DIR))
endif

# Progress bars redraw at most every few seconds, so logs of non-interactive runs stay readable.
export TQDM_MININTERVAL ?= 5

STAMP := $(VENV)/.installed

.PHONY: help env peers data pretrain si finetune figures bench device-carry reproduce test clean

help:  ## list the targets
	@echo "PRESENCE reproduction. Targets (PRESET=$(PRESET); tiny = 2 CPU cores, small = 1 GPU, paper = many GPUs):"
	@echo "  env        create $(VENV) and install the pinned packages (CPU torch)        ~3 min, network to PyPI"
	@echo "  peers      Opacus, BackPACK for 03_pretrain/bench_si_peers.py (no deps)      < 1 min, network to PyPI"
	@echo "  data       01_data: corpus, tokenizer, span-corrupted packed data, probes   tiny: ~40 s CPU | small: ~3 min CPU"
	@echo "  pretrain   03_pretrain: the preset's methods x seeds                        tiny: ~5 min CPU (3 runs) | small: 1 GPU, ~10 min/run (est.)"
	@echo "  si         02_si_analysis: Figure 1, SI of clean vs noisy probes             tiny: ~1 min CPU | small: 1 GPU, minutes (est.)"
	@echo "  finetune   04_finetune: XTREME zero-shot (+ offline verse retrieval)        tiny: ~4 min CPU | small: 1 GPU, ~10 min/run (est.)"
	@echo "  figures    05_figures: paper-vs-ours tables and figures from results/        < 1 min CPU"
	@echo "  bench      data, SI-engine, training-step and optimizer benchmarks (ratios)  tiny: ~2 min CPU | small: 1 GPU: 03_pretrain/gpu_checks.sh"
	@echo "  device-carry  small-preset data in .device_carry/ for one GPU call of 03_pretrain/gpu_checks.sh  ~2 min CPU"
	@echo "  reproduce  env + every stage in order at PRESET (tiny: <= 20 min, 2 cores, offline)"
	@echo "  test       env + the whole test suite                                      <= 20 min, 2 cores"
	@echo "  clean      remove $(VENV) and artefacts/ (results/ is kept)"
	@echo "PRESET may also be a preset file, e.g. PRESET=presets/variants/tiny_x10.yaml (tiny trained 10x longer, ~11 min/run CPU)."

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet "torch==2.13.0" $(TORCH_PIP_ARGS)
	$(PY) -m pip install --quiet -e ".[test]"
	touch $@

env: $(STAMP)

# The pinned `peers` extra of pyproject.toml without dependencies: BackPACK's torchvision would replace torch.
peers: $(STAMP)
	$(PY) -m pip install --no-deps $$($(PY) -c "import tomllib; print(*tomllib.load(open('pyproject.toml', 'rb'))['project']['optional-dependencies']['peers'])")

# A stage script that does not exist yet says so and fails; `reproduce` runs the stages that exist.
run_stage = if [ -f $(1) ]; then $(PY) $(1) --preset $(PRESET) $(2); else echo "$(1): stage not implemented yet" >&2; exit 1; fi

data: $(STAMP)
	@$(call run_stage,01_data/prepare_data.py)

pretrain: $(STAMP)
	@$(call run_stage,03_pretrain/pretrain_all.py)

si: $(STAMP)
	@$(call run_stage,02_si_analysis/analyze_si.py)

finetune: $(STAMP)
	@$(call run_stage,04_finetune/finetune_all.py)

figures: $(STAMP)
	@$(call run_stage,05_figures/make_figures.py)

bench: $(STAMP)
	@$(call run_stage,01_data/bench_data.py)
	@$(call run_stage,03_pretrain/bench_si.py)
	@$(call run_stage,03_pretrain/bench_train.py)
	@$(call run_stage,03_pretrain/bench_optimizer.py)

# The device tool carries at most 64 MiB and cannot read ../shared: the packed small-preset data and its
# tokenizer (~47 MB) travel in .device_carry/ (git-ignored); the raw corpus text stays here.
device-carry: $(STAMP)
	PRESENCE_ARTEFACTS=$(CURDIR)/.device_carry/artefacts $(PY) 01_data/prepare_data.py --preset small
	cd .device_carry/artefacts/small/data && rm -rf corpus probes.jsonl.gz heldout_parallel_verses.jsonl.gz
	du -sh .device_carry

# 02 scores probes with a checkpoint from 03, so pre-training runs before the SI analysis.
REPRODUCE_STAGES := 01_data/prepare_data.py 03_pretrain/pretrain_all.py 02_si_analysis/analyze_si.py \
                    04_finetune/finetune_all.py 05_figures/make_figures.py

reproduce: $(STAMP)
	@set -e; for script in $(REPRODUCE_STAGES); do \
	  if [ -f $$script ]; then echo "== $$script (preset $(PRESET))"; $(PY) $$script --preset $(PRESET); \
	  else echo "== $$script: not implemented yet, skipped"; fi; done

test: $(STAMP)
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) artefacts
