# The two commands of the README:  `make demo`  and  `make test`.
# Each creates .venv (once), installs everything, then runs.

VENV ?= .venv
PY := $(VENV)/bin/python
# torch and torchvision are installed first as a matched pair (see pyproject.toml); override for
# another platform, e.g. make demo TORCH="torch==2.9.1 torchvision==0.24.1"
TORCH ?= torch==2.14.1 torchvision==0.29.1
HOME_DIR ?= caselens-data

.PHONY: setup demo test clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH)
	$(PY) -m pip install --quiet -e '.[demo,test]'
	touch $@

demo: setup
	HF_HUB_OFFLINE=1 $(VENV)/bin/caselens --home $(HOME_DIR) demo

test: setup
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q

clean:
	rm -rf $(HOME_DIR) .pytest_cache
