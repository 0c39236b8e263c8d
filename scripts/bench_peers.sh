#!/usr/bin/env bash
# Side-by-side router overhead benchmark, loopback only, bounded in time.
#
# Two zero-cost replicas (one nginx answering every path at once with a small JSON body) stand behind
# each router in turn; wrk POSTs a small chat-completions request through it. Measured in one run:
#   limit          wrk straight at one replica (no router)
#   nginx          nginx as a keep-alive reverse proxy, least_conn (the mature reference)
#   vllm-ch/-p2    vllm-router==0.1.17, --policy consistent_hash / power_of_two
#   sglang-ca/-p2  sglang-router==0.3.2, --policy cache_aware / power_of_two
#   gw-affinity    this crate's examples/gateway.rs, --policy affinity / least-loaded
#   gw-least       (skipped when the gateway example does not build)
# Every target is started once (each in its own process group), then the rounds run interleaved
# (target after target, --runs times, each round starting one target further on so no target
# always runs at the same moment) and the table reports medians: req/s, p50, p99, ratio to the
# limit, and the median over rounds of each target's throughput relative to nginx and to the best
# peer router of the same round (robust to load that other processes put on the machine).
#
# usage: scripts/bench_peers.sh [--runs N] [--duration 10s] [--warmup 2s] [--connections 64]
#                               [--threads 2] [--only name,name] [--out FILE]
# env:   PEERS_VENV (default /work/peers-venv if present, else ~/.cache/replica-router/peers-venv)
#        NO_INSTALL=1 to never install anything (fail instead)
set -euo pipefail

RUNS=1
DURATION=10s
WARMUP=2s
CONNS=64
THREADS=2
ONLY=""
OUT=""
while [ $# -gt 0 ]; do
    case "$1" in
        --runs) RUNS="$2"; shift 2 ;;
        --duration) DURATION="$2"; shift 2 ;;
        --warmup) WARMUP="$2"; shift 2 ;;
        --connections) CONNS="$2"; shift 2 ;;
        --threads) THREADS="$2"; shift 2 ;;
        --only) ONLY="$2"; shift 2 ;;
        --out) OUT="$2"; shift 2 ;;
        -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
        *) echo "unknown argument: $1" >&2; exit 2 ;;
    esac
done
case "$RUNS" in ''|*[!0-9]*|0) echo "--runs must be a positive integer" >&2; exit 2 ;; esac

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
log() { echo "[bench] $*" >&2; }

# ---------------------------------------------------------------- tools
apt_updated=0
apt_install() {
    [ "${NO_INSTALL:-0}" = 1 ] && { log "missing $*, and NO_INSTALL=1"; exit 1; }
    if [ "$apt_updated" = 0 ]; then apt-get update -qq >&2; apt_updated=1; fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >&2
}
command -v wrk >/dev/null || apt_install wrk
NGINX="$(command -v nginx || true)"
[ -z "$NGINX" ] && [ -x /usr/sbin/nginx ] && NGINX=/usr/sbin/nginx
if [ -z "$NGINX" ]; then apt_install nginx-light || apt_install nginx; NGINX="$(command -v nginx || echo /usr/sbin/nginx)"; fi
command -v curl >/dev/null || apt_install curl

if [ -z "${PEERS_VENV:-}" ]; then
    if [ -x /work/peers-venv/bin/python ]; then PEERS_VENV=/work/peers-venv
    else PEERS_VENV="${XDG_CACHE_HOME:-$HOME/.cache}/replica-router/peers-venv"; fi
