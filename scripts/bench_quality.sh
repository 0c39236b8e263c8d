#!/usr/bin/env bash
# Routing-quality benchmark over HTTP, loopback only, bounded in time.
#
# One multi-turn trace (Mooncake format plus session ids; default tests/fixtures/replay_trace.jsonl)
# is replayed open-loop by examples/replay through each router in turn, in front of the same N HTTP
# mock replicas (examples/mock_replica: continuous batching, prefix KV cache, vLLM metrics):
#   gw-affinity   this crate's examples/gateway.rs --policy affinity
#   gw-least      this crate's examples/gateway.rs --policy least-loaded
#   sglang-ca     sglang-router==0.3.2 --policy cache_aware
#   vllm-ch       vllm-router==0.1.17 --policy consistent_hash
#   vllm-rr       vllm-router==0.1.17 --policy round_robin (the floor)
# Every run starts fresh mock replicas and a fresh router, so each starts with cold caches and an
# empty routing state. Two variants: "keyed" (the session id in x-session-id) and "nosession" (no
# header). --runs rounds; the router order is reversed every other round. Reported per router and
# variant, medians over rounds: TTFT p50/p95, e2e p95, prefix-cache hit rate (from the replicas'
# vllm:prefix_cache_* counters), the busiest replica's share of computed prefill tokens, errors
# (summed), and per-round ratios to the best peer (sglang-* / vllm-*) of the same round and variant.
#
# --gateways N runs N routers of each kind side by side in front of the same replicas, the replay
# spreading requests over them in turn (as an L4 balancer would, whatever the session); this
# crate's gateways then share one redis-server (--counter-store redis://..., so pins and quotas are
# cluster-wide); the peers have no shared state to give.
#
# --redis-outage AT,FOR (with --gateways 2 or more) kills that redis-server AT seconds into each of
# this crate's replays and starts an empty one on the same port FOR seconds later: every request
# must still be served, and the gateways must find the new server by themselves. After each such
# run the gateways' store error counters and the new server's key count are logged (keys > 0: the
# gateways wrote to it again without a restart).
#
# usage: scripts/bench_quality.sh [--runs N] [--replicas N] [--gateways N] [--trace FILE] [--speed X]
#            [--time-scale X] [--only name,name] [--variants keyed,nosession] [--out FILE]
#            [--redis-outage AT,FOR] [--gw-flags "FLAG VALUE ..."]
# --gw-flags adds flags to this crate's gateways (for an ablation, e.g. "--implicit-sessions off").
# env:   PEERS_VENV (default /work/peers-venv if present, else ~/.cache/replica-router/peers-venv)
#        NO_INSTALL=1 to never install anything (fail instead); NO_BUILD=1 to use built binaries
set -euo pipefail

# ---------------------------------------------------------------- build (the one place to change)
# The gateway and the mock are workspace members used by the root examples.
BUILD_CMD=(cargo build -q --release --example gateway --example mock_replica --example replay)
BIN_DIR=target/release/examples
GW_BIN=gateway
MOCK_BIN=mock_replica
REPLAY_BIN=replay

RUNS=1
REPLICAS=4
GATEWAYS=1
TRACE=""
SPEED=2
TIME_SCALE=5
ONLY=""
VARIANTS="keyed,nosession"
OUT=""
MODEL=mock-llama-3-70b
OUTAGE=""
GW_FLAGS=""
while [ $# -gt 0 ]; do
    case "$1" in
        --runs) RUNS="$2"; shift 2 ;;
        --replicas) REPLICAS="$2"; shift 2 ;;
        --gateways) GATEWAYS="$2"; shift 2 ;;
        --trace) TRACE="$2"; shift 2 ;;
        --speed) SPEED="$2"; shift 2 ;;
        --time-scale) TIME_SCALE="$2"; shift 2 ;;
        --only) ONLY="$2"; shift 2 ;;
        --variants) VARIANTS="$2"; shift 2 ;;
        --out) OUT="$2"; shift 2 ;;
        --redis-outage) OUTAGE="$2"; shift 2 ;;
        --gw-flags) GW_FLAGS="$2"; shift 2 ;;
        -h|--help) sed -n '2,30p' "$0"; exit 0 ;;
        *) echo "unknown argument: $1" >&2; exit 2 ;;
    esac
