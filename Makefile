# Two commands a newcomer needs: `make demo` and `make test`. Each creates .venv on first use;
# the stamp file makes re-running cheap (reinstall only when setup.py changes).
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed
WORKDIR ?= runs/demo
PYTEST_ARGS ?=
TESTS ?= tests
export JAX_PLATFORMS ?= cpu

.PHONY: demo test venv clean

$(STAMP): setup.py
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[test]'
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/flowtok demo --workdir $(WORKDIR)

# The malloc tuning `flowtok` gives itself (flowtok_jax/cli.py, MALLOC_TUNABLE), for the tests too.
test: $(STAMP)
	GLIBC_TUNABLES="$${GLIBC_TUNABLES:+$$GLIBC_TUNABLES:}glibc.malloc.hugetlb=1" \
	  $(VENV)/bin/python -m pytest -n 2 -q $(TESTS) $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) runs
