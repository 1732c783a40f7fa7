# lua-resty-counter-rs
#
# `make` (or `make help`) lists the targets, one line each, from the `##`
# comments on their lines below. The main two: `make run` serves the demo
# on 127.0.0.1, `make test` runs every test; each installs what it needs
# first.
#
# The stack: Debian's nginx and lua module by default; an OpenResty when
# OPENRESTY_PREFIX names its prefix (PREFIX/bin/resty, PREFIX/nginx/sbin/nginx)
# or, that variable unset, when `resty` is on PATH (OPENRESTY_PREFIX= forces
# Debian's). spec/helpers/nginx.lua decides; every runner says which it uses.
#
# The top-level targets install Debian packages first and then re-enter make,
# so that a cargo installed by `deps` is the one the build finds.

SHELL := /bin/bash
.DEFAULT_GOAL := help

ROOT := $(CURDIR)
PORT ?= 8080
RUN_DIR ?= $(ROOT)/target/run
LUAJIT ?= luajit
BUSTED ?= /usr/bin/busted

# Debian packages the demo needs (`make run`): nginx with the lua module
# (the OpenResty stand-in), LuaJIT for examples/serve.lua, curl for its
# check that nginx answers, and what cargo's build uses (a C compiler for
# the linker and build scripts, certificates for the crates registry).
RUN_PACKAGES := nginx libnginx-mod-http-lua libnginx-mod-http-ndk \
	lua-resty-core luajit2 curl ca-certificates gcc make

# And what the tests add (`make test`): busted for the specs, luarocks for
# the install test, luacheck, wrk for the load of the scenarios and chaos
# cases, procps, Redis and lua-resty-redis (Debian names it nginx.redis)
# for the Redis backends, openssl for the certificates of the TLS specs,
# dnsmasq for a DNS server on loopback (the specs of a Redis host given by
# name), Prometheus (with promtool) to scrape the metrics endpoint in its
# scenario, Chromium (headless) to load the status page in its scenario.
DEB_PACKAGES := $(RUN_PACKAGES) lua-busted luarocks lua-check wrk procps \
	redis-server lua-nginx-redis openssl dnsmasq-base prometheus chromium

# rustup's cargo when there is one (it has clippy and rustfmt); otherwise
# the one on PATH, which on a fresh Debian is the one `deps` installs.
CARGO ?= $(shell { test -x $(HOME)/.cargo/bin/cargo && \
	echo $(HOME)/.cargo/bin/cargo; } || command -v cargo 2>/dev/null || \
	echo /usr/bin/cargo)
CARGO_MINOR := $(shell $(CARGO) --version 2>/dev/null | \
	sed -n 's/^cargo 1\.\([0-9]*\).*/\1/p')
# Debian 12's cargo (1.65) reaches the crates registry only through the
# sparse protocol, which it has behind an unstable flag.
ifneq ($(CARGO_MINOR),)
ifeq ($(shell test $(CARGO_MINOR) -lt 68 && echo old),old)
export CARGO_UNSTABLE_SPARSE_REGISTRY := true
export __CARGO_TEST_CHANNEL_OVERRIDE_DO_NOT_USE_THIS := nightly
endif
endif

MODULE_SO := target/lua/resty_counter_core.so

.PHONY: help run test bench chaos chaos-full fuzz deps run-deps bench-deps \
	lint-timers \
	build serve check unit-test loom lint spec scenario chaos-short \
	fuzz-short msrv-check aarch64-test aarch64-run clean openresty peer test-stack

# Every target with a `##` comment on its line, in the order of this file.
help: ## this list (what a bare `make` prints)
	@echo "make TARGET, one of:"
	@sed -n 's/^\([a-z-]*\):.*## \(.*\)$$/\1\t\2/p' $(firstword \
		$(MAKEFILE_LIST)) | expand -t 14 | sed 's/^/  /'

run: run-deps ## install what the demo needs, build, serve it on 127.0.0.1:8080
	@$(MAKE) --no-print-directory serve

test: deps ## install what the tests need, build, run every test (~7 min)
	@$(MAKE) --no-print-directory check

bench: bench-deps ## benchmarks in nginx workers; instructions per request
	@$(MAKE) --no-print-directory build
	$(LUAJIT) bench/run.lua
	$(LUAJIT) bench/strict_run.lua
	$(LUAJIT) bench/redis_run.lua
	$(LUAJIT) bench/callgrind_run.lua