done
case "$RUNS" in ''|*[!0-9]*|0) echo "--runs must be a positive integer" >&2; exit 2 ;; esac
case "$REPLICAS" in ''|*[!0-9]*|0) echo "--replicas must be a positive integer" >&2; exit 2 ;; esac
[ "$REPLICAS" -le 64 ] || { echo "--replicas: at most 64" >&2; exit 2; }
case "$GATEWAYS" in ''|*[!0-9]*|0) echo "--gateways must be a positive integer" >&2; exit 2 ;; esac
[ "$GATEWAYS" -le 8 ] || { echo "--gateways: at most 8" >&2; exit 2; }
OUTAGE_AT=""; OUTAGE_FOR=""
if [ -n "$OUTAGE" ]; then
    IFS=, read -r OUTAGE_AT OUTAGE_FOR <<<"$OUTAGE"
    case "$OUTAGE_AT$OUTAGE_FOR" in ''|*[!0-9]*) echo "--redis-outage AT,FOR: whole seconds" >&2; exit 2 ;; esac
    [ -n "$OUTAGE_FOR" ] || { echo "--redis-outage AT,FOR: whole seconds" >&2; exit 2; }
    [ "$GATEWAYS" -gt 1 ] || { echo "--redis-outage needs --gateways 2 or more" >&2; exit 2; }
fi

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
[ -n "$TRACE" ] || TRACE="$REPO/tests/fixtures/replay_trace.jsonl"
TRACE="$(cd "$(dirname "$TRACE")" && pwd)/$(basename "$TRACE")"
[ -f "$TRACE" ] || { echo "no trace at $TRACE" >&2; exit 2; }
log() { echo "[quality] $*" >&2; }

# ---------------------------------------------------------------- tools
command -v curl >/dev/null || { [ "${NO_INSTALL:-0}" = 1 ] && exit 1; apt-get update -qq >&2; DEBIAN_FRONTEND=noninteractive apt-get install -y -qq curl >&2; }
if [ -z "${PEERS_VENV:-}" ]; then
    if [ -x /work/peers-venv/bin/python ]; then PEERS_VENV=/work/peers-venv
    else PEERS_VENV="${XDG_CACHE_HOME:-$HOME/.cache}/replica-router/peers-venv"; fi
