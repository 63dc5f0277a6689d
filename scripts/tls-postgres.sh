#!/usr/bin/env bash
# Starts a throwaway PostgreSQL cluster that accepts only TLS connections, for the TLS
# tests: a CA and a server certificate for 127.0.0.1 made here, `ssl = on`, a port of
# its own, and pg_hba.conf with `hostssl` lines only (a plaintext connection is
# refused). Prints the shell lines that export its URLs:
#
#   eval "$(scripts/tls-postgres.sh start DIR)"   # THALO_TLS_DATABASE_URL, THALO_TLS_CA, ...
#   scripts/tls-postgres.sh stop DIR
#
# initdb refuses to run as root; as root the cluster runs as the `postgres` user.
set -euo pipefail

cmd="${1:-}"
dir="${2:-}"
[ -n "$cmd" ] && [ -n "$dir" ] || { echo "usage: $0 start|stop DIR" >&2; exit 2; }

bindir="$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)"
[ -n "$bindir" ] || bindir="$(dirname "$(command -v initdb || echo /usr/bin/initdb)")"

as_owner() {
    if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

case "$cmd" in
start)
    mkdir -p "$dir"
    [ "$(id -u)" = 0 ] && chown postgres "$dir"
    port="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')"

    # A CA, a server certificate for 127.0.0.1 and localhost signed by it, and another
    # CA that signed nothing (for the wrong-CA test).
    openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj "/CN=thalo test CA" \
        -keyout "$dir/ca.key" -out "$dir/ca.pem" >/dev/null 2>&1
    openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj "/CN=another CA" \
        -keyout "$dir/other-ca.key" -out "$dir/other-ca.pem" >/dev/null 2>&1
    openssl req -newkey rsa:2048 -nodes -subj "/CN=127.0.0.1" \
        -keyout "$dir/server.key" -out "$dir/server.csr" >/dev/null 2>&1
    printf 'subjectAltName=IP:127.0.0.1,DNS:localhost\n' >"$dir/san.ext"
    openssl x509 -req -in "$dir/server.csr" -CA "$dir/ca.pem" -CAkey "$dir/ca.key" \
        -CAcreateserial -days 2 -extfile "$dir/san.ext" -out "$dir/server.pem" >/dev/null 2>&1
    chmod 0644 "$dir"/*.pem
    chmod 0600 "$dir/server.key"
    [ "$(id -u)" = 0 ] && chown postgres "$dir/server.key" "$dir/server.pem"

    as_owner "$bindir/initdb" -D "$dir/data" -U postgres --auth=trust >"$dir/initdb.log" 2>&1
    cat >>"$dir/data/postgresql.conf" <<CONF
port = $port
listen_addresses = '127.0.0.1'
unix_socket_directories = '$dir'
ssl = on
ssl_cert_file = '$dir/server.pem'
ssl_key_file = '$dir/server.key'
max_connections = 60
fsync = off
CONF
    cat >"$dir/data/pg_hba.conf" <<HBA
local   all all                trust
hostssl all all 127.0.0.1/32   trust
HBA
    as_owner "$bindir/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w -t 60 start >/dev/null
    echo "export THALO_TLS_DATABASE_URL='postgres://postgres@127.0.0.1:$port/postgres?sslmode=verify-full&sslrootcert=$dir/ca.pem'"
    echo "export THALO_TLS_WRONG_CA_URL='postgres://postgres@127.0.0.1:$port/postgres?sslmode=verify-full&sslrootcert=$dir/other-ca.pem'"
    echo "export THALO_TLS_PLAINTEXT_URL='postgres://postgres@127.0.0.1:$port/postgres?sslmode=disable'"
    ;;
stop)
    if [ -f "$dir/data/postmaster.pid" ]; then
        as_owner "$bindir/pg_ctl" -D "$dir/data" -m immediate -w stop >/dev/null 2>&1 || true
    fi
    rm -rf "$dir"
    ;;
*)
    echo "usage: $0 start|stop DIR" >&2
    exit 2
    ;;
esac
