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
cargo test --workspace