fi
case "$PEERS_VENV" in "$REPO"|"$REPO"/*) echo "PEERS_VENV must be outside the repository" >&2; exit 2 ;; esac
peer_version() { "$PEERS_VENV/bin/python" -m pip show "$1" 2>/dev/null | awk '/^Version:/{print $2}'; }
if [ "$(peer_version sglang-router)" != 0.3.2 ] || [ "$(peer_version vllm-router)" != 0.1.17 ]; then
    [ "${NO_INSTALL:-0}" = 1 ] && { log "peers missing in $PEERS_VENV, and NO_INSTALL=1"; exit 1; }
    log "installing the peers into $PEERS_VENV"
    [ -x "$PEERS_VENV/bin/python" ] || python3 -m venv "$PEERS_VENV"
    "$PEERS_VENV/bin/python" -m pip install -q sglang-router==0.3.2 vllm-router==0.1.17 >&2
fi
if [ "${NO_BUILD:-0}" != 1 ]; then
    log "building: ${BUILD_CMD[*]}"
    (cd "$REPO" && "${BUILD_CMD[@]}" >&2)
fi
GW="$REPO/$BIN_DIR/$GW_BIN"; MOCK="$REPO/$BIN_DIR/$MOCK_BIN"; REPLAY="$REPO/$BIN_DIR/$REPLAY_BIN"
for b in "$GW" "$MOCK" "$REPLAY"; do [ -x "$b" ] || { log "missing $b"; exit 1; }; done
if [ "$GATEWAYS" -gt 1 ] && ! command -v redis-server >/dev/null; then
    [ "${NO_INSTALL:-0}" = 1 ] && { log "--gateways $GATEWAYS needs redis-server"; exit 1; }
    apt-get update -qq >&2; DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >&2
fi

# ---------------------------------------------------------------- scratch, processes, cleanup
TMP="$(mktemp -d /tmp/bench_quality.XXXXXX)"
PGIDS=()
cleanup() {
    local pg f
    # Process groups started by background outage controllers (their PGIDS is their own).
    for f in "$TMP"/*.pgid; do [ -f "$f" ] && PGIDS+=("$(cat "$f")"); done
    for pg in "${PGIDS[@]}"; do kill -TERM -- "-$pg" 2>/dev/null || true; done
    sleep 0.3
    for pg in "${PGIDS[@]}"; do kill -KILL -- "-$pg" 2>/dev/null || true; done
    rm -rf "$TMP"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# start NAME CMD...: runs CMD in a new session (its own process group), logs in $TMP/NAME.log;
# sets STARTED to its process group id.
start() {
    local name="$1"; shift
    setsid "$@" >"$TMP/$name.log" 2>&1 </dev/null &
    STARTED="$!"
    PGIDS+=("$STARTED")
    disown "$STARTED"
}
# stop PGID: SIGTERM to the group, SIGKILL after 3 s; forgets it.
stop() {
    local pg="$1" i keep=()
    kill -TERM -- "-$pg" 2>/dev/null || true
    for i in $(seq 1 30); do kill -0 -- "-$pg" 2>/dev/null || break; sleep 0.1; done
    kill -KILL -- "-$pg" 2>/dev/null || true
    for i in "${PGIDS[@]}"; do [ "$i" = "$pg" ] || keep+=("$i"); done
    PGIDS=("${keep[@]}")
}

free_ports() {
    python3 - "$1" <<'EOF'
import socket, sys
socks = []
for _ in range(int(sys.argv[1])):
    s = socket.socket(); s.bind(("127.0.0.1", 0)); socks.append(s)
print(" ".join(str(s.getsockname()[1]) for s in socks))
EOF
}

BODY="{\"model\":\"$MODEL\",\"messages\":[{\"role\":\"user\",\"content\":\"ready?\"}],\"max_tokens\":1}"
wait_ready() { # wait_ready NAME PORT PATH: until it answers 200 (60 s at most)
    local i code
    for i in $(seq 1 300); do
        if [ "$3" = chat ]; then
            code="$(curl -s -o /dev/null -w '%{http_code}' -m 5 -X POST -H 'content-type: application/json' \
                --data "$BODY" "http://127.0.0.1:$2/v1/chat/completions" || true)"
        else
            code="$(curl -s -o /dev/null -w '%{http_code}' -m 2 "http://127.0.0.1:$2$3" || true)"
        fi
        [ "$code" = 200 ] && return 0
        sleep 0.2
    done
    log "$1 did not become ready on port $2 (last status $code); its log:"; tail -n 20 "$TMP/$1.log" >&2 || true
    return 1
}

want() { [ -z "$ONLY" ] || [[ ",$ONLY," == *",$1,"* ]]; }
TARGETS=()
for t in gw-affinity gw-least sglang-ca vllm-ch vllm-rr; do want "$t" && TARGETS+=("$t"); done
[ ${#TARGETS[@]} -gt 0 ] || { log "no targets"; exit 2; }
IFS=, read -r -a VARS <<<"$VARIANTS"
for v in "${VARS[@]}"; do case "$v" in keyed|nosession) ;; *) log "unknown variant $v"; exit 2 ;; esac; done

# start_router NAME PORT STORE URL...: starts the router and sets STARTED; STORE is this crate's
# --counter-store value ("memory" or redis://...), ignored by the peers.
start_router() {
    local name="$1" port="$2" store="$3"; shift 3
    local u gw_args=(--counter-store "$store") extra_flags=()
    for u in "$@"; do gw_args+=(--replica "$u"); done
    read -r -a extra_flags <<<"$GW_FLAGS"
    gw_args+=("${extra_flags[@]}")
    local mport; mport="$(free_ports 1)"
    case "$name" in
        gw-affinity) start "$name" "$GW" --listen "127.0.0.1:$port" "${gw_args[@]}" --policy affinity ;;
        gw-least) start "$name" "$GW" --listen "127.0.0.1:$port" "${gw_args[@]}" --policy least-loaded ;;
        sglang-ca) start "$name" "$PEERS_VENV/bin/python" -m sglang_router.launch_router --host 127.0.0.1 \
            --port "$port" --worker-urls "$@" --policy cache_aware --log-level error \
            --prometheus-host 127.0.0.1 --prometheus-port "$mport" ;;
        vllm-ch) start "$name" "$PEERS_VENV/bin/vllm-router" --host 127.0.0.1 --port "$port" \
            --worker-urls "$@" --policy consistent_hash --log-level error \
            --prometheus-host 127.0.0.1 --prometheus-port "$mport" ;;
        vllm-rr) start "$name" "$PEERS_VENV/bin/vllm-router" --host 127.0.0.1 --port "$port" \
            --worker-urls "$@" --policy round_robin --log-level error \
            --prometheus-host 127.0.0.1 --prometheus-port "$mport" ;;
    esac
}

# The replay's own bound: the trace's span at --speed, plus two minutes for the last requests.
SPAN_S="$(python3 -c "
import json, sys
ts = [json.loads(l)['timestamp'] for l in open(sys.argv[1]) if l.strip()]
print(int((max(ts) - min(ts)) / 1000 / float(sys.argv[2])) + 1)" "$TRACE" "$SPEED")"
RUN_LIMIT=$((SPAN_S + 120))
NREQ="$(grep -c . "$TRACE")"
log "trace $TRACE: $NREQ requests over ${SPAN_S} s at --speed $SPEED; $REPLICAS replicas at --time-scale $TIME_SCALE; $GATEWAYS router(s) of each kind"
log "targets ${TARGETS[*]}; variants ${VARS[*]}; $RUNS round(s): about $(( (SPAN_S + 8) * ${#TARGETS[@]} * ${#VARS[@]} * RUNS / 60 + 1 )) min"

# redis_cmd PORT: the redis-server this script runs (no persistence: a restart comes back empty).
redis_cmd() { REDIS_CMD=(redis-server --port "$1" --bind 127.0.0.1 --save "" --appendonly no); }

# scrape_gateways NAME GATEWAY_PORT...: each gateway's /metrics, once, into $TMP/NAME-PORT.prom.
scrape_gateways() {
    local name="$1" p; shift
    for p in "$@"; do curl -s -m 5 "http://127.0.0.1:$p/metrics" >"$TMP/$name-$p.prom" || true; done
}

# outage_report REDIS_PORT PGID_FILE METRICS_FILE...: after a --redis-outage run, what the
# gateways counted (store errors on each shared path) and whether they use the new server.
outage_report() {
    local rport="$1" restarted="$2" f keys; shift 2
    [ -f "$restarted" ] || { log "  redis was not restarted (replay ended first)"; return 0; }
    keys="$(redis-cli -p "$rport" dbsize 2>/dev/null || echo '?')"
    log "  after the outage: the new redis-server holds $keys keys (written by the gateways since)"
    for f in "$@"; do
        awk -v gw="$(basename "$f" .prom)" '
            /^replica_router_(affinity_pin_errors|work_view_errors|prefix_share_errors|store_errors)_total/ { k = $1; sub(/[{].*/, "", k); sub(/^replica_router_/, "", k); e[k] += $NF }
            /^replica_router_work_view_age_seconds/ { age = $NF }
            END { line = ""; for (k in e) line = line " " k "=" e[k];
                  printf "[quality]   %s errors:%s; work view age %s s\n", gw, (line == "" ? " none" : line), (age == "" ? "?" : age) }' "$f" >&2
    done
}

