#!/usr/bin/env bash
# Runs the whole Thalo test suite: unit, integration, UI (trybuild) and doc tests.
#
# It brings up what the tests need and stops what it started:
#   - PostgreSQL at DATABASE_URL (default postgres://postgres@127.0.0.1:5432/thalo_test):
#     starts the local cluster if it is installed and down, creates the test database.
#   - A Kafka-compatible broker at KAFKA_BROKERS (default 127.0.0.1:9092): when none
#     answers, installs the pinned `tansu` broker from crates.io (once) and runs it in
#     the background for the duration of the suite.
#   - A throwaway PostgreSQL cluster that accepts only TLS (scripts/tls-postgres.sh),
#     for the TLS tests; stopped and deleted at the end.
# It exports THALO_REQUIRE_SERVICES=1, which turns a missing service into a test failure,
# and fails if any test was skipped (ignored). Then it runs the fault-injection suite
# (bank-faults, FAULTS_SECONDS of load and faults, 45 by default; see RELIABILITY.md).
set -euo pipefail

cd "$(dirname "$0")/.."

export THALO_REQUIRE_SERVICES=1
export DATABASE_URL="${DATABASE_URL:-postgres://postgres@127.0.0.1:5432/thalo_test}"
export KAFKA_BROKERS="${KAFKA_BROKERS:-127.0.0.1:9092}"
export PATH="$HOME/.cargo/bin:$PATH"
TANSU_VERSION="0.6.0"

log() { printf '\n==> %s\n' "$*" >&2; }

# host and port of a URL like postgres://user@host:port/db
pg_host_port() {
    local rest="${DATABASE_URL#*://}"
    rest="${rest#*@}"
    rest="${rest%%/*}"
    PG_HOST="${rest%%:*}"
    PG_PORT="${rest##*:}"
    [ "$PG_PORT" = "$rest" ] && PG_PORT=5432
    PG_DB="${DATABASE_URL##*/}"
    PG_DB="${PG_DB%%\?*}"
    PG_ADMIN_URL="${DATABASE_URL%/*}/postgres"
}

port_open() { timeout 1 bash -c "</dev/tcp/$1/$2" 2>/dev/null; }

ensure_postgres() {
    pg_host_port
    if ! port_open "$PG_HOST" "$PG_PORT"; then
        if command -v pg_ctlcluster >/dev/null 2>&1 && [ -d /etc/postgresql ]; then
            log "starting the local PostgreSQL cluster"
            pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -n 1)" main start || true
        fi
        for _ in $(seq 1 30); do port_open "$PG_HOST" "$PG_PORT" && break; sleep 1; done
    fi
    if ! port_open "$PG_HOST" "$PG_PORT"; then
        echo "error: PostgreSQL is not reachable at $PG_HOST:$PG_PORT (DATABASE_URL=$DATABASE_URL)" >&2
        exit 1
    fi
    if command -v psql >/dev/null 2>&1; then
        if ! psql "$PG_ADMIN_URL" -tAc "SELECT 1 FROM pg_database WHERE datname = '$PG_DB'" | grep -q 1; then
            log "creating database $PG_DB"
            psql "$PG_ADMIN_URL" -c "CREATE DATABASE \"$PG_DB\"" >/dev/null || true
        fi
    fi
    log "PostgreSQL ready at $PG_HOST:$PG_PORT/$PG_DB"
}

BROKER_PID=""
BROKER_DIR=""
stop_broker() {
    if [ -n "$BROKER_PID" ] && kill -0 "$BROKER_PID" 2>/dev/null; then
        log "stopping the broker (pid $BROKER_PID)"
        kill "$BROKER_PID" 2>/dev/null || true
        wait "$BROKER_PID" 2>/dev/null || true
    fi
    if [ -n "$BROKER_DIR" ]; then
        rm -rf "$BROKER_DIR"
    fi
    return 0
}
TLS_PG_DIR=""
stop_tls_postgres() {
    if [ -n "$TLS_PG_DIR" ]; then
        log "stopping the TLS-only PostgreSQL cluster"
        scripts/tls-postgres.sh stop "$TLS_PG_DIR"
    fi
    return 0
}

cleanup() {
    stop_broker
    stop_tls_postgres
}
trap cleanup EXIT

