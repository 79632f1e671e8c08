# The two commands of the README: `make demo` (set up + run the demo) and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
SHARED_DATA := $(wildcard ../shared/data)

.PHONY: setup demo test test-fast acceptance lint cluster-deps image clean

$(VENV)/.setup-done: pyproject.toml scripts/setup_env.sh
	VENV=$(VENV) bash scripts/setup_env.sh
	touch $@

setup: $(VENV)/.setup-done

demo: setup
	$(VENV)/bin/labs launch jobs/demo_smollm2.yaml

# System packages for the cluster/slurm tests (root only; the tests skip with the reason otherwise).
# With Open MPI present, mpi4py too (the openmpi launcher's test).
cluster-deps:
	@if [ "$$(id -u)" = 0 ] && [ -x scripts/install_cluster_deps.sh ]; then WITH_CONTAINERS=1 bash scripts/install_cluster_deps.sh; \
	else echo "[cluster-deps] not root or no installer: cluster/slurm tests will skip with their reason"; fi
	@if command -v mpirun >/dev/null && [ -x $(PY) ] && ! $(PY) -c 'import mpi4py' 2>/dev/null; then \
	  echo "[cluster-deps] installing mpi4py"; $(PY) -m pip install -q 'mpi4py>=4'; fi

# Two pytest workers (pytest-xdist; each test file one group, the fake-host files one group between them:
# tests/conftest.py), then the tests that time their answers (`serial`), alone on the machine.
XDIST := -n 2 --dist loadgroup --no-loadscope-reorder
FAST := not distributed and not cluster and not slurm and not container

test: setup cluster-deps
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(if $(SHARED_DATA),LABS_DATA_DIR=$(abspath $(SHARED_DATA))) \
	$(PY) -m pytest tests $(XDIST) -m "not serial" --durations=40
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(if $(SHARED_DATA),LABS_DATA_DIR=$(abspath $(SHARED_DATA))) \
	$(PY) -m pytest tests -m serial --durations=10

test-fast: setup
	HF_HUB_OFFLINE=1 $(PY) -m pytest tests $(XDIST) -m "$(FAST) and not serial"
	HF_HUB_OFFLINE=1 $(PY) -m pytest tests -m "$(FAST) and serial"

# The documented lab jobs on the real data of ../shared/data (not part of `make test`; 12 minutes on 2 idle
# cores), then SmolLM2-135M under every strategy (28 minutes more): their figures, with the commit and the
# date, into docs/acceptance.json and the README/docs tables (`--only labs` / `--only strategies`).
acceptance: setup
	$(PY) scripts/acceptance.py $(if $(SHARED_DATA),--data_dir $(abspath $(SHARED_DATA)))

# The project's image (podman; a local Debian base and this machine's pip sources, docs/containers.md).
# Cold about 8.5 minutes, then cached: tests/test_container.py skips until it exists.
image:
	bash scripts/build_image.sh --local

lint: setup
	$(VENV)/bin/ruff check launcher tasks tests bench

clean:
	rm -rf runs .pytest_cache
