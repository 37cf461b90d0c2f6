#!/usr/bin/env bash
# Calls Strata's RDS-compatible API with curl, signing the request with the
# V2 HMAC-SHA1 scheme (what the Alibaba Cloud SDKs send with
# signature_algorithm='v2'), using only bash, openssl and curl.
#
#   scripts/rds-curl.sh ACTION [Name=Value ...]
#   scripts/rds-curl.sh DescribeBackups DBInstanceId=demo PageSize=30
#
# Environment: STRATA_ENDPOINT (default http://127.0.0.1:8080), and the key
# pair from STRATA_KEY_ID/STRATA_KEY_SECRET or from the JSON file
# STRATA_KEY_FILE (default ./strata-data/admin-key.json).
set -euo pipefail
[ $# -ge 1 ] || { sed -n '2,12p' "$0" >&2; exit 2; }
ENDPOINT=${STRATA_ENDPOINT:-http://127.0.0.1:8080}
KEY_FILE=${STRATA_KEY_FILE:-strata-data/admin-key.json}
if [ -z "${STRATA_KEY_ID:-}" ]; then
    STRATA_KEY_ID=$(sed -n 's/.*"AccessKeyId": *"\([^"]*\)".*/\1/p' "$KEY_FILE")
    STRATA_KEY_SECRET=$(sed -n 's/.*"AccessKeySecret": *"\([^"]*\)".*/\1/p' "$KEY_FILE")
fi

# RFC 3986 percent-encoding of one value (UTF-8 bytes).
enc() {
    local s=$1 out="" c i
    local LC_ALL=C
    for ((i = 0; i < ${#s}; i++)); do
        c=${s:i:1}
        case $c in
            [A-Za-z0-9._~-]) out+=$c ;;
            *) out+=$(printf '%%%02X' "'$c") ;;
        esac
    done
    printf '%s' "$out"
}

params=("Action=$1" "Version=2014-08-15" "Format=JSON" "AccessKeyId=$STRATA_KEY_ID"
        "SignatureMethod=HMAC-SHA1" "SignatureVersion=1.0"
        "SignatureNonce=$(openssl rand -hex 16)" "Timestamp=$(date -u +%Y-%m-%dT%H:%M:%SZ)")
shift
params+=("$@")

pairs=()
for p in "${params[@]}"; do
    pairs+=("$(enc "${p%%=*}")=$(enc "${p#*=}")")
done
query=$(printf '%s\n' "${pairs[@]}" | LC_ALL=C sort | paste -sd '&')
signature=$(printf 'GET&%%2F&%s' "$(enc "$query")" \
    | openssl dgst -sha1 -hmac "$STRATA_KEY_SECRET&" -binary | openssl base64 -A)
curl -sS "$ENDPOINT/?$query&Signature=$(enc "$signature")"
echo
