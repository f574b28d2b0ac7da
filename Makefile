# Two commands do all the set-up on a fresh Debian 12 machine, as root:
#   make bench   installs what is missing, then runs the main benchmark job
#   make test    installs what is missing, then lints and runs the test suite
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
DEBIAN_PACKAGES := python3 python3-venv python3-dev gcc e2fsprogs util-linux coreutils attr \
	kmod busybox-static podman runc iproute2 crun hyperfine skopeo umoci nftables libseccomp2 \
	btrfs-progs libbtrfsutil-dev zfs-fuse unionfs-fuse containerd \
	libfuse3-dev fuse3 pkg-config thin-provisioning-tools
STAMP := $(VENV)/.setup-done

.PHONY: setup test bench bench-micro soak lint bytecode clean

# The containerd Snapshots API modules are generated, not kept in git (see
# minifs/snapshotter/api/NOTICE), so they always match the pinned protobuf.
STUBS := minifs/snapshotter/api/snapshots_pb2_grpc.py

setup: $(STAMP) $(STUBS)

$(STUBS): $(STAMP) minifs/snapshotter/api/snapshots.proto minifs/snapshotter/api/mount.proto
	$(PY) -m minifs.snapshotter.generate

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

# The report (PNGs, results/report/report.html, findings) of every bench result in results/.
.PHONY: report
report: setup
	$(VENV)/bin/minifs report results/*.json --out results/report

# Micro-benchmarks of the core operations (pytest-benchmark); not part of `make test`.
bench-micro: setup
	$(VENV)/bin/pytest -p no:cacheprovider bench/test_micro.py --benchmark-only \
		--benchmark-columns=min,median,max,rounds

# Whole-command wall times of minifs beside runc, containerd, docker and python
# (20 interleaved rounds). docker.io only for this target: installing it lets
# the bench start a private dockerd; without it docker is left out, with why.
.PHONY: bench-cli
bench-cli: setup bytecode
	@dpkg-query -W -f='$${Status}\n' docker.io 2>/dev/null | grep -q 'install ok installed' || \
		{ echo "installing Debian package: docker.io"; apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker.io; } || \
		echo "docker.io did not install; minifs bench --cli leaves docker out"
	$(VENV)/bin/minifs bench --cli --runs 20

# devicemapper's sequential write/read and 4-byte update against ext4 on a loop
# device over a plain file (the floor), 512 MiB, in one run.
.PHONY: bench-thin
bench-thin: setup bytecode
	$(PY) -m minifs_bench.thin_throughput --output results/thin/throughput.json

# Random SIGKILLs over clone, snapshot, rm, apply, image import and run, each
# followed by gc and a check that nothing committed was lost (make test runs 6
# per driver). MINIFS_KILL_TRIALS=N sets the count, MINIFS_KILL_SEED replays one.
soak: setup bytecode
	MINIFS_KILL_TRIALS=$${MINIFS_KILL_TRIALS:-200} $(VENV)/bin/pytest -p no:cacheprovider \
		-o timeout=0 tests/test_random_kill.py

clean:
	rm -rf $(VENV) build *.egg-info
