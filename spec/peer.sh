#!/usr/bin/env bash
# `make peer`: the original libraries' own Test::Nginx suites against ours
# (PEER/run.sh, default ../shared/peer; read its README), on the stack that
# spec/helpers/nginx.lua finds (Debian's nginx, or OPENRESTY_PREFIX's).
#
# What gates (exit 1) and what is only reported, and why:
#   kong        t/counter.t of Kong/lua-resty-counter: ours must pass as
#               many assertions as the original does. It passes today on
#               both stacks, so any loss is a regression.
#   greencheek  t/sanity.t of lua-request-counter: reported, not gating.
#               It checks that a request shows in single_stats right after
#               it was served; ours keeps each worker's records and
#               flushes them to the dict on a timer, so a read is not
#               exact at once until the shared-memory engine lands.
#               Expected to fail until then; its lines still show a change.
# Exits 0 with a SKIPPED line when there is no PEER/run.sh.
set -uo pipefail
cd "$(dirname "$0")/.."

PEER=${1:-../shared/peer}
if ! [ -f "$PEER/run.sh" ]; then
    echo "SKIPPED: the peer suites (no $PEER/run.sh)"
    exit 0
fi

read -r stack nginx builtin < <(luajit -e '
    package.path = "spec/?.lua;" .. package.path
    local s = require("helpers.nginx").stack
    print(s.name, s.nginx, #s.modules == 0 and "builtin" or "modules")')

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
out=$work/peer.out
if [ "$builtin" = builtin ]; then
    # run.sh takes the binary in NGINX and leaves it in the environment
    # Test::Nginx starts nginx with; nginx reads NGINX itself (sockets
    # inherited in a binary upgrade) and then does not daemonize, and the
    # suite hangs. The wrapper unsets it.
    printf '#!/bin/sh\nunset NGINX\nexec %s "$@"\n' "$nginx" >"$work/nginx"
    chmod +x "$work/nginx"
    NGINX=$work/nginx LOAD_MODULES="" bash "$PEER/run.sh" 2>&1 | tee "$out"
else
    env -u NGINX bash "$PEER/run.sh" 2>&1 | tee "$out"
fi
status=${PIPESTATUS[0]}
if [ "$status" = 2 ]; then
    echo "peer ($stack): setup error"
    exit 1
fi

# "kong t/counter.t on ours: 15/15 passed" -> 15/15
passed() { sed -n "s|^$1 [^ ]* on $2: \([0-9]*/[0-9]*\) passed.*|\1|p" "$out"; }
rc=0
for suite in kong greencheek; do
    orig=$(passed $suite orig)
    ours=$(passed $suite ours)
    if [ -z "$orig" ] || [ -z "$ours" ] || [ "${orig%/*}" = 0 ]; then
        verdict="did not run"
    elif [ "${ours%/*}" -lt "${orig%/*}" ]; then
        verdict="fewer than the original"
    else
        verdict="not fewer than the original"
    fi
    role="reported only"
    if [ $suite = kong ]; then
        role=gating
        [ "$verdict" = "not fewer than the original" ] || rc=1
    fi
    echo "peer ($stack): $suite: ours ${ours:-?}, the original ${orig:-?}" \
        "passed: $verdict ($role)"
done
exit $rc
