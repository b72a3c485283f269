# gpo_lit — common tasks. Extra Hydra overrides go straight on the command line:
#   make train EXP=demo model/pooling=max trainer.max_epochs=5
VENV   ?= .venv
PY     ?= $(VENV)/bin/python
EXP    ?= demo
SWEEP  ?= pooling
# Every command-line `key=value` that is not one of this Makefile's own variables is a Hydra
# override. Each reaches the shell as one single-quoted word, exactly as typed (no `;`, space or
# `$` is interpreted); paths also reach Hydra quoted, so `CKPT=a,b.ckpt` is one path. ARGS is
# passed to the shell as it is (for flags: ARGS=--cfg=job).
OWN_VARS := EXP CKPT CKPTS SWEEP SWEEP_DIR VENV PY ARGS TEST_WORKERS
comma := ,
empty :=
space := $(empty) $(empty)
sq = '$(subst ','\'',$(1))'
hstr = '$(subst ',\',$(1))'
OVERRIDE_VARS := $(foreach v,$(sort $(.VARIABLES)),$(if $(filter command line,$(origin $(v))),$(if $(filter $(OWN_VARS),$(v)),,$(v))))
unexport $(OVERRIDE_VARS)  # make would expand them to export them to the recipes' environment
OVERRIDES = $(foreach v,$(OVERRIDE_VARS),$(call sq,$(v)=$(value $(v))))
HYDRA_ARGS = $(OVERRIDES) $(ARGS)
# CKPT: one checkpoint; CKPTS="a.ckpt b.ckpt": an ensemble (paths without spaces).
CKPT_ARG = $(if $(value CKPTS),$(call sq,ckpt=[$(subst $(space),$(comma),$(strip $(foreach c,$(value CKPTS),$(call hstr,$(c)))))]),$(if $(value CKPT),$(call sq,ckpt=$(call hstr,$(value CKPT)))))
export HF_HUB_OFFLINE ?= 1
export WANDB_MODE ?= offline

.PHONY: install demo train features eval sweep report wandb-sync test test-fast lint format bench device-wheels

$(PY):
	python3 -m venv $(VENV)

install: $(PY)  ## venv + torch/torchvision (local files) + gpo_lit and its dev tools
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e '.[dev]'

demo: install  ## set up, generate the demo data, train GPO on it, print the test table
	$(MAKE) train EXP=demo

train:  ## train EXP (conf/experiment/$(EXP).yaml), then test the best checkpoint
	$(PY) -m gpo_lit.train $(call sq,experiment=$(value EXP)) $(HYDRA_ARGS)

features:  ## precompute grid features of a grid experiment's backbone (default EXP=demo_grid)
	$(PY) -m gpo_lit.extract $(call sq,experiment=$(if $(filter command line,$(origin EXP)),$(value EXP),demo_grid)) $(HYDRA_ARGS)

eval:  ## evaluate CKPT (any split / protocol: split=… protocols=[…] save_embeddings=true figures=true save_ranks=true); CKPTS="a b": ensemble
	$(PY) -m gpo_lit.eval $(CKPT_ARG) $(HYDRA_ARGS)

sweep:  ## multirun conf/sweep/$(SWEEP).yaml over EXP, or an Optuna search: hparams_search=pooling_optuna
	$(PY) -m gpo_lit.train -m $(call sq,experiment=$(value EXP)) $(if $(hparams_search),,$(call sq,+sweep=$(value SWEEP))) $(HYDRA_ARGS)

report:  ## table (mean ± std over seeds) and plots of a sweep folder
	$(PY) -m gpo_lit.report $(call sq,sweep_dir=$(call hstr,$(value SWEEP_DIR))) $(HYDRA_ARGS)

wandb-sync:  ## upload offline W&B runs under logs/
	find logs -type d -name 'offline-run-*' -print0 | xargs -0 -r $(VENV)/bin/wandb sync

# The suite runs on TEST_WORKERS processes (pytest-xdist; the tests are single-threaded, most
# of the time in subprocess runs). --dist loadfile: each module on one worker, so a module
# fixture (a training run, a sweep folder) is built once; modules are handed out in collection
# order (tests/conftest.py puts those with slow tests first), not by test count. pytest flags:
# PYTEST_ADDOPTS=--durations=15 (a make variable would reach the suite's own make commands).
TEST_WORKERS ?= 2
PYTEST = $(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

test:  ## the whole test suite (slow end-to-end tests included)
	$(PYTEST)

test-fast:
	$(PYTEST) -m "not slow"

lint:  ## ruff (lint + format check) and mypy (types of src/, settings in pyproject.toml)
	$(PY) -m ruff check src tests bench
	$(PY) -m ruff format --check src tests bench
	$(PY) -m mypy src

format:
	$(PY) -m ruff format src tests bench
	$(PY) -m ruff check --fix src tests bench

bench:  ## speed targets, measured side by side
	$(PY) bench/pooling_speed.py
	$(PY) bench/eval_speed.py

# The GPU checks run as one prepared script on a lent GPU machine (bench/device_check.sh), which
# reaches no package index: these are the wheels its tests need that a GPU image may lack.
device-wheels:  ## wheels for bench/device_check.sh into .device_wheels/ (carry that folder)
	$(PY) -m pip wheel -q --no-deps -w .device_wheels hydra-core==1.3.8 omegaconf==2.3.1 antlr4-python3-runtime==4.9.3
