# The venv is built with python3.11 because the one CPU build of torch on these
# machines is torch==2.13.0 for 3.11; it is installed before the package so that
# pip never resolves torch to a multi-GB CUDA build.
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_VERSION ?= 2.13.0
STAMP := $(VENV)/.installed

ROUTER_VENV := $(VENV)/sglang-router
ROUTER_STAMP := $(ROUTER_VENV)/.installed

.PHONY: install browser router test soak serve clean

# install also compiles kvflow's native CPU kernels for this machine (about 25 s, once;
# cached under ~/.cache/kvflow/kernels).

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==$(TORCH_VERSION)
	$(BIN)/pip install --quiet -e '.[test,bench]'
	$(BIN)/python -m kvflow.kernels
	touch $(STAMP)

# The web UI's tests drive the machine's Chromium (Debian's package; Playwright's own browser
# download is not reachable from here). Installed once where missing and apt-get can run (as
# root, as on CI), a failed install failing the target; elsewhere those tests are skipped.
browser:
	@command -v chromium >/dev/null || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing chromium for the web UI's browser tests (apt-get, once)"; \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	      chromium) >$(VENV)/chromium-install.log 2>&1 \
	      || { cat $(VENV)/chromium-install.log; exit 1; }; \
	  else \
	    echo "no chromium and no apt-get as root: the browser tests will be skipped"; \
	  fi; }

# SGLang's model gateway (the sglang-router wheel from PyPI), in a venv of its own so that
# its pins never meet kvflow's, for the test that serves kvflow behind it. Where its wheel
# cannot be installed, that test is skipped with the reason.
router: $(ROUTER_STAMP)

$(ROUTER_STAMP):
	$(PYTHON) -m venv $(ROUTER_VENV)
	@if $(ROUTER_VENV)/bin/pip install --quiet sglang-router==0.3.2; then touch $(ROUTER_STAMP); \
	else echo "sglang-router could not be installed: tests/test_sglang_router.py will be skipped"; fi

test: install browser router
	$(BIN)/python -m pytest -q -m "not slow" tests

# issue 11's soak test: one server under 64 streaming clients for KVFLOW_SOAK_SECONDS
# (default 300), with its summary printed.
soak: install
	$(BIN)/python -m pytest -q -s -m slow tests/test_soak.py

# The OpenAI-compatible server on 127.0.0.1:8000; with no MODEL, the built-in demo model.
serve: install
	$(BIN)/kvflow serve $(MODEL) $(SERVE_FLAGS)

clean:
	rm -rf $(VENV) build *.egg-info
