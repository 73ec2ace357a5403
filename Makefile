# make train | make demo | make test  -- each sets up .venv/ on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

DATA ?= data/sample
WEIGHTS ?= coco
EPOCHS ?= 20
ARGS ?=
CHECKPOINT ?=

.PHONY: setup browser labelstudio train demo test docs bench sample clean

# The pinned, tested versions first, then segkit itself (editable: the venv runs this checkout).
# pip compiles every installed file to bytecode one at a time: half of this install (116 s against 57 s,
# warm cache, 2 cores). compileall does the same on every core (31 s). It is needed: where
# PYTHONDONTWRITEBYTECODE is set (as on this project's machines) nothing else ever writes the .pyc files, and
# every process would compile torch, Ray and MLflow again (the suite took 17.4 minutes instead of ~13).
# A few files meant for newer Pythons do not compile, as under pip: the leading - lets make go on.
$(STAMP): requirements.txt requirements-test.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet --no-compile -r requirements-test.txt
	-$(BIN)/python -m compileall -q -j 0 $(VENV)/lib >/dev/null
	$(BIN)/pip install --quiet --no-deps -e .
	touch $(STAMP)

setup: $(STAMP)

# Debian's Chromium and its driver, for the browser test of the demo.
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq chromium chromium-driver >/dev/null; }

# Label Studio in a venv of its own (its pins clash with segkit's), for the integration tests and
# for trying the ML backend locally: .venv-ls/bin/label-studio start.
LS_VENV := .venv-ls
LS_STAMP := $(LS_VENV)/.installed

$(LS_STAMP): requirements-labelstudio.txt
	$(PYTHON) -m venv $(LS_VENV)
	$(LS_VENV)/bin/pip install --quiet --upgrade pip
	$(LS_VENV)/bin/pip install --quiet --no-compile -r requirements-labelstudio.txt
	-$(LS_VENV)/bin/python -m compileall -q -j 0 $(LS_VENV)/lib >/dev/null
	touch $(LS_STAMP)

labelstudio: $(LS_STAMP)

train: setup
	$(BIN)/python train.py --data $(DATA) --weights $(WEIGHTS) --epochs $(EPOCHS) $(ARGS)

demo: setup
	$(BIN)/python demo.py $(if $(CHECKPOINT),--checkpoint $(CHECKPOINT)) $(ARGS)

# The three installs are independent: side by side (fresh clone, warm pip cache, loaded 2-core machine:
# 155 s against 173 s one after another). pytest-xdist runs a worker per core (at most 4), each taking
# whole modules (their servers start once) in the order tests/conftest.py sets; --durations lists where
# the suite's time went.
XDIST ?= -n auto --maxprocesses 4 --dist loadfile --no-loadscope-reorder
test:
	$(MAKE) --no-print-directory -j3 --output-sync=target setup browser labelstudio
	$(MAKE) --no-print-directory docs
	SEGKIT_TEST_STRICT=1 $(BIN)/python -m pytest -q $(XDIST) --durations=15 tests $(ARGS)

# The documentation site (docs/, mkdocs.yml) into site/; --strict: a broken link or anchor, or a page left
# out of the navigation, fails the build (and make test).
docs: setup
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --quiet

# Every benchmark that needs no trained model, each writing its page under docs/benchmarks/ (several hours on
# 2 CPU cores: train.py, labelling.py and pointrend_quality.py take the longest). tiles.py, transfer.py and
# speed.py's sizes page need trained models: docs/benchmarks.md says how to run them. A new page goes into
# docs/benchmarks.md and mkdocs.yml's nav before `make docs` passes again.
bench: setup
	$(BIN)/python bench/data.py --report docs/benchmarks/data.md
	$(BIN)/python bench/train.py --report docs/benchmarks/train.md
	$(BIN)/python bench/infer.py --report docs/benchmarks/infer.md
	$(BIN)/python bench/large_image.py --report docs/benchmarks/large_image.md
	$(BIN)/python bench/pointrend.py --img-size 320 --runs 5 --repeat 2 --steps 2 --report docs/benchmarks/pointrend.md
	$(BIN)/python bench/pointrend_quality.py --report docs/benchmarks/pointrend_quality.md
	$(BIN)/python bench/semantic.py --img-size 320 --steps 4 --runs 3 --repeat 2 --report docs/benchmarks/semantic.md
	$(BIN)/python bench/prompts.py --report docs/benchmarks/prompts.md
	$(BIN)/python bench/backend.py --report docs/benchmarks/backend.md
	$(BIN)/python bench/labelling.py --report docs/benchmarks/labelling.md
	$(BIN)/python bench/scale.py --n 2 --report docs/benchmarks/scale.md
	$(BIN)/python bench/speed.py --runs 5 --report docs/benchmarks/speed.md

sample: setup
	$(BIN)/python utils/make_sample.py

clean:
	rm -rf $(VENV) $(LS_VENV) .pytest_cache test-artifacts site
