# gpo_lit — common tasks. Extra Hydra overrides go straight on the command line:
#   make train EXP=demo model/pooling=max trainer.max_epochs=5
VENV   ?= .venv
PY     ?= $(VENV)/bin/python
EXP    ?= demo
# Every command-line `key=value` that is not one of this Makefile's own variables is a Hydra override.
SWEEP  ?= pooling
comma := ,
HYDRA_ARGS = $(filter-out EXP=% CKPT=% SWEEP=% SWEEP_DIR=% VENV=% PY=% ARGS=%,$(MAKEOVERRIDES)) $(ARGS)
export HF_HUB_OFFLINE ?= 1
export WANDB_MODE ?= offline

.PHONY: install demo train features eval sweep report wandb-sync test test-fast lint format bench

$(PY):
	python3 -m venv $(VENV)

install: $(PY)  ## venv + torch/torchvision (local files) + gpo_lit and its dev tools
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e '.[dev]'

demo: install  ## set up, generate the demo data, train GPO on it, print the test table
	$(MAKE) train EXP=demo

train:  ## train EXP (conf/experiment/$(EXP).yaml), then test the best checkpoint
	$(PY) -m gpo_lit.train experiment=$(EXP) $(HYDRA_ARGS)

features:  ## precompute grid features of a grid experiment's backbone (default EXP=demo_grid)
	$(PY) -m gpo_lit.extract experiment=$(if $(filter command line,$(origin EXP)),$(EXP),demo_grid) $(HYDRA_ARGS)

eval:  ## evaluate CKPT (any split / protocol: split=… protocols=[…] save_embeddings=true figures=true save_ranks=true); CKPT=a,b: ensemble
	$(PY) -m gpo_lit.eval ckpt=$(if $(findstring $(comma),$(CKPT)),[$(CKPT)],$(CKPT)) $(HYDRA_ARGS)

sweep:  ## multirun conf/sweep/$(SWEEP).yaml over EXP (launcher: hydra/launcher=parallel, cluster=slurm)
	$(PY) -m gpo_lit.train -m experiment=$(EXP) +sweep=$(SWEEP) $(HYDRA_ARGS)

report:  ## table (mean ± std over seeds) and plots of a sweep folder
	$(PY) -m gpo_lit.report sweep_dir=$(SWEEP_DIR) $(HYDRA_ARGS)

wandb-sync:  ## upload offline W&B runs under logs/
	find logs -type d -name 'offline-run-*' -print0 | xargs -0 -r $(VENV)/bin/wandb sync

test:  ## the whole test suite (slow end-to-end tests included)
	$(PY) -m pytest -q

test-fast:
	$(PY) -m pytest -q -m "not slow"

lint:
	$(PY) -m ruff check src tests bench
	$(PY) -m ruff format --check src tests bench

format:
	$(PY) -m ruff format src tests bench
	$(PY) -m ruff check --fix src tests bench

bench:  ## speed targets, measured side by side
	$(PY) bench/pooling_speed.py
	$(PY) bench/eval_speed.py
