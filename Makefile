# InverseReg: `make demo` registers a built-in pair; `make test` runs the test suite.
# Both create .venv on first use (torch pinned to 2.13.0, CPU or CUDA as pip finds it).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# a local wheel folder, where the machine has one, saves downloading torch
ifneq ($(wildcard /opt/wheels),)
export PIP_FIND_LINKS ?= /opt/wheels
endif

.PHONY: demo test install clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e ".[test]"
	touch $@

install: $(BIN)/.installed

demo: $(BIN)/.installed
	$(BIN)/inversereg demo -o demo_output

test: $(BIN)/.installed
	PYTHONUTF8=1 $(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) demo_output .pytest_cache
