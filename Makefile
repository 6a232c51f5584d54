# Two commands do everything on a fresh machine:  `make demo`  and  `make test`.
# Both create .venv/ in the repo (if missing) and install from requirements.txt + constraints.txt.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.octsam-installed

.PHONY: demo test test-quick lint format install clean-venv

install: $(STAMP)

$(STAMP): requirements.txt requirements-dev.txt requirements-nodeps.txt requirements-app.txt constraints.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade -c constraints.txt -r requirements.txt -r requirements-dev.txt
	# Packages whose declared dependencies would break the environment (see each file's header)
	$(BIN)/python -m pip install --no-deps -c constraints.txt -r requirements-nodeps.txt -r requirements-app.txt
	$(BIN)/python -m pip install --no-deps --no-build-isolation -e .
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m octsam.cli.demo $(DEMO_ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

test-quick: $(STAMP)  # the tests not marked slow (each slow one takes > ~20 s on 2 cores)
	$(BIN)/python -m pytest -q -m "not slow" $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff format . && $(BIN)/ruff check --fix .

clean-venv:
	rm -rf $(VENV)
