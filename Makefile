# Two commands do all the set-up on a fresh machine:
#   make demo   embeds Python's documentation through Dagster, searches it, then serves the UI
#   make test   runs the test suite against the embedded PostgreSQL and the local model
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: demo test install-deps

$(VENV)/.installed: pyproject.toml requirements.lock
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# The CPU build of torch first: any looser spec makes pip pull a multi-GB CUDA build.
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -r requirements.lock
	$(PY) -m pip install --quiet --no-deps -e '.[local,test]'
	touch $@

install-deps: $(VENV)/.installed

# e.g. make demo DEMO_ARGS="--port 3001" (or --limit 300 for a quicker first run)
demo: $(VENV)/.installed
	$(VENV)/bin/vectorsync demo $(DEMO_ARGS)

test: $(VENV)/.installed
	$(VENV)/bin/pytest
