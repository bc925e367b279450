# Everything goes through .venv so a fresh machine needs only python3.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
PROTO  := proto/sidecar/v1/sidecar.proto
GEN    := sidecar/v1/sidecar_pb2.py sidecar/v1/sidecar_pb2.pyi sidecar/v1/sidecar_pb2_grpc.py sidecar/v1/sidecar_pb2_grpc.pyi
PYTEST_ARGS ?=

.PHONY: run test lint typecheck proto proto-check bench bench-quick soak fuzz clean venv constraints

$(STAMP): pyproject.toml constraints.txt
	@# A venv that failed half-way (Debian without python3-venv leaves .venv/bin/python
	@# but no pip) is removed, so that the next make tries again instead of failing on it.
	test -x $(PY) && $(PY) -m pip --version >/dev/null 2>&1 || { rm -rf $(VENV); $(PYTHON) -m venv $(VENV) || { rm -rf $(VENV); exit 1; }; }
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

run: $(STAMP)
	mkdir -p data
	$(VENV)/bin/sidecar serve

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check sidecar tests bench
	$(VENV)/bin/ruff format --check sidecar tests bench
	$(VENV)/bin/mypy sidecar bench
	$(VENV)/bin/mypy -p tests

typecheck: $(STAMP)
	$(VENV)/bin/mypy sidecar bench
	$(VENV)/bin/mypy -p tests

define protoc
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH $(PY) -m grpc_tools.protoc -Iproto --python_out=$(1) --grpc_python_out=$(1) \
		--mypy_out=$(1) --mypy_grpc_out=$(1) $(PROTO)
endef

proto: $(STAMP)
	$(call protoc,.)

# Regenerate into a scratch directory and fail if the committed code differs.
proto-check: $(STAMP)
	rm -rf build/proto-check && mkdir -p build/proto-check
	$(call protoc,build/proto-check)
	for f in $(GEN); do diff -u $$f build/proto-check/$$f || { echo "$$f is stale: run make proto" >&2; exit 1; }; done
	@echo "generated code is fresh"

bench: $(STAMP)
	$(PY) -m bench

bench-quick: $(STAMP)
	$(PY) -m bench --quick

# Chaos soak (bench/soak.py): kill -9, SIGTERM, SIGSTOP and lost Redis answers under
# load, then every promise checked; about a minute. Not part of CI: it is randomized.
# Its second half needs Redis on 127.0.0.1:6379.
SOAK_ARGS ?= --variant mixed --cycles 6
soak: $(STAMP)
	$(PY) -m bench.soak --store sqlite $(SOAK_ARGS)
	$(PY) -m bench.soak --store redis $(SOAK_ARGS)

fuzz: $(STAMP)
	HYPOTHESIS_PROFILE=fuzz $(PY) -m pytest tests/test_fuzz.py --timeout=0 $(PYTEST_ARGS)

# After a change to pyproject.toml's dependencies: resolve them afresh, test, commit both.
constraints:
	rm -rf $(VENV)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet --upgrade setuptools -e '.[dev]'
	sed -n '1,4p' constraints.txt > constraints.new
	@# --all keeps setuptools: the Docker build pins its build backend with this file
	$(PY) -m pip freeze --all --exclude-editable | grep -v '^pip==' >> constraints.new
	mv constraints.new constraints.txt
	touch $(STAMP)

clean:
	rm -rf $(VENV) build .pytest_cache .mypy_cache .ruff_cache .hypothesis sidecar.egg-info