fi
case "$PEERS_VENV" in "$REPO"|"$REPO"/*) echo "PEERS_VENV must be outside the repository" >&2; exit 2 ;; esac
peer_version() { "$PEERS_VENV/bin/python" -m pip show "$1" 2>/dev/null | awk '/^Version:/{print $2}'; }
if [ "$(peer_version sglang-router)" != 0.3.2 ] || [ "$(peer_version vllm-router)" != 0.1.17 ]; then
    [ "${NO_INSTALL:-0}" = 1 ] && { log "peers missing in $PEERS_VENV, and NO_INSTALL=1"; exit 1; }
    log "installing the peers into $PEERS_VENV"
    [ -x "$PEERS_VENV/bin/python" ] || python3 -m venv "$PEERS_VENV" || { apt_install python3-venv; python3 -m venv "$PEERS_VENV"; }
    "$PEERS_VENV/bin/python" -m pip install -q sglang-router==0.3.2 vllm-router==0.1.17 >&2
fi

# ---------------------------------------------------------------- scratch, processes, cleanup
TMP="$(mktemp -d /tmp/bench_peers.XXXXXX)"
PGIDS=()
cleanup() {
    local pg
    for pg in "${PGIDS[@]}"; do kill -TERM -- "-$pg" 2>/dev/null || true; done
    sleep 0.3
    for pg in "${PGIDS[@]}"; do kill -KILL -- "-$pg" 2>/dev/null || true; done
    rm -rf "$TMP"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# start NAME CMD...: runs CMD in a new session (its own process group), logs in $TMP/NAME.log
start() {
    local name="$1"; shift
    setsid "$@" >"$TMP/$name.log" 2>&1 </dev/null &
    PGIDS+=("$!")
    disown "$!"
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
read -r R1 R2 PX VCH VP2 SCA SP2 GWA GWL M1 M2 M3 M4 <<<"$(free_ports 13)"

BODY='{"model":"mock-llama-3-70b","messages":[{"role":"user","content":"Say hello in one short sentence."}],"max_tokens":16}'
wait_ready() { # wait_ready NAME PORT: until a chat completion through it answers 200 (30 s at most)
    local i code
    for i in $(seq 1 150); do
        code="$(curl -s -o /dev/null -w '%{http_code}' -m 2 -X POST -H 'content-type: application/json' \
            -H 'x-session-id: warm' --data "$BODY" "http://127.0.0.1:$2/v1/chat/completions" || true)"
        [ "$code" = 200 ] && return 0
        sleep 0.2
    done
    log "$1 did not become ready on port $2 (last status $code); its log:"; tail -n 20 "$TMP/$1.log" >&2 || true
    return 1
}

# ---------------------------------------------------------------- the zero-cost replicas and nginx proxy
REPLY='{"id":"chatcmpl-0","object":"chat.completion","created":0,"model":"mock-llama-3-70b","choices":[{"index":0,"message":{"role":"assistant","content":"Hello!"},"finish_reason":"stop"}],"usage":{"prompt_tokens":12,"completion_tokens":3,"total_tokens":15}}'
mkdir -p "$TMP/replicas" "$TMP/proxy"
cat >"$TMP/replicas/nginx.conf" <<EOF
daemon off;
worker_processes 1;
pid $TMP/replicas/nginx.pid;
error_log $TMP/replicas/error.log warn;
events { worker_connections 4096; }
http {
    access_log off;
    client_body_temp_path $TMP/replicas/body;
    keepalive_requests 10000000;
    keepalive_timeout 120s;
    default_type application/json;
    server {
        listen 127.0.0.1:$R1 reuseport;
        listen 127.0.0.1:$R2 reuseport;
        location = /health { return 200 ''; }
        location = /v1/models { return 200 '{"object":"list","data":[{"id":"mock-llama-3-70b","object":"model","owned_by":"bench"}]}'; }
        location = /server_info { return 200 '{"model_path":"mock-llama-3-70b","tp_size":1,"dp_size":1}'; }
        location = /model_info { return 200 '{"model_path":"mock-llama-3-70b","is_generation":true}'; }
        location / { return 200 '$REPLY'; }
    }
}
EOF
cat >"$TMP/proxy/nginx.conf" <<EOF
daemon off;
worker_processes auto;
pid $TMP/proxy/nginx.pid;
error_log $TMP/proxy/error.log warn;
events { worker_connections 4096; }
http {
    access_log off;
    client_body_temp_path $TMP/proxy/body;
    proxy_temp_path $TMP/proxy/proxy;
    keepalive_requests 10000000;
    upstream replicas {
        least_conn;
        server 127.0.0.1:$R1;
        server 127.0.0.1:$R2;
        keepalive 256;
        keepalive_requests 10000000;
    }
    server {
        listen 127.0.0.1:$PX;
        location / {
            proxy_pass http://replicas;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }
    }
}
EOF
start replicas "$NGINX" -p "$TMP/replicas" -c "$TMP/replicas/nginx.conf"
wait_ready replicas "$R1" || exit 1

want() { [ -z "$ONLY" ] || [[ ",$ONLY," == *",$1,"* ]]; }
NAMES=(); PORTS=(); NOTES=()
add_target() { NAMES+=("$1"); PORTS+=("$2"); NOTES+=("$3"); }
ready_add() { if wait_ready "$1" "$2"; then add_target "$@"; else log "skipping $1"; fi; }
add_target limit "$R1" "wrk straight at one replica"

if want nginx; then
    start nginx "$NGINX" -p "$TMP/proxy" -c "$TMP/proxy/nginx.conf"
    ready_add nginx "$PX" "nginx $("$NGINX" -v 2>&1 | sed 's/.*nginx\///'), keep-alive proxy, least_conn"
fi
W="http://127.0.0.1:$R1 http://127.0.0.1:$R2"
VR="$PEERS_VENV/bin/vllm-router"
SG=("$PEERS_VENV/bin/python" -m sglang_router.launch_router)
if want vllm-ch; then
    # shellcheck disable=SC2086
    start vllm-ch "$VR" --host 127.0.0.1 --port "$VCH" --worker-urls $W --policy consistent_hash \
        --log-level error --prometheus-host 127.0.0.1 --prometheus-port "$M1"
fi
if want vllm-p2; then
    # shellcheck disable=SC2086
    start vllm-p2 "$VR" --host 127.0.0.1 --port "$VP2" --worker-urls $W --policy power_of_two \
        --log-level error --prometheus-host 127.0.0.1 --prometheus-port "$M2"
fi
if want sglang-ca; then
    # shellcheck disable=SC2086
    start sglang-ca "${SG[@]}" --host 127.0.0.1 --port "$SCA" --worker-urls $W --policy cache_aware \
        --log-level error --prometheus-host 127.0.0.1 --prometheus-port "$M3"
fi
if want sglang-p2; then
    # shellcheck disable=SC2086
    start sglang-p2 "${SG[@]}" --host 127.0.0.1 --port "$SP2" --worker-urls $W --policy power_of_two \
        --log-level error --prometheus-host 127.0.0.1 --prometheus-port "$M4"
fi
if want vllm-ch; then ready_add vllm-ch "$VCH" "vllm-router 0.1.17, consistent_hash"; fi
if want vllm-p2; then ready_add vllm-p2 "$VP2" "vllm-router 0.1.17, power_of_two"; fi
if want sglang-ca; then ready_add sglang-ca "$SCA" "sglang-router 0.3.2, cache_aware"; fi
if want sglang-p2; then ready_add sglang-p2 "$SP2" "sglang-router 0.3.2, power_of_two"; fi

GW=""
if { want gw-affinity || want gw-least; } && [ -f "$REPO/examples/gateway.rs" ]; then
    log "building examples/gateway.rs (release)"
    if (cd "$REPO" && cargo build -q --release --example gateway >&2); then
        GW="$REPO/target/release/examples/gateway"
    else
        log "the gateway example does not build: skipping it"
    fi
elif want gw-affinity || want gw-least; then
    log "no examples/gateway.rs yet: skipping the gateway"
fi
if [ -n "$GW" ]; then
    if want gw-affinity; then
        start gw-affinity "$GW" --listen "127.0.0.1:$GWA" --replica "http://127.0.0.1:$R1" --replica "http://127.0.0.1:$R2" --policy affinity
        ready_add gw-affinity "$GWA" "this crate's gateway, --policy affinity"
    fi
    if want gw-least; then
        start gw-least "$GW" --listen "127.0.0.1:$GWL" --replica "http://127.0.0.1:$R1" --replica "http://127.0.0.1:$R2" --policy least-loaded
        ready_add gw-least "$GWL" "this crate's gateway, --policy least-loaded"
    fi
fi

# ---------------------------------------------------------------- measure
cat >"$TMP/chat.lua" <<EOF
-- POST a small chat completion; 256 session ids in turn (x-session-id), prebuilt per thread.
local reqs = {}
local n = 0
local body = '$BODY'
function init(args)
    for i = 1, 256 do
        reqs[i] = wrk.format("POST", "/v1/chat/completions",
            { ["Content-Type"] = "application/json", ["x-session-id"] = "session-" .. i }, body)
    end
end
function request()
    n = n + 1
    return reqs[(n % 256) + 1]
end
function done(summary, latency, requests)
    local e = summary.errors
    io.write(string.format("RESULT %.1f %d %d %d %d\n", summary.requests / (summary.duration / 1e6),
        latency:percentile(50), latency:percentile(99), e.connect + e.read + e.write + e.status + e.timeout,
        summary.requests))
end
EOF

run_wrk() { # run_wrk PORT DURATION -> "RESULT rps p50us p99us errors requests"
    wrk -t"$THREADS" -c"$CONNS" -d"$2" --timeout 5s -s "$TMP/chat.lua" "http://127.0.0.1:$1" 2>&1 | grep '^RESULT' || echo "RESULT 0 0 0 1 0"
}

log "targets: ${NAMES[*]}; $RUNS round(s) of ${DURATION} each (after ${WARMUP} warm-up), wrk -t$THREADS -c$CONNS"
N=${#NAMES[@]}
for round in $(seq 1 "$RUNS"); do
    for k in $(seq 0 $((N - 1))); do
        i=$(((k + round - 1) % N))
        run_wrk "${PORTS[$i]}" "$WARMUP" >/dev/null
        r="$(run_wrk "${PORTS[$i]}" "$DURATION")"
        echo "${NAMES[$i]} $r $round" >>"$TMP/results"
        log "round $round ${NAMES[$i]}: $r"
    done
done
[ -n "$OUT" ] && cp "$TMP/results" "$OUT.raw"

# ---------------------------------------------------------------- report
median() { sort -n | awk '{a[NR]=$1} END {if (NR==0) print 0; else if (NR%2) print a[(NR+1)/2]; else print (a[NR/2]+a[NR/2+1])/2}'; }
fmt_ms() { awk -v us="$1" 'BEGIN { printf "%.2f", us / 1000 }'; }
limit_rps="$(awk '$1=="limit"{print $3}' "$TMP/results" | median)"
{
    echo "Date: $(date -u '+%Y-%m-%d %H:%M UTC')"
    echo "Machine: $(nproc) cores, $(awk -F': ' '/model name/{print $2; exit}' /proc/cpuinfo), $(uname -sr)"
    echo "Load: wrk $(wrk -v 2>&1 | head -1 | awk '{print $2}') -t$THREADS -c$CONNS -d$DURATION (warm-up $WARMUP), POST /v1/chat/completions ($(printf %s "$BODY" | wc -c) bytes), medians of $RUNS round(s)"
    echo "Replicas: 2 x nginx return 200 (one worker), loopback"
    echo
    echo "| target | what | req/s | p50 ms | p99 ms | vs limit | vs nginx | vs best peer | errors |"
    echo "|---|---|---:|---:|---:|---:|---:|---:|---:|"
    for i in "${!NAMES[@]}"; do
        n="${NAMES[$i]}"
        rps="$(awk -v n="$n" '$1==n{print $3}' "$TMP/results" | median)"
        p50="$(awk -v n="$n" '$1==n{print $4}' "$TMP/results" | median)"
        p99="$(awk -v n="$n" '$1==n{print $5}' "$TMP/results" | median)"
        errs="$(awk -v n="$n" '$1==n{s+=$6} END{print s+0}' "$TMP/results")"
        ratio="$(awk -v a="$rps" -v b="$limit_rps" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "-" }')"
        # Per round: this target over nginx, and over the best peer router, then the median.
        vs_nginx="$(awk -v n="$n" '{r[$1" "$8]=$3} END {for (k in r) {split(k, p, " "); if (p[1]==n && r["nginx "p[2]] > 0) print r[k] / r["nginx "p[2]]}}' "$TMP/results" | median)"
        vs_peer="$(awk -v n="$n" '{r[$1" "$8]=$3; rounds[$8]=1} END {for (q in rounds) {b=0; for (k in r) {split(k, p, " "); if (p[2]==q && p[1] ~ /^(vllm|sglang)-/ && r[k] > b) b=r[k]}; if (b > 0 && (n" "q) in r) print r[n" "q] / b}}' "$TMP/results" | median)"
        printf '| %s | %s | %.0f | %s | %s | %s | %.2f | %.2f | %s |\n' "$n" "${NOTES[$i]}" "$rps" "$(fmt_ms "$p50")" "$(fmt_ms "$p99")" "$ratio" "$vs_nginx" "$vs_peer" "$errs"
    done
} | tee "$TMP/table.md"
[ -n "$OUT" ] && cp "$TMP/table.md" "$OUT"
exit 0
