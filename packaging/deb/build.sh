#!/bin/sh
# Builds the Debian package of Strata with dpkg-deb: strata_<version>_<arch>.deb.
#
#   packaging/deb/build.sh [--binary PATH] [--out DIR] [--fast]
#
# Without --binary it builds the release binary first
# (cargo build --profile quickstart -p strata: the release optimizations
# without debug information). The version is the workspace's, from Cargo.toml.
# --fast compresses with gzip -1 instead of xz (for tests: seconds, not minutes).
# The Maintainer field is "$DEBFULLNAME <$DEBEMAIL>" when both are set.
# Needs dpkg-deb, objcopy and objdump (binutils). Prints the package's path.
set -eu

here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
binary=
out=$root/target/debian
compress="-Zxz"
while [ $# -gt 0 ]; do
    case "$1" in
        --binary) binary=$2; shift 2 ;;
        --out) out=$2; shift 2 ;;
        --fast) compress="-Zgzip -z1"; shift ;;
        -h|--help) sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "build.sh: unknown argument $1" >&2; exit 2 ;;
    esac
done

if [ -z "$binary" ]; then
    (cd "$root" && cargo build --profile quickstart -p strata)
    binary=$root/target/quickstart/strata
fi
[ -x "$binary" ] || { echo "build.sh: no executable at $binary" >&2; exit 1; }

# The [workspace.package] version of the top Cargo.toml.
version=$(sed -n '/^\[workspace.package\]/,/^\[/s/^version *= *"\([^"]*\)".*/\1/p' "$root/Cargo.toml")
[ -n "$version" ] || { echo "build.sh: no version in $root/Cargo.toml" >&2; exit 1; }
arch=$(dpkg --print-architecture)
maintainer="Strata maintainers <strata@localhost>"
if [ -n "${DEBFULLNAME:-}" ] && [ -n "${DEBEMAIL:-}" ]; then
    maintainer="$DEBFULLNAME <$DEBEMAIL>"
fi

mkdir -p "$out"
stage=$(mktemp -d "$out/stage.XXXXXX")
trap 'rm -rf "$stage"' EXIT
umask 022
chmod 0755 "$stage"

install -d "$stage/DEBIAN" "$stage/usr/bin" "$stage/lib/systemd/system" \
    "$stage/etc/default" "$stage/usr/share/doc/strata"
install -d -m 0750 "$stage/etc/strata"
# Debug information stays out of the package; the symbols stay, for readable
# backtraces, as the quickstart profile keeps them.
objcopy --strip-debug "$binary" "$stage/usr/bin/strata"
chmod 0755 "$stage/usr/bin/strata"
install -m 0644 "$here/files/strata.service" "$here/files/strata-agent.service" "$stage/lib/systemd/system/"
install -m 0640 "$here/files/strata.toml" "$stage/etc/strata/strata.toml"
install -m 0644 "$here/files/strata-agent.default" "$stage/etc/default/strata-agent"
install -m 0644 "$root/README.md" "$stage/usr/share/doc/strata/README.md"
install -m 0644 "$here/debian/copyright" "$stage/usr/share/doc/strata/copyright"
printf 'strata (%s) unstable; urgency=medium\n\n  * Release %s.\n\n -- %s  %s\n' \
    "$version" "$version" "$maintainer" "$(date -R -u -d @"${SOURCE_DATE_EPOCH:-$(date +%s)}")" |
    gzip -9n >"$stage/usr/share/doc/strata/changelog.Debian.gz"
chmod 0644 "$stage/usr/share/doc/strata/changelog.Debian.gz"

for script in postinst prerm postrm; do
    install -m 0755 "$here/debian/$script" "$stage/DEBIAN/$script"
done
printf '/etc/strata/strata.toml\n/etc/default/strata-agent\n' >"$stage/DEBIAN/conffiles"

# libc6 at least as new as the newest symbol version the binary uses.
glibc=$(objdump -T "$stage/usr/bin/strata" | sed -n 's/.*GLIBC_\([0-9.]*\).*/\1/p' | sort -V | tail -n 1)
size=$(du -sk --exclude=DEBIAN "$stage" | cut -f1)
sed -e "s/@VERSION@/$version/" -e "s|@MAINTAINER@|$maintainer|" -e "s/@ARCH@/$arch/" -e "s/@GLIBC@/$glibc/" -e "s/@SIZE@/$size/" \
    "$here/debian/control.in" >"$stage/DEBIAN/control"

deb=$out/strata_${version}_${arch}.deb
# shellcheck disable=SC2086 # two words with --fast
dpkg-deb --root-owner-group $compress --build "$stage" "$deb" >/dev/null
echo "$deb"
