# Shell helpers shared by the bench/ scripts (sourced, not run).
# Expects $repo and $work to be set and a pids_to_kill array to exist.

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

wait_http() { # URL: wait until it answers 200
  python3 - "$1" <<'PY'
import sys, time, urllib.request
for _ in range(600):
    try:
        if urllib.request.urlopen(sys.argv[1], timeout=1).status == 200:
            sys.exit(0)
    except Exception:
        time.sleep(0.1)
sys.exit(1)
PY
}

start_sampler() { # PID NAME: sample PID's tree into $work/NAME.mem
  python3 "$repo/bench/peak-memory" "$1" 0.2 >"$work/$2.mem" &
  sampler_pid=$!
  pids_to_kill+=("$sampler_pid")
}

stop_sampler() {
  kill -TERM "$sampler_pid"
  wait "$sampler_pid" || true
}

kv() { # FILE KEY: value of KEY=... in the one-line FILE
  tr ' ' '\n' <"$1" | sed -n "s/^$2=//p"
}

mib() { python3 -c "print(f'{$1 / 1024:.1f}')"; }
ratio() { python3 -c "a, b = float('$1'), float('$2'); print(f'{a / b:.2f}' if b else 'n/a')"; }

machine_line() {
  echo "== machine: $(nproc) cores, $(free -g | awk '/Mem:/ {print $2}') GiB, load average $(cut -d' ' -f1-3 /proc/loadavg); work dir $work ($(df -h --output=fstype "$work" | tail -1 | tr -d ' '))"
}

start_postfix() { # [main.cf line]...: a private Postfix on a free port ($postfix_port, $postfix_master)
  postfix_port=$(free_port)
  # Raise the per-client connection limit (default 50, counted with some lag),
  # which would otherwise throttle one client's 50 sessions; nothing else is tuned.
  bash "$repo/e2e/postfix-instance" start "$work/postfix" "$postfix_port" \
    'smtpd_client_connection_count_limit = 0' "$@" >/dev/null || {
    echo "postfix did not start; its log:" >&2
    tail -20 "$work/postfix/maillog" >&2 || true
    exit 1
  }
  postfix_master=$(bash "$repo/e2e/postfix-instance" pids "$work/postfix" | head -1)
}
