# Two commands do all the set-up on a fresh Debian 12 machine, as root:
#   make bench   installs what is missing, then runs the main benchmark job
#   make test    installs what is missing, then lints and runs the test suite
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
DEBIAN_PACKAGES := python3 python3-venv python3-dev gcc e2fsprogs util-linux coreutils attr \
	kmod busybox-static podman runc iproute2 crun hyperfine skopeo umoci nftables \
	btrfs-progs libbtrfsutil-dev zfs-fuse
STAMP := $(VENV)/.setup-done

.PHONY: setup test bench bench-micro soak lint bytecode clean

setup: $(STAMP)

# Every minifs command is a fresh interpreter: with PYTHONDONTWRITEBYTECODE set
# (as on CI here) it would recompile the package on each start.
bytecode: setup
	@$(PY) -m compileall -q minifs drivers bench >/dev/null

$(STAMP): pyproject.toml Makefile
	@missing=$$(for p in $(DEBIAN_PACKAGES); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null \
		| grep -q 'install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages: $$missing"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	fi
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: setup lint bytecode
	$(VENV)/bin/pytest

bench: setup bytecode
	$(VENV)/bin/minifs bench --driver overlay2 --layers 50

# Micro-benchmarks of the core operations (pytest-benchmark); not part of `make test`.
bench-micro: setup
	$(VENV)/bin/pytest -p no:cacheprovider bench/test_micro.py --benchmark-only \
		--benchmark-columns=min,median,max,rounds

# Random SIGKILLs over clone, snapshot, rm, apply, image import and run, each
# followed by gc and a check that nothing committed was lost (make test runs 6
# per driver). MINIFS_KILL_TRIALS=N sets the count, MINIFS_KILL_SEED replays one.
soak: setup bytecode
	MINIFS_KILL_TRIALS=$${MINIFS_KILL_TRIALS:-200} $(VENV)/bin/pytest -p no:cacheprovider \
		-o timeout=0 tests/test_random_kill.py

clean:
	rm -rf $(VENV) build *.egg-info
