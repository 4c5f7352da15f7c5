# Two commands do all set-up on a fresh machine:
#   make demo   - chat in the terminal with the embedded SmolLM2-135M-Instruct model
#   make test   - run the test suite
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip

.PHONY: setup demo test bench clean

$(VENV)/.installed: pyproject.toml scripts/install_torch.sh
	test -x $(PY) || python3 -m venv $(VENV)
	PY=$(PY) bash scripts/install_torch.sh
	$(PIP) install -q -e '.[test]'
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(PY) -m accessory chat

test: setup
	$(PY) -m pytest tests

bench: setup
	$(PIP) install -q -e '.[bench]'
	$(PY) benchmarks/load_memory.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