chaos: deps ## faults under load (reloads, kills, floods, bad input)
	@$(MAKE) --no-print-directory chaos-short

chaos-full: deps ## the chaos cases plus a 30-minute soak
	@$(MAKE) --no-print-directory build
	$(LUAJIT) spec/chaos/run.lua full

# Installs the Debian packages of $(1) that are missing (with sudo when not
# root), and cargo when there is none at all.
define install_packages
	@missing=""; \
	for p in $(1); do \
		dpkg-query -W -f='$${Status}' $$p 2>/dev/null | \
			grep -q "install ok installed" || missing="$$missing $$p"; \
	done; \
	if ! command -v cargo >/dev/null 2>&1 && \
	   ! test -x $(HOME)/.cargo/bin/cargo; then \
		missing="$$missing cargo"; \
	fi; \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages:$$missing"; \
		sudo=""; [ "$$(id -u)" = 0 ] || sudo=sudo; \
		$$sudo apt-get update -q && \
		DEBIAN_FRONTEND=noninteractive $$sudo apt-get install -y -q \
			--no-install-recommends $$missing; \
	fi
endef

deps: ## install the Debian packages (and cargo) the tests need
	$(call install_packages,$(DEB_PACKAGES))

run-deps: ## install only what the demo needs (make run)
	$(call install_packages,$(RUN_PACKAGES))

# gnuplot draws bench/overhead.png; valgrind counts instructions per
# request (bench/callgrind_run.lua), where greencheek's original request
# counter needs lua-cjson.
bench-deps:
	$(call install_packages,$(DEB_PACKAGES) gnuplot-nox valgrind lua-cjson)

build: $(MODULE_SO) ## build the Rust core (target/lua/resty_counter_core.so)

$(MODULE_SO): Cargo.toml Cargo.lock $(wildcard src/*.rs src/*/*.rs)
	$(CARGO) build --release
	@mkdir -p target/lua
	@# A new file renamed into place: an nginx still running the old one
	@# keeps its mapping (cp would rewrite the mapped file under it).
	cp target/release/libresty_counter_core.so $@.new
	mv -f $@.new $@

check: build unit-test loom lint spec scenario chaos-short fuzz-short

# What depends on the stack, for a second one (.ci/run: OpenResty's).
test-stack: deps ## build, specs, scenarios, chaos cases (for a second stack)
	@$(MAKE) --no-print-directory build spec scenario chaos-short

unit-test: ## cargo test of the Rust core
	$(CARGO) test --no-default-features

# loom model tests of the shared engine (loom/, its own crate and lock
# file): every interleaving of its lock-free paths. loom's lock file needs a
# current toolchain (rustup's); Debian's cargo skips them and says so.
LOOM_MIN_MINOR := 95
loom: ## loom model tests of the shared engine's lock-free code
	@if [ -n "$(CARGO_MINOR)" ] && [ "$(CARGO_MINOR)" -ge $(LOOM_MIN_MINOR) ]; then \
		echo "cd loom && $(CARGO) test --release --test engine --test requests --test strict --test lax --test limit --test heavy"; \
		cd loom && $(CARGO) test -q --release --test engine --test requests --test strict --test lax --test limit --test heavy; \
	else echo "SKIPPED: loom model tests (need cargo 1.$(LOOM_MIN_MINOR)+, e.g. rustup's stable)"; fi

# clippy and rustfmt come with rustup's toolchain; Debian's cargo has
# neither, so a machine without them skips those two and says so.
lint: ## cargo fmt, cargo clippy -D warnings, luacheck
	@if $(CARGO) fmt --version >/dev/null 2>&1; then \
		echo "$(CARGO) fmt --check"; $(CARGO) fmt --check; \
	else echo "SKIPPED: cargo fmt (rustfmt not installed)"; fi
	@if $(CARGO) clippy --version >/dev/null 2>&1; then \
		set -e; \
		echo "$(CARGO) clippy -D warnings (both feature sets)"; \
		$(CARGO) clippy -q --all-targets -- -D warnings; \
		$(CARGO) clippy -q --no-default-features --all-targets -- -D warnings; \
	else echo "SKIPPED: cargo clippy (clippy not installed)"; fi
	luacheck -q lua spec bench examples
	@$(MAKE) -s lint-timers
	@echo "$(CARGO) build --future-incompat-report (none but mlua 0.8.10's)"
	@out=$$($(CARGO) build --release --future-incompat-report 2>&1) || { \
		echo "$$out"; exit 1; }; \
	crates=$$(echo "$$out" | sed -n \
		's/^warning: the following packages contain code .*Rust: //p'); \
	if [ -n "$$crates" ] && [ "$$crates" != "mlua v0.8.10" ]; then \
		echo "$$out"; echo "future-incompatible code in: $$crates (only"\
			"mlua 0.8.10's is known: see Cargo.toml)"; exit 1; fi