# A throwaway cluster that accepts only TLS connections, with a CA and a server
# certificate made for it, for the TLS tests (THALO_TLS_DATABASE_URL and friends).
start_tls_postgres() {
    TLS_PG_DIR="$(mktemp -d)"
    log "starting a TLS-only PostgreSQL cluster in $TLS_PG_DIR"
    local env
    if ! env="$(scripts/tls-postgres.sh start "$TLS_PG_DIR")"; then
        cat "$TLS_PG_DIR"/*.log >&2 2>/dev/null || true
        echo "error: cannot start the TLS-only PostgreSQL cluster (needs initdb and openssl)" >&2
        exit 1
    fi
    eval "$env"
}

ensure_tansu() {
    # Needed even when another broker is reachable: the broker-restart test runs its own.
    if ! command -v tansu >/dev/null 2>&1 || ! tansu --version 2>/dev/null | grep -q "$TANSU_VERSION"; then
        log "installing the tansu $TANSU_VERSION broker from crates.io (once; about 10 minutes)"
        cargo install tansu --locked --version "$TANSU_VERSION" --features dynostore,libsql
    fi
    TANSU_BIN="$(command -v tansu)"
    export TANSU_BIN
}

ensure_kafka() {
    local first="${KAFKA_BROKERS%%,*}"
    local host="${first%%:*}" port="${first##*:}"
    ensure_tansu
    if port_open "$host" "$port"; then
        log "Kafka-compatible broker already reachable at $first"
        return
    fi
    BROKER_DIR="$(mktemp -d)"
    log "starting tansu at $first"
    tansu broker \
        --listener-url "tcp://$host:$port" \
        --advertised-listener-url "tcp://$host:$port" \
        --storage-engine memory://tansu/ \
        >"$BROKER_DIR/broker.log" 2>&1 &
    BROKER_PID=$!
    for _ in $(seq 1 60); do
        port_open "$host" "$port" && break
        if ! kill -0 "$BROKER_PID" 2>/dev/null; then
            cat "$BROKER_DIR/broker.log" >&2
            echo "error: the broker exited at start" >&2
            exit 1
        fi
        sleep 0.5
    done
    port_open "$host" "$port" || { cat "$BROKER_DIR/broker.log" >&2; echo "error: the broker did not start" >&2; exit 1; }
    log "broker ready (pid $BROKER_PID)"
}

check_compose() {
    if ! command -v docker-compose >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        log "installing docker-compose (to validate docker-compose.yml)"
        (apt-get update -qq && apt-get install -y -qq docker-compose) >/dev/null 2>&1 || true
    fi
    if command -v docker-compose >/dev/null 2>&1; then
        log "validating docker-compose.yml"
        docker-compose -f docker-compose.yml config -q
    else
        echo "error: docker-compose is not installed; cannot validate docker-compose.yml" >&2
        exit 1
    fi
}

[ -f docker-compose.yml ] && check_compose
ensure_postgres
ensure_kafka
start_tls_postgres

log "running the test suite"
out="$(mktemp)"
set +e
cargo test --workspace 2>&1 | tee "$out"
status=${PIPESTATUS[0]}
if [ "$status" -eq 0 ]; then
    # The OpenTelemetry bridges are behind the `opentelemetry` features, which
    # `--workspace` leaves off: their tests run here (`otel_trace`, one trace through
    # Postgres, the relay, the broker and the consumers, needs the services above).
    log "running the opentelemetry feature's tests"
    cargo test -p thalo -p thalo-kafka --features opentelemetry --lib --test trace_context --test otel_trace 2>&1 | tee -a "$out"
    status=${PIPESTATUS[0]}
fi
if [ "$status" -eq 0 ]; then
    # The `thalo-relay` binary is behind thalo-kafka's `cli` feature, off by default (and
    # so off under `--workspace`): its unit tests, and the test that runs it
    # (`relay_binary`, `required-features = ["cli"]`), run here.
    log "running the thalo-relay binary's tests (feature cli)"
    cargo test -p thalo-kafka --features cli --bin thalo-relay --test relay_binary 2>&1 | tee -a "$out"
    status=${PIPESTATUS[0]}
fi
set -e

if [ "$status" -ne 0 ]; then
    echo "error: the test suite failed" >&2
    exit "$status"
fi
if grep -E '^test result: .* [1-9][0-9]* ignored' "$out" >/dev/null; then
    echo "error: some tests were ignored; every test must run in CI" >&2
    exit 1
fi
passed=$(grep -E '^test result:' "$out" | sed -E 's/.* ([0-9]+) passed.*/\1/' | awk '{s+=$1} END {print s+0}')
failed=$(grep -E '^test result:' "$out" | sed -E 's/.* ([0-9]+) failed.*/\1/' | awk '{s+=$1} END {print s+0}')
rm -f "$out"

# The fault-injection suite (see RELIABILITY.md): the bank service under SIGKILLs,
# terminated Postgres sessions and broker freezes, with idempotent clients; then the
# exactly-once checks. It runs its own tansu broker on a free port.
FAULTS_SECONDS="${FAULTS_SECONDS:-45}"
log "running the fault-injection suite (${FAULTS_SECONDS} s of load and faults)"
cargo build -q -p bank -p bank-faults
if ! cargo run -q -p bank-faults -- --seconds "$FAULTS_SECONDS" --report target/faults-report.md; then
    echo "error: the fault-injection suite failed" >&2
    exit 1
fi

echo
echo "all: $passed passed, $failed failed; fault-injection suite passed (figures in target/faults-report.md)"
exit 0
