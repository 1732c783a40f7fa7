#!/usr/bin/env bash
# `make peer`: the original libraries' own Test::Nginx suites against ours
# (PEER/run.sh, default ../shared/peer; read its README), on the stack that
# spec/helpers/nginx.lua finds (Debian's nginx, or OPENRESTY_PREFIX's).
#
# Each suite runs twice: with its own worker setting, and with WORKERS=4.
# What gates (exit 1), and why:
#   kong        t/counter.t of Kong/lua-resty-counter: ours must pass as
#               many assertions as the original does.
#   greencheek  t/sanity.t of lua-request-counter: ours must pass every
#               assertion (it checks that a request shows in single_stats
#               right after it was served, which the shared engine gives).
#               Compared with the total, not with the original: the
#               original itself fails some runs here (its requests end in
#               500s), which says nothing of ours.
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
# The library is installed where nginx's workers (nobody, when the master
# is root) can read it, whatever the checkout's mode.
chmod 755 "$work"
tree=$work/tree
rc=0
for workers in "" 4; do
    out=$work/peer$workers.out
    label="$stack${workers:+, WORKERS=$workers}"
    if [ "$builtin" = builtin ]; then
        # run.sh takes the binary in NGINX and leaves it in the environment
        # Test::Nginx starts nginx with; nginx reads NGINX itself (sockets
        # inherited in a binary upgrade) and then does not daemonize, and
        # the suite hangs. The wrapper unsets it.
        printf '#!/bin/sh\nunset NGINX\nexec %s "$@"\n' "$nginx" >"$work/nginx"
        chmod +x "$work/nginx"
        WORKERS=$workers NGINX=$work/nginx LOAD_MODULES="" bash "$PEER/run.sh" "$tree" 2>&1 | tee "$out"
    else
        WORKERS=$workers env -u NGINX bash "$PEER/run.sh" "$tree" 2>&1 | tee "$out"
    fi
    status=${PIPESTATUS[0]}
    if [ "$status" = 2 ]; then
        echo "peer ($label): setup error"
        rc=1
        continue
    fi

    # "kong t/counter.t on ours: 15/15 passed" -> 15/15
    passed() { sed -n "s|^$1 [^ ]* on $2: \([0-9]*/[0-9]*\) passed.*|\1|p" "$out"; }
    for suite in kong greencheek; do
        orig=$(passed $suite orig)
        ours=$(passed $suite ours)
        if [ -z "$ours" ] || [ "${ours#*/}" = 0 ]; then
            verdict="did not run"
            rc=1
        elif [ $suite = kong ]; then
            if [ -n "$orig" ] && [ "${ours%/*}" -lt "${orig%/*}" ]; then
                verdict="fewer than the original"
                rc=1
            else
                verdict="not fewer than the original"
            fi
        elif [ "${ours%/*}" != "${ours#*/}" ]; then
            verdict="not every assertion"
            rc=1
        else
            verdict="every assertion"
        fi
        echo "peer ($label): $suite: ours ${ours:-?}, the original ${orig:-?}" \
            "passed: $verdict"
    done
done
exit $rc