# Only lua/resty/counter/lifecycle.lua makes nginx timers (issue 11): a
# line of code elsewhere in lua/ that names ngx.timer fails (comments may).
lint-timers: ## no ngx.timer in lua/ outside resty/counter/lifecycle.lua
	@echo "ngx.timer only in lua/resty/counter/lifecycle.lua"
	@if grep -rnE "ngx[[:space:]]*(\.[[:space:]]*timer|\[[[:space:]]*[\"']timer)" \
		--include='*.lua' lua \
		| grep -v '^lua/resty/counter/lifecycle\.lua:' \
		| grep -vE '^[^:]+:[0-9]+:[[:space:]]*--'; then \
		echo "ngx.timer used outside lua/resty/counter/lifecycle.lua (above):"\
			"register a job with resty.counter.lifecycle"; exit 1; fi

# busted specs inside a real nginx worker (spec/resty/).
spec: build ## busted specs inside a real nginx worker (spec/resty/)
	$(LUAJIT) spec/run-in-nginx.lua

# Several workers, reloads, shutdown and the luarocks install, driven over
# HTTP from the host (spec/scenario/).
scenario: build ## several workers, reloads, Redis nodes, over HTTP
	COUNTER_ROOT=$(ROOT) $(LUAJIT) $(BUSTED) -o utfTerminal spec/scenario

# The short chaos run (about a minute), also part of `make test`.
chaos-short: build ## the short chaos run (about a minute)
	$(LUAJIT) spec/chaos/run.lua

# cargo fuzz needs rustup's nightly toolchain; `make fuzz` installs the
# cargo-fuzz command from crates.io when it is missing.
FUZZ_TARGETS := request_record report_render pending_store \
	ffi_calls int64_ops engine_table strict_ops request_admission
FUZZ_SECONDS ?= 60
RUSTUP_CARGO := $(HOME)/.cargo/bin/cargo

fuzz: ## cargo fuzz on outside input (FUZZ_SECONDS a target, 60)
	@$(RUSTUP_CARGO) +nightly --version >/dev/null 2>&1 || { \
		echo "make fuzz needs rustup's nightly toolchain"; exit 1; }
	@$(RUSTUP_CARGO) fuzz --version >/dev/null 2>&1 || \
		$(RUSTUP_CARGO) install cargo-fuzz --locked
	@# The run's output in a file: its last lines shown when it fails (a
	@# target that does not compile included), its summary when it passes.
	@set -e; out=$$(mktemp); trap 'rm -f "$$out"' EXIT; \
	for t in $(FUZZ_TARGETS); do \
		echo "cargo fuzz run $$t ($(FUZZ_SECONDS) s)"; \
		if ! $(RUSTUP_CARGO) +nightly fuzz run $$t -- \
			-max_total_time=$(FUZZ_SECONDS) > "$$out" 2>&1; then \
			tail -n 40 "$$out"; echo "cargo fuzz run $$t failed"; exit 1; \
		fi; \
		grep -E "^Done|panicked|ERROR|SUMMARY" "$$out" || true; \
	done

# In `make test`: 5 s a target when nightly and cargo-fuzz are there.
fuzz-short: ## 5 s a fuzz target, when nightly and cargo-fuzz are there
	@if $(RUSTUP_CARGO) +nightly --version >/dev/null 2>&1 && \
	    $(RUSTUP_CARGO) fuzz --version >/dev/null 2>&1; then \
		$(MAKE) --no-print-directory fuzz FUZZ_SECONDS=5; \
	else echo "SKIPPED: fuzzing (needs rustup's nightly and cargo-fuzz; see make fuzz)"; fi

