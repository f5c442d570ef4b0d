#!/usr/bin/env bash
# Development secrets for the docker-compose stack (deploy/README.md): a private CA, a server certificate for
# the teacher service (names ray-head, localhost, 127.0.0.1) signed by it, and a bearer token, written to
# DIR (default ./secrets, which .gitignore keeps out of version control). docker-compose.yml mounts them as
# Docker secrets. Existing files are kept; delete DIR to make new ones. Never use these in production.
#     bash scripts/make_dev_secrets.sh [DIR]        (or: make dev-secrets)
set -euo pipefail

dir="${1:-secrets}"
mkdir -p "$dir"
chmod 700 "$dir"
cd "$dir"

if [[ ! -f ca.crt ]]; then
  openssl req -x509 -new -nodes -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -days 825 \
    -subj "/CN=ekd development CA" -keyout ca.key -out ca.crt 2>/dev/null
fi
if [[ ! -f server.crt ]]; then
  openssl req -new -nodes -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 \
    -subj "/CN=ekd teacher service" -keyout server.key -out server.csr 2>/dev/null
  openssl x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 825 -out server.crt \
    -extfile <(printf 'subjectAltName=DNS:ray-head,DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n') \
    2>/dev/null
  rm -f server.csr ca.srl
fi
if [[ ! -f token ]]; then
  (umask 077 && openssl rand -hex 32 >token)
fi
# The containers run as user 10001, not as the owner of these files: they must be readable by others. The
# directory (700) keeps other users of this machine out; the CA key stays owner-only.
chmod 644 ca.crt server.crt server.key token
chmod 600 ca.key
echo "wrote $(pwd)/{ca.crt,server.crt,server.key,token}"
