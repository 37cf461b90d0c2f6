#!/usr/bin/env bash
# Runs Strata's whole test suite on a fresh machine: installs what the tests
# need (PostgreSQL 15-18 servers, client tools), checks formatting and lints,
# then runs every test against real PostgreSQL clusters.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" = 0 ]; then
    scripts/install-test-deps.sh
else
    sudo scripts/install-test-deps.sh
fi

cargo fmt --all --check
cargo clippy --workspace --all-targets -- -D warnings
log=$(mktemp)
trap 'rm -f "$log"' EXIT
# The pipeline's failure must not end the script before the summary below.
set +e
cargo test --workspace --all-targets --no-fail-fast 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
set -e
# One closing line for the whole run (cargo prints one per test binary), then
# each failed test as `binary: test`.
awk '/^ +Running .*\(/ { bin = $0; sub(/.*\(/, "", bin); sub(/\).*/, "", bin); sub(/.*\//, "", bin); sub(/-[0-9a-f]+$/, "", bin) }
     /^test .* \.\.\. FAILED$/ { failed[++n] = bin ": " $2 }
     /^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i } }
     END { printf "tests: %d passed, %d failed\n", p, f; for (i = 1; i <= n; i++) print "FAILED " failed[i] }' "$log"
if [ "$status" -ne 0 ]; then
    grep -q '^test .* \.\.\. FAILED$' "$log" ||
        echo "cargo test failed (exit $status) without a failed test to name: a build error or a crashed test binary, see above"
    exit "$status"
fi