# Builds with Debian 12's own rustc, the oldest toolchain we promise.
msrv-check: ## build with Debian 12's rustc 1.63 (the oldest promised)
	@test -x /usr/bin/rustc || { echo "no /usr/bin/rustc (apt-get install cargo)"; exit 1; }
	RUSTC=/usr/bin/rustc CARGO_TARGET_DIR=target/msrv \
	CARGO_UNSTABLE_SPARSE_REGISTRY=true \
	__CARGO_TEST_CHANNEL_OVERRIDE_DO_NOT_USE_THIS=nightly \
		/usr/bin/cargo build --release

# The Rust core on aarch64 (Graviton, Ampere, Apple hosts), cross-built and
# run under qemu-user (about 4 minutes): its tests (the lib's, the
# multi-process ones) once on an emulated CPU with LSE (caspal) and once on
# a Cortex-A57 (ARMv8.0: the ldaxp/stlxp loop), each checking that it took
# its path (RC_EXPECT_LSE); clippy for the target; then the cdylib with its
# default features (mlua's module mode links no LuaJIT). Release builds
# without LTO (its own target dir): the tests run ten times faster under
# qemu than in debug. rustup's std for the target is needed (Debian's rustc
# has none): without rustup, skipped.
AARCH64 := aarch64-unknown-linux-gnu
AARCH64_PACKAGES := gcc-aarch64-linux-gnu libc6-dev-arm64-cross qemu-user
AARCH64_ENV := CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc \
	CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER="qemu-aarch64 -L /usr/aarch64-linux-gnu"
AARCH64_TEST := $(AARCH64_ENV) CARGO_TARGET_DIR=target/aarch64-test \
	CARGO_PROFILE_RELEASE_LTO=false CARGO_PROFILE_RELEASE_CODEGEN_UNITS=16 \
	$(CARGO) test --release --target $(AARCH64) --no-default-features
aarch64-test: ## the Rust core's tests on aarch64 under qemu (both CAS paths)
	@if command -v rustup >/dev/null 2>&1 || test -x $(HOME)/.cargo/bin/rustup; then \
		$(MAKE) --no-print-directory aarch64-run; \
	else echo "SKIPPED: aarch64 (needs rustup for the target's std)"; fi

aarch64-run:
	$(call install_packages,$(AARCH64_PACKAGES))
	@PATH="$(HOME)/.cargo/bin:$$PATH"; rustup target list --installed | \
		grep -qx $(AARCH64) || rustup target add $(AARCH64)
	QEMU_CPU=max RC_EXPECT_LSE=1 $(AARCH64_TEST)
	QEMU_CPU=cortex-a57 RC_EXPECT_LSE=0 $(AARCH64_TEST)
	$(AARCH64_ENV) $(CARGO) clippy -q --target $(AARCH64) --all-targets -- -D warnings
	$(AARCH64_ENV) $(CARGO) clippy -q --target $(AARCH64) --no-default-features \
		--all-targets -- -D warnings
	$(AARCH64_ENV) $(CARGO) build --release --target $(AARCH64)

serve: build ## the demo, installing nothing first (PORT=8080)
	$(LUAJIT) examples/serve.lua $(PORT) $(RUN_DIR)

# OpenResty's components (nginx 1.29.2, lua-nginx-module 0.10.29, its LuaJIT,
# lua-resty-core 0.1.32, lua-resty-redis 0.33, resty-cli 0.32) built from the
# sources in ../shared/openresty into OPENRESTY_BUILD (about 1.5 minutes;
# nothing when built). nginx's workers load its lualib: when they cannot
# read this checkout (root master, mode-700 folder), build it elsewhere.
OPENRESTY_SRC ?= $(ROOT)/../shared/openresty
OPENRESTY_BUILD ?= $(ROOT)/target/openresty
openresty: ## build OpenResty's components from ../shared/openresty
	@test -f $(OPENRESTY_SRC)/build.sh || { \
		echo "no $(OPENRESTY_SRC)/build.sh: set OPENRESTY_SRC"; exit 1; }
	bash $(OPENRESTY_SRC)/build.sh $(OPENRESTY_BUILD)

# The originals' own suites (Test::Nginx) on ours and on the originals, on
# the stack in use, with their own worker settings and with 4 workers;
# both gate. See spec/peer.sh for why and for what it prints.
PEER_SRC ?= $(ROOT)/../shared/peer
peer: deps ## the original libraries' own test suites against ours
	@$(MAKE) --no-print-directory build
	bash spec/peer.sh $(PEER_SRC)

clean: ## remove what cargo built
	$(CARGO) clean
	rm -f resty_counter_core.so