# decisions_report METRICS_FILE...: this crate's placement decisions by reason, summed over the
# gateways (how often sessions stayed home, spilled or failed over).
decisions_report() {
    cat "$@" | awk '
        /^replica_router_affinity_decisions_total/ {
            r = $0; sub(/.*reason="/, "", r); sub(/".*/, "", r); n[r] += $NF }
        END { line = ""; for (k in n) line = line " " k "=" n[k];
              if (line != "") printf "[quality]   decisions:%s\n", line }' >&2
}

run_one() { # run_one TARGET VARIANT ROUND
    local target="$1" variant="$2" round="$3"
    local ports mock_pg router_pgs=() redis_pg="" i urls=() metrics=() extra=() gw_urls=() store=memory
    read -r -a ports <<<"$(free_ports $((REPLICAS + GATEWAYS + 1)))"
    local plist; plist="$(IFS=,; echo "${ports[*]:0:$REPLICAS}")"
    start "mock-$target-$variant-$round" "$MOCK" --ports "$plist" --time-scale "$TIME_SCALE" --model "$MODEL"
    mock_pg="$STARTED"
    for i in $(seq 0 $((REPLICAS - 1))); do
        urls+=("http://127.0.0.1:${ports[$i]}")
        metrics+=(--replica-metrics "http://127.0.0.1:${ports[$i]}")
        wait_ready "mock-$target-$variant-$round" "${ports[$i]}" /health || { stop "$mock_pg"; return 1; }
    done
    if [ "$GATEWAYS" -gt 1 ] && [[ "$target" == gw-* ]]; then
        local redis_port="${ports[$((REPLICAS + GATEWAYS))]}"
        redis_cmd "$redis_port"
        start "redis-$target-$variant-$round" "${REDIS_CMD[@]}"
        redis_pg="$STARTED"
        for i in $(seq 1 50); do redis-cli -p "$redis_port" ping >/dev/null 2>&1 && break; sleep 0.1; done
        store="redis://127.0.0.1:$redis_port"
    fi
    local ok=1 g rport
    for g in $(seq 0 $((GATEWAYS - 1))); do
        rport="${ports[$((REPLICAS + g))]}"
        start_router "$target" "$rport" "$store" "${urls[@]}"
        router_pgs+=("$STARTED")
        wait_ready "$target" "$rport" chat || { ok=0; break; }
        gw_urls+=(--url "http://127.0.0.1:$rport")
    done
    if [ "$ok" = 0 ]; then
        for g in "${router_pgs[@]}"; do stop "$g"; done
        [ -n "$redis_pg" ] && stop "$redis_pg"
        stop "$mock_pg"; return 1
    fi
    [ "$variant" = nosession ] && extra+=(--no-session)
    local out="$TMP/run-$target-$variant-$round.json"
    local outage_pid="" restarted="$TMP/redis-restarted-$target-$variant-$round.pgid"
    if [ -n "$OUTAGE_AT" ] && [ -n "$redis_pg" ]; then
        # Kill Redis mid-replay, then start an empty one on the same port (its group id goes to a
        # file: this subshell's PGIDS is its own copy).
        (
            sleep "$OUTAGE_AT"
            kill -KILL -- "-$redis_pg" 2>/dev/null || true
            echo "[quality]   redis killed at ${OUTAGE_AT} s" >&2
            sleep "$OUTAGE_FOR"
            setsid "${REDIS_CMD[@]}" >"$TMP/redis-restarted-$target-$variant-$round.log" 2>&1 \
                </dev/null &
            echo "$!" >"$restarted"
            echo "[quality]   redis back at $((OUTAGE_AT + OUTAGE_FOR)) s (empty)" >&2
        ) &
        outage_pid="$!"
    fi
    if ! timeout "$RUN_LIMIT" "$REPLAY" "${gw_urls[@]}" --trace "$TRACE" --speed "$SPEED" \
        --model "$MODEL" --timeout 60 "${metrics[@]}" "${extra[@]}" --label "$target" --quiet --out "$out" \
        >"$TMP/replay-$target-$variant-$round.log" 2>&1; then
        log "replay through $target failed:"; tail -n 5 "$TMP/replay-$target-$variant-$round.log" >&2
        rm -f "$out"
    fi
    local proms=() p
    if [[ "$target" == gw-* ]]; then
        scrape_gateways "gateway-$variant-$round" "${ports[@]:$REPLICAS:$GATEWAYS}"
        for p in "${ports[@]:$REPLICAS:$GATEWAYS}"; do proms+=("$TMP/gateway-$variant-$round-$p.prom"); done
    fi
    if [ -n "$outage_pid" ]; then
        kill "$outage_pid" 2>/dev/null || true; wait "$outage_pid" 2>/dev/null || true
        outage_report "$redis_port" "$restarted" "${proms[@]}"
        [ -f "$restarted" ] && { stop "$(cat "$restarted")"; rm -f "$restarted"; }
    fi
    [ ${#proms[@]} -gt 0 ] && decisions_report "${proms[@]}"
    for g in "${router_pgs[@]}"; do stop "$g"; done
    [ -n "$redis_pg" ] && stop "$redis_pg"
    stop "$mock_pg"
    [ -f "$out" ] && python3 - "$out" <<'EOF' >&2
import json, sys
s = json.load(open(sys.argv[1]))["summary"]
print(f"[quality]   ttft p50 {s['ttft_ms']['p50']} p95 {s['ttft_ms']['p95']} ms, e2e p95 {s['e2e_ms']['p95']} ms, "
      f"hit rate {s['metrics_hit_rate']}, errors {s['errors']}/{s['requests']}")
EOF
    return 0
}

START_TIME="$(date -u '+%Y-%m-%d %H:%M UTC')"
LOAD_BEFORE="$(cut -d' ' -f1-3 /proc/loadavg)"
for round in $(seq 1 "$RUNS"); do
    order=("${TARGETS[@]}")
    if [ $((round % 2)) = 0 ]; then
        order=(); for ((i = ${#TARGETS[@]} - 1; i >= 0; i--)); do order+=("${TARGETS[$i]}"); done
    fi
    for variant in "${VARS[@]}"; do
        for target in "${order[@]}"; do
            log "round $round/$RUNS $variant $target"
            run_one "$target" "$variant" "$round" || log "run $target $variant $round skipped"
        done
    done
done
LOAD_AFTER="$(cut -d' ' -f1-3 /proc/loadavg)"
[ -n "$OUT" ] && { mkdir -p "$OUT.runs"; cp "$TMP"/run-*.json "$OUT.runs/" 2>/dev/null || true; }

# ---------------------------------------------------------------- report
{
    echo "Date: $START_TIME"
    echo "Machine: $(nproc) cores, $(awk -F': ' '/model name/{print $2; exit}' /proc/cpuinfo), $(uname -sr); load average $LOAD_BEFORE before, $LOAD_AFTER after"
    echo "Trace: $(basename "$TRACE") ($NREQ requests, ${SPAN_S} s at --speed $SPEED); $REPLICAS mock replicas, --time-scale $TIME_SCALE, $GATEWAYS router(s) of each kind (requests spread over them in turn), fresh replicas and routers for every run"
    echo "Routers: sglang-router $(peer_version sglang-router), vllm-router $(peer_version vllm-router), this crate's gateway at $(cd "$REPO" && git rev-parse --short HEAD 2>/dev/null || echo '?')"
    [ -n "$GW_FLAGS" ] && echo "Gateway flags added: $GW_FLAGS"
    [ -n "$OUTAGE" ] && echo "Redis outage: killed ${OUTAGE_AT} s into each gateway replay, an empty one back ${OUTAGE_FOR} s later"
    echo "Medians of $RUNS round(s); ratios are per round against the best peer (sglang-*/vllm-*) of the same round and variant, then the median"
    echo
    python3 - "$TMP" "${TARGETS[*]}" "${VARS[*]}" <<'EOF'
import glob, json, os, statistics, sys
tmp, targets, variants = sys.argv[1], sys.argv[2].split(), sys.argv[3].split()
runs = {}
for f in glob.glob(os.path.join(tmp, "run-*.json")):
    t, v, r = os.path.basename(f)[4:-5].rsplit("-", 2)
    runs[(t, v, int(r))] = json.load(open(f))
def get(rep, *path):
    x = rep
    for p in path:
        x = x.get(p) if isinstance(x, dict) else None
    return x
def busiest(rep):
    shares = [r.get("computed_share") for r in rep["replicas"] if r.get("computed_share") is not None]
    return max(shares) if shares else None
def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None
def fmt(x, spec):
    return "-" if x is None else format(x, spec)
peer = lambda t: t.startswith("sglang-") or t.startswith("vllm-")
print("| router | variant | TTFT p50 ms | TTFT p95 ms | e2e p95 ms | hit rate | busiest replica | errors | TTFT p95 / best peer | hit rate / best peer |")
print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
for v in variants:
    for t in targets:
        mine = {r: rep for (tt, vv, r), rep in runs.items() if tt == t and vv == v}
        if not mine:
            print(f"| {t} | {v} | - | - | - | - | - | no run | - | - |")
            continue
        ttft_ratio, hit_ratio = [], []
        for r, rep in mine.items():
            peers = [rp for (tt, vv, rr), rp in runs.items() if vv == v and rr == r and peer(tt)]
            p95s = [get(p, "summary", "ttft_ms", "p95") for p in peers]
            p95s = [x for x in p95s if x]
            hits = [get(p, "summary", "metrics_hit_rate") for p in peers]
            hits = [x for x in hits if x is not None]
            mp95 = get(rep, "summary", "ttft_ms", "p95")
            mhit = get(rep, "summary", "metrics_hit_rate")
            if p95s and mp95 is not None:
                ttft_ratio.append(mp95 / min(p95s))
            if hits and max(hits) > 0 and mhit is not None:
                hit_ratio.append(mhit / max(hits))
        reps = list(mine.values())
        errors = sum(get(p, "summary", "errors") or 0 for p in reps)
        requests = sum(get(p, "summary", "requests") or 0 for p in reps)
        print("| {} | {} | {} | {} | {} | {} | {} | {}/{} | {} | {} |".format(
            t, v,
            fmt(med(get(p, "summary", "ttft_ms", "p50") for p in reps), ".1f"),
            fmt(med(get(p, "summary", "ttft_ms", "p95") for p in reps), ".1f"),
            fmt(med(get(p, "summary", "e2e_ms", "p95") for p in reps), ".0f"),
            fmt(med(get(p, "summary", "metrics_hit_rate") for p in reps), ".3f"),
            fmt(med(busiest(p) for p in reps), ".2f"),
            errors, requests,
            fmt(med(ttft_ratio), ".2f"), fmt(med(hit_ratio), ".2f")))
EOF
} | tee "$TMP/table.md"
[ -n "$OUT" ] && cp "$TMP/table.md" "$OUT"
exit 0
