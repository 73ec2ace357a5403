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

bench: setup
	$(BIN)/python bench/data.py
	$(BIN)/python bench/train.py
	$(BIN)/python bench/infer.py
	$(BIN)/python bench/large_image.py
	$(BIN)/python bench/speed.py --report docs/benchmarks/speed.md

sample: setup
	$(BIN)/python utils/make_sample.py

clean:
	rm -rf $(VENV) $(LS_VENV) .pytest_cache test-artifacts site
