#!/usr/bin/env python3
"""Failover test for edgeinfer behind a session-affine load balancer.

Starts three edgeinfer nodes on loopback ports, puts nginx or HAProxy in
front of them (from deploy/nginx.conf.template or deploy/haproxy.cfg.template),
and runs many multi-turn agent sessions through the balancer, each session
sending `X-Session-Id` so that all its turns land on one node (whose prefix
cache then holds the conversation). The turns run as rounds: every session
finishes turn K before any starts turn K+1. Shortly after round K+1 starts,
the node serving the most sessions is killed with SIGKILL and restarted on
the same port about two seconds later. Failed requests are not retried by
the client: they count as failed.

It reports failed requests (and whether they were the killed node's), which
sessions kept their node and which moved (and whether only because of the
kill, and whether they came back), the prefix-cache hit ratio of every turn
(cached_tokens / prompt_tokens), and requests per node; as a table, and as
JSON with --json.

Exit status 0 when (a) every failed request was in the kill round and
belonged to a session of the killed node (or came from it), (b) every
session not on the killed node kept its node for all turns, and those on it
moved only away from it while it was down and (if at all) back to it, and
(c) the prefix-cache hit ratio of the last turn is above 0.5; 1 when a check
fails (the reasons are printed); 3 when the setup failed (a node or the
balancer did not start); 130 when interrupted. Every child (nodes, balancer)
is stopped on any exit.

Only the Python 3.11 standard library is used. Example:

    python3 deploy/failover.py --balancer nginx \\
        --binary target/release/edgeinfer \\
        --model models/SmolLM2-135M-Instruct.Q4_1.gguf --json /tmp/nginx.json
"""

from __future__ import annotations

import argparse
import concurrent.futures
import http.client
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

# The nodes' readiness endpoint (200 once the model is loaded and warmed,
# 503 while loading and from SIGTERM on). --ready-path overrides it, e.g.
# /health for a build that has no /ready yet.
READY_PATH = "/ready"

HERE = os.path.dirname(os.path.abspath(__file__))
HOST = "127.0.0.1"

# The same system prompt opens every session (about 200 tokens), so the
# nodes' prefix caches share it across sessions as well as within one.
SYSTEM_PROMPT = (
    "You are Relay, an operations assistant embedded in the on-call tooling "
    "of a mid-sized logistics company. You help engineers investigate "
    "incidents across warehouses, delivery routes and the order pipeline. "
    "Follow these rules in every answer. First, be brief: answer in one or "
    "two short sentences unless the engineer asks for detail. Second, never "
    "invent data: if a metric, log line or ticket is not in the conversation, "
    "say that you do not have it and name the tool that would show it. Third, "
    "when you suggest an action that changes production, such as restarting "
    "a service, draining a node or rolling back a release, state the risk and "
    "the way to undo it. Fourth, use the company's terms: a 'lane' is a "
    "delivery route between two depots, a 'wave' is a batch of orders picked "
    "together, and a 'hold' is an order stopped by a fraud or address check. "
    "Fifth, times are in UTC and quantities use metric units. Sixth, if the "
    "question is ambiguous, ask one clarifying question before answering. "
    "You may use bullet points for lists of more than three items."
)

TOPICS = [
    "the Rotterdam depot reports waves finishing late since Monday",
    "lane 42 shows twice the usual number of failed deliveries",
    "holds on new customer orders doubled after the last release",
    "the label printer service restarts every few hours",
    "route optimisation jobs time out at night",
    "the order pipeline queue grows during the lunch peak",
    "scanners in Lyon lose their connection to the inventory API",
    "refund requests are stuck in the pending state",
]

FOLLOW_UPS = [
    "What should I check first?",
    "Which metric would confirm that?",
    "Summarise what we know so far in one sentence.",
    "Is it safe to restart the service now?",
    "What would you tell the warehouse manager?",
    "How do we prevent it next week?",
    "Which team owns that component?",
    "Anything else before I close the incident?",
]


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class SetupError(Exception):
    pass


# --------------------------------------------------------------- processes

class Child:
    """A child process in its own process group, logging to a file."""

    registry: list["Child"] = []
    lock = threading.Lock()
    stopping = False  # set by stop_all: no (re)start after it

    def __init__(self, name: str, argv: list[str], log_path: str, env=None):
        self.name, self.argv, self.log_path, self.env = name, argv, log_path, env
        self.proc: subprocess.Popen | None = None
        with Child.lock:
            Child.registry.append(self)

    def start(self) -> None:
        # Under the lock, so that stop_all cannot miss a child started by the
        # killer thread at the very moment the run is interrupted.
        with Child.lock, open(self.log_path, "ab") as f:
            if Child.stopping:
                raise SetupError(f"not starting {self.name}: shutting down")
            f.write(f"\n=== {time.strftime('%H:%M:%S')} start: {' '.join(self.argv)}\n".encode())
            f.flush()
            self.proc = subprocess.Popen(
                self.argv, stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.STDOUT,
                env=self.env, start_new_session=True)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def signal_group(self, sig: int) -> None:
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def kill_now(self) -> None:
        """SIGKILL the whole group and reap it."""
        self.signal_group(signal.SIGKILL)
        if self.proc is not None:
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass

    def stop(self, grace: float = 5.0) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.signal_group(signal.SIGTERM)
            try:
                self.proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                pass
        # Whatever is left in the group (nginx workers, ...) goes too.
        self.kill_now()

    def log_tail(self, n: int = 15) -> str:
        try:
            with open(self.log_path, "rb") as f:
                lines = f.read().decode(errors="replace").splitlines()
            return "\n".join(lines[-n:])
        except OSError:
            return "(no log)"

    @classmethod
    def stop_all(cls) -> None:
        with cls.lock:
            cls.stopping = True
            children = list(cls.registry)
        for c in children:
            c.signal_group(signal.SIGTERM)
        deadline = time.monotonic() + 5
        for c in children:
            if c.proc is not None:
                try:
                    c.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    pass
            c.kill_now()


def http_status(port: int, path: str, timeout: float = 3.0) -> int | None:
    conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        resp.read()
        return resp.status
    except (OSError, http.client.HTTPException):
        return None
    finally:
        conn.close()


def wait_status_200(child: Child, port: int, path: str, timeout: float) -> float:
    """Poll GET path until 200; returns the seconds waited."""
    t0 = time.monotonic()
    last = None
    while time.monotonic() - t0 < timeout:
        if not child.alive():
            raise SetupError(f"{child.name} exited (status {child.proc.returncode}) before "
                             f"answering 200 on {path}; log {child.log_path}:\n{child.log_tail()}")
        last = http_status(port, path)
        if last == 200:
            return time.monotonic() - t0
        time.sleep(0.2)
    raise SetupError(f"{child.name} did not answer 200 on {path} within {timeout:.0f} s "
                     f"(last: {last}); log {child.log_path}:\n{child.log_tail()}")


def port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((HOST, port))
            return True
        except OSError:
            return False


def render_template(src: str, dst: str, values: dict[str, str]) -> None:
    with open(src) as f:
        text = f.read()
    for key, val in values.items():
        text = text.replace(f"@{key}@", val)
    left = sorted(set(re.findall(r"@[A-Z0-9_]+@", text)))
    if left:
        raise SetupError(f"{src}: placeholders left unfilled: {', '.join(left)}")
    with open(dst, "w") as f:
        f.write(text)


def start_balancer(args, workdir: str, node_ports: list[int]) -> Child:
    lb_port = args.base_port
    values = {
        "LISTEN": f"{HOST}:{lb_port}",
        "NODE1": f"{HOST}:{node_ports[0]}",
        "NODE2": f"{HOST}:{node_ports[1]}",
        "NODE3": f"{HOST}:{node_ports[2]}",
        "READY_PATH": READY_PATH,
    }
    if args.balancer == "nginx":
        exe = shutil.which(args.nginx_bin) or args.nginx_bin
        ndir = os.path.join(workdir, "nginx")
        os.makedirs(ndir, exist_ok=True)
        if os.geteuid() == 0:
            # As root, nginx's workers run as `nobody` and must reach their
            # temp directories under ndir.
            os.chmod(workdir, 0o711)
            os.chmod(ndir, 0o755)
        values["DIR"] = ndir
        conf = os.path.join(ndir, "nginx.conf")
        render_template(os.path.join(HERE, "nginx.conf.template"), conf, values)
        base = [exe, "-p", ndir, "-c", conf, "-e", os.path.join(ndir, "error.log"),
                "-g", "daemon off;"]
        check = subprocess.run(base + ["-t"], capture_output=True, text=True)
        if check.returncode != 0:
            raise SetupError(f"nginx -t failed:\n{check.stdout}{check.stderr}")
        child = Child("nginx", base, os.path.join(workdir, "nginx.stderr.log"))
    else:
        exe = shutil.which(args.haproxy_bin) or args.haproxy_bin
        conf = os.path.join(workdir, "haproxy.cfg")
        render_template(os.path.join(HERE, "haproxy.cfg.template"), conf, values)
        if args.hash_balance_factor is not None:
            with open(conf) as f:
                text = f.read()
            line = (f"hash-balance-factor {args.hash_balance_factor}" if args.hash_balance_factor
                    else "# hash-balance-factor: off (failover.py --hash-balance-factor 0)")
            text, n = re.subn(r"(?m)^(\s*)hash-balance-factor\s+\d+", lambda m: m.group(1) + line,
                              text)
            if n != 1:
                raise SetupError("haproxy.cfg.template has no hash-balance-factor line to change")
            with open(conf, "w") as f:
                f.write(text)
        check = subprocess.run([exe, "-c", "-f", conf], capture_output=True, text=True)
        if check.returncode != 0:
            raise SetupError(f"haproxy -c failed:\n{check.stdout}{check.stderr}")
        child = Child("haproxy", [exe, "-f", conf, "-db"], os.path.join(workdir, "haproxy.log"))
    child.start()
    waited = wait_status_200(child, lb_port, READY_PATH, 30)
    log(f"{child.name} on {HOST}:{lb_port} answers {READY_PATH} ({waited:.1f} s); config {conf}")
    return child


# ----------------------------------------------------------------- clients

def node_of(upstream: str | None) -> str | None:
    """The node that answered: the last address in X-Upstream-Addr (nginx
    lists every node it tried: "A, B" when it retried on B)."""
    if not upstream:
        return None
    last = upstream.split(",")[-1].strip()
    return last or None


def chat(port: int, session: str, messages: list, max_tokens: int, stream: bool,
         timeout: float) -> dict:
    body = {"messages": messages, "max_tokens": max_tokens, "temperature": 0}
    if stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    rec = {"status": None, "error": None, "upstream": None, "lb_retries": None, "node": None,
           "node_name": None, "prompt_tokens": None, "cached_tokens": None, "completion_tokens": None,
           "content": None}
    conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        conn.request("POST", "/v1/chat/completions", body=json.dumps(body).encode(),
                     headers={"Content-Type": "application/json", "X-Session-Id": session})
        resp = conn.getresponse()
        rec["status"] = resp.status
        rec["upstream"] = resp.getheader("X-Upstream-Addr")
        rec["lb_retries"] = resp.getheader("X-Upstream-Retries")  # HAProxy's %rc
        rec["node"] = node_of(rec["upstream"])
        rec["node_name"] = resp.getheader("X-Edgeinfer-Node")  # the node's own word
        if resp.status != 200:
            text = resp.read()[:300].decode(errors="replace")
            rec["error"] = f"HTTP {resp.status}: {text}"
            return rec
        usage = None
        if not stream:
            data = json.loads(resp.read())
            content = data["choices"][0]["message"].get("content") or ""
            usage = data.get("usage")
        else:
            parts, done = [], False
            while True:
                line = resp.readline()
                if not line:
                    break
                line = line.strip()
                if not line.startswith(b"data:"):
                    continue  # blank separators and ": keep-alive" comments
                payload = line[5:].strip()
                if payload == b"[DONE]":
                    done = True
                    break
                chunk = json.loads(payload)
                if chunk.get("error"):
                    raise RuntimeError(f"error event: {chunk['error']}")
                if chunk.get("usage"):
                    usage = chunk["usage"]
                for ch in chunk.get("choices") or []:
                    parts.append((ch.get("delta") or {}).get("content") or "")
            if not done:
                raise RuntimeError("stream cut off before [DONE]")
            content = "".join(parts)
        if not usage:
            raise RuntimeError("no usage in the response")
        rec["content"] = content
        rec["prompt_tokens"] = usage.get("prompt_tokens")
        rec["completion_tokens"] = usage.get("completion_tokens")
        rec["cached_tokens"] = (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
    except Exception as e:  # noqa: BLE001 - every failure is a data point
        rec["error"] = f"{type(e).__name__}: {e}"
    finally:
        conn.close()
    return rec


class Session:
    def __init__(self, idx: int, stream: bool):
        self.idx = idx
        self.id = f"sess-{idx}"
        self.stream = stream
        self.history: list[dict] = []

    def user_message(self, turn: int) -> str:
        topic = TOPICS[self.idx % len(TOPICS)]
        follow = FOLLOW_UPS[(self.idx + turn) % len(FOLLOW_UPS)]
        if turn == 1:
            return f"Incident {self.id}: {topic}. {follow}"
        return f"(turn {turn} of incident {self.id}) {follow}"


def run_turn(args, t0: float, sess: Session, turn: int) -> dict:
    user = sess.user_message(turn)
    messages = [{"role": "system", "content": SYSTEM_PROMPT}, *sess.history,
                {"role": "user", "content": user}]
    start = time.monotonic()
    rec = chat(args.base_port, sess.id, messages, args.max_tokens, sess.stream,
               args.request_timeout)
    end = time.monotonic()
    ok = rec["error"] is None
    if ok:
        # A failed turn leaves the history as it was: the next turn asks anew.
        sess.history += [{"role": "user", "content": user},
                         {"role": "assistant", "content": rec["content"]}]
    rec.pop("content")
    rec.update(session=sess.id, turn=turn, stream=sess.stream, ok=ok,
               start_s=round(start - t0, 3), end_s=round(end - t0, 3),
               wall_s=round(end - start, 3),
               # nginx lists every node it tried; HAProxy counts its retries.
               retried=bool((rec["upstream"] and "," in rec["upstream"])
                            or rec["lb_retries"] not in (None, "", "0")))
    return rec


# ------------------------------------------------------------------ report

def ratio(cached: int, prompt: int) -> float | None:
    return round(cached / prompt, 4) if prompt else None


def analyse(args, records: list[dict], sessions: list[Session], node_addrs: list[str],
            kill: dict) -> dict:
    K, T = args.kill_after_turn, args.turns
    killed = kill.get("node")

    def phase(turn: int) -> str:
        return "before" if turn <= K else ("kill" if turn == K + 1 else "after")

    by_sess: dict[str, dict[int, dict]] = {s.id: {} for s in sessions}
    for r in records:
        by_sess[r["session"]][r["turn"]] = r

    # Each session's node before the kill: the node of its last successful
    # turn up to K.
    pre_node: dict[str, str | None] = {}
    for sid, turns in by_sess.items():
        pre = [turns[t]["node"] for t in range(1, K + 1) if t in turns and turns[t]["ok"]]
        pre_node[sid] = pre[-1] if pre else None

    # Per turn.
    per_turn = []
    for turn in range(1, T + 1):
        rs = [r for r in records if r["turn"] == turn]
        ok = [r for r in rs if r["ok"]]
        p = sum(r["prompt_tokens"] or 0 for r in ok)
        c = sum(r["cached_tokens"] or 0 for r in ok)
        nodes = {n: sum(1 for r in ok if r["node"] == n) for n in node_addrs}
        per_turn.append({
            "turn": turn, "phase": phase(turn), "requests": len(rs), "ok": len(ok),
            "failed": len(rs) - len(ok), "retried_by_balancer": sum(r["retried"] for r in rs),
            "prompt_tokens": p, "cached_tokens": c, "cache_hit_ratio": ratio(c, p),
            "by_node": nodes,
            "wall_s_max": round(max((r["wall_s"] for r in rs), default=0), 2),
            "wall_s_mean": round(sum(r["wall_s"] for r in rs) / len(rs), 2) if rs else 0,
        })
    per_phase = {}
    for ph in ("before", "kill", "after"):
        ts = [x for x in per_turn if x["phase"] == ph]
        p = sum(x["prompt_tokens"] for x in ts)
        c = sum(x["cached_tokens"] for x in ts)
        per_phase[ph] = {"turns": [x["turn"] for x in ts], "prompt_tokens": p,
                         "cached_tokens": c, "cache_hit_ratio": ratio(c, p),
                         "requests": sum(x["requests"] for x in ts),
                         "failed": sum(x["failed"] for x in ts)}

    # Failures.
    failed = [r for r in records if not r["ok"]]
    # A failure is the kill's when it is in the kill round and the session
    # lived on the killed node, or the response (a cut stream) came from it.
    expected_fail = [r for r in failed
                     if r["turn"] == K + 1 and killed
                     and killed in (pre_node[r["session"]], r["node"])]
    unexpected_fail = [r for r in failed if r not in expected_fail]

    # Sessions. A move is explained by the kill when the session was on the
    # killed node and its turns from the kill round on read "home? away* home*":
    # the kill round's request perhaps answered at home before the kill, then
    # some turns elsewhere (while the node was down, or still held out by the
    # balancer's failure window after its restart), then back home for good,
    # or never back. Anything else (a move before the kill, a session of
    # another node moving, leaving home again once back) is a move the kill
    # does not explain.
    sess_rows = []
    for s in sessions:
        turns = by_sess[s.id]
        seq = [turns[t]["node"] if t in turns and turns[t]["ok"] else None
               for t in range(1, T + 1)]
        seen = [n for n in seq if n]
        pre = [n for n in seq[:K] if n]
        home = pre_node[s.id]
        on_killed = killed is not None and home == killed
        returned_turn = None
        if len(set(seen)) <= 1:
            cls = "kept" if len(seen) == T else "kept (some turns failed)"
        elif len(set(pre)) > 1:
            cls = "moved before the kill"
        elif not on_killed:
            cls = "moved (not by the kill)"
        else:
            post = [(t, n) for t, n in enumerate(seq[K:], start=K + 1) if n]
            if post and post[0] == (K + 1, home):
                post = post[1:]  # answered at home before the kill
            i = next((j for j, (_, n) in enumerate(post) if n == home), len(post))
            back = post[i:]
            if any(n != home for _, n in back):
                cls = "moved again after returning"
            elif not back:
                cls = "moved by kill, stayed moved"
            else:
                cls = "moved by kill, returned"
                returned_turn = back[0][0]
        sess_rows.append({"session": s.id, "stream": s.stream, "nodes": seq,
                          "pre_kill_node": home, "on_killed_node": on_killed,
                          "class": cls, "returned_at_turn": returned_turn})
    classes: dict[str, int] = {}
    for row in sess_rows:
        classes[row["class"]] = classes.get(row["class"], 0) + 1

    per_node = {n: {"ok": sum(1 for r in records if r["ok"] and r["node"] == n),
                    "failed": sum(1 for r in records if not r["ok"] and r["node"] == n),
                    "sessions_before_kill": sum(1 for v in pre_node.values() if v == n)}
                for n in node_addrs}
    unknown_fail = sum(1 for r in failed if r["node"] not in node_addrs)
    if unknown_fail:
        per_node["(no node header)"] = {"ok": 0, "failed": unknown_fail, "sessions_before_kill": 0}

    # Checks.
    reasons = []
    if unexpected_fail:
        ex = unexpected_fail[0]
        reasons.append(f"(a) {len(unexpected_fail)} failed request(s) not on the killed node "
                       f"in the kill round, e.g. {ex['session']} turn {ex['turn']}: {ex['error']}")
    moved_wrong = [r["session"] for r in sess_rows
                   if r["class"].startswith("moved") and not r["class"].startswith("moved by kill")]
    # HAProxy's bounded load moves a session whose node is over its bound, by design; up to
    # --max-load-moves of the sessions may move so (reported, not failed).
    allowed = 0
    if args.balancer == "haproxy" and args.hash_balance_factor != 0:
        allowed = int(args.max_load_moves * len(sessions))
    if len(moved_wrong) > allowed:
        reasons.append(f"(b) {len(moved_wrong)} session(s) moved for a reason other than the "
                       f"kill (see the moved sessions above): "
                       f"{', '.join(moved_wrong[:8])}{' ...' if len(moved_wrong) > 8 else ''}")
    # The balancer's header and the node's own must agree on who answered.
    disagree = [r for r in records if r["ok"] and r["node"] in node_addrs
                and r["node_name"] != f"node{node_addrs.index(r['node']) + 1}"]
    if disagree:
        ex = disagree[0]
        reasons.append(f"(d) {len(disagree)} answer(s) where X-Upstream-Addr and the node's "
                       f"x-edgeinfer-node disagree, e.g. {ex['node']} vs {ex['node_name']}")
    last = per_turn[-1]["cache_hit_ratio"]
    if last is None or last <= 0.5:
        reasons.append(f"(c) prefix-cache hit ratio of the last turn is {last}, not > 0.5")

    return {
        "summary": {
            "requests": len(records), "failed": len(failed),
            "failed_on_killed_node_in_kill_round": len(expected_fail),
            "failed_elsewhere": len(unexpected_fail),
            "moved_without_a_node_failure": len(moved_wrong),
            "failed_streams": sum(1 for r in failed if r["stream"]),
            "retried_by_balancer": sum(r["retried"] for r in records),
            "sessions": len(sessions),
            "sessions_on_killed_node": sum(1 for r in sess_rows if r["on_killed_node"]),
            "session_classes": classes,
        },
        "per_turn": per_turn, "per_phase": per_phase, "per_node": per_node,
        "sessions": sess_rows,
        "failures": [{k: r[k] for k in ("session", "turn", "stream", "status", "node",
                                        "upstream", "error", "start_s", "end_s")}
                     for r in failed],
        "checks": {"passed": not reasons, "reasons": reasons},
    }


def fmt_table(rows: list[list], header: list[str]) -> str:
    cells = [[str(c) for c in header]] + [["-" if c is None else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    out = []
    for j, r in enumerate(cells):
        out.append("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))))
        if j == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


def print_report(args, rep: dict, kill: dict, node_addrs: list[str]) -> None:
    s = rep["summary"]
    print()
    print(f"edgeinfer failover test: balancer={args.balancer} sessions={args.sessions} "
          f"turns={args.turns} max_tokens={args.max_tokens} kill after turn {args.kill_after_turn}")
    if kill.get("node"):
        print(f"killed {kill['node']} (node{kill['index'] + 1}, {kill['sessions']} sessions) "
              f"at t={kill['killed_at_s']} s, {kill['delay_after_round_start_s']} s into turn "
              f"{args.kill_after_turn + 1}; restarted at t={kill.get('restarted_at_s')} s, "
              f"ready at t={kill.get('ready_at_s')} s")
    print()
    print(f"requests: {s['requests']}   failed: {s['failed']} "
          f"(on the killed node in the kill round: {s['failed_on_killed_node_in_kill_round']}, "
          f"elsewhere: {s['failed_elsewhere']}; streams: {s['failed_streams']})   "
          f"retried by the balancer (visible): {s['retried_by_balancer']}")
    print(f"sessions: {s['sessions']}   on the killed node before the kill: "
          f"{s['sessions_on_killed_node']}")
    for cls, n in sorted(s["session_classes"].items()):
        print(f"  {cls:32} {n}")
    print()
    short = {n: f"n{i + 1}" for i, n in enumerate(node_addrs)}
    rows = []
    for t in rep["per_turn"]:
        dist = " ".join(f"{short[n]}={c}" for n, c in t["by_node"].items())
        rows.append([t["turn"], t["phase"], t["requests"], t["failed"], t["retried_by_balancer"],
                     t["prompt_tokens"], t["cached_tokens"], t["cache_hit_ratio"], dist,
                     t["wall_s_mean"], t["wall_s_max"]])
    print(fmt_table(rows, ["turn", "phase", "reqs", "failed", "retried", "prompt_tok",
                           "cached_tok", "hit_ratio", "answered by", "mean_s", "max_s"]))
    print()
    rows = [[ph, ",".join(map(str, v["turns"])), v["requests"], v["failed"], v["prompt_tokens"],
             v["cached_tokens"], v["cache_hit_ratio"]] for ph, v in rep["per_phase"].items()]
    print(fmt_table(rows, ["phase", "turns", "reqs", "failed", "prompt_tok", "cached_tok",
                           "hit_ratio"]))
    print()
    rows = [[f"{short.get(n, '?')} {n}" if n in short else n,
             v["sessions_before_kill"], v["ok"], v["failed"]]
            for n, v in rep["per_node"].items()]
    print(fmt_table(rows, ["node", "sessions_before_kill", "ok_requests", "failed_requests"]))
    moved = [r for r in rep["sessions"] if r["class"].startswith("moved")]
    if moved:
        print()
        print("moved sessions (node per turn):")
        for r in moved[:40]:
            seq = " ".join(short.get(n, "x") if n else "x" for n in r["nodes"])
            print(f"  {r['session']:9} {'stream' if r['stream'] else '      '} {seq}   {r['class']}")
        if len(moved) > 40:
            print(f"  ... {len(moved) - 40} more")
    if rep["failures"]:
        print()
        print("failed requests:")
        for f in rep["failures"][:20]:
            print(f"  {f['session']:9} turn {f['turn']} {'stream' if f['stream'] else 'plain '} "
                  f"node={f['node']} t={f['start_s']}..{f['end_s']} {f['error'][:110]}")
        if len(rep["failures"]) > 20:
            print(f"  ... {len(rep['failures']) - 20} more")
    print()
    if rep["checks"]["passed"]:
        moved = rep["summary"]["moved_without_a_node_failure"]
        kept = ("the other sessions kept their node" if not moved else
                f"{moved} session(s) moved with every node up (bounded load, within "
                f"--max-load-moves)")
        print("PASS: failures only on the killed node during the kill round, "
              f"{kept}, last-turn prefix-cache hit ratio "
              f"{rep['per_turn'][-1]['cache_hit_ratio']}")
    else:
        print("FAIL:")
        for r in rep["checks"]["reasons"]:
            print(f"  {r}")


# -------------------------------------------------------------------- main

def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--balancer", choices=["nginx", "haproxy"], required=True)
    ap.add_argument("--binary", default="target/release/edgeinfer")
    ap.add_argument("--model", default="models/SmolLM2-135M-Instruct.Q4_1.gguf")
    ap.add_argument("--sessions", type=int, default=64)
    ap.add_argument("--turns", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--base-port", type=int, default=18100,
                    help="the balancer's port; the nodes take the next three")
    ap.add_argument("--kill-after-turn", type=int, default=2,
                    help="kill a node while turn K+1 is in flight")
    ap.add_argument("--json", metavar="OUT.json", help="write the full report as JSON")
    ap.add_argument("--ready-path", default=READY_PATH,
                    help="the nodes' readiness path (default %(default)s; /health for "
                         "builds without /ready)")
    ap.add_argument("--workers", type=int, default=16, help="concurrent client threads")
    ap.add_argument("--node-threads", type=int, default=1, help="--threads for each node")
    ap.add_argument("--node-arg", action="append", default=[],
                    help="an extra argument for every node (repeat; write flags as --node-arg=--no-prefix-cache)")
    ap.add_argument("--request-timeout", type=float, default=120.0)
    ap.add_argument("--ready-timeout", type=float, default=300.0,
                    help="seconds a node may take to become ready")
    ap.add_argument("--kill-delay", type=float, default=0.3,
                    help="seconds into the kill round before the SIGKILL")
    ap.add_argument("--restart-delay", type=float, default=2.0,
                    help="seconds between the SIGKILL and the restart")
    ap.add_argument("--settle", type=float, default=0.0,
                    help="seconds to wait after the killed node is ready again before "
                         "the next round")
    ap.add_argument("--hash-balance-factor", type=int, metavar="PERCENT",
                    help="HAProxy only: replace the template's hash-balance-factor (bounded-"
                         "load consistent hashing); 0 turns bounded load off")
    ap.add_argument("--max-load-moves", type=float, default=0.15, metavar="FRACTION",
                    help="HAProxy with bounded load: the share of sessions that may change node "
                         "with every node up (bounded-load overflow) before check (b) fails")
    ap.add_argument("--nginx-bin", default="nginx")
    ap.add_argument("--haproxy-bin", default="haproxy")
    ap.add_argument("--keep", action="store_true",
                    help="keep the temp dir (logs, configs, databases) even on success")
    args = ap.parse_args(argv)
    if not 1 <= args.kill_after_turn <= args.turns - 2:
        ap.error("need 1 <= --kill-after-turn <= --turns - 2 (a round before the kill, the "
                 "kill round, and at least one round after it)")
    if args.sessions < 1 or args.workers < 1:
        ap.error("--sessions and --workers must be positive")
    return args


def on_signal(signum, _frame):
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv=None) -> int:
    global READY_PATH
    args = parse_args(argv)
    READY_PATH = args.ready_path
    # SIGINT too: a shell starts background jobs with SIGINT ignored, and
    # Python would then keep ignoring it.
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, on_signal)

    binary = os.path.abspath(args.binary)
    model = os.path.abspath(args.model)
    lb_exe = args.nginx_bin if args.balancer == "nginx" else args.haproxy_bin
    ports = [args.base_port + i for i in range(4)]
    problems = [f"{what} {path} does not exist"
                for path, what in ((binary, "--binary"), (model, "--model"))
                if not os.path.exists(path)]
    if not shutil.which(lb_exe):
        problems.append(f"{lb_exe} not found on PATH (apt-get install -y nginx haproxy)")
    busy = [p for p in ports if not port_free(p)]
    if busy:
        problems.append(f"ports in use: {busy} (choose another --base-port)")
    if problems:
        log("setup failed: " + "; ".join(problems))
        return 3

    workdir = tempfile.mkdtemp(prefix="edgeinfer-failover-")
    log(f"work dir {workdir} (node logs, balancer config and logs)")
    pool = None
    passed = False
    try:
        node_ports = ports[1:]
        node_addrs = [f"{HOST}:{p}" for p in node_ports]

        # A node must not pick up a master key from the caller's environment
        # (it would turn key checks on and every request here would be 401).
        env = {k: v for k, v in os.environ.items() if k != "EDGEINFER_MASTER_KEY"}
        nodes = []
        for i, port in enumerate(node_ports):
            ndir = os.path.join(workdir, f"node{i + 1}")
            os.makedirs(ndir)
            argv_node = [binary, "serve", "--model", model, "--host", HOST, "--port", str(port),
                         "--threads", str(args.node_threads), "--data-dir", ndir,
                         "--node-name", f"node{i + 1}",
                         "--db", os.path.join(ndir, "edgeinfer.db"), *args.node_arg]
            nodes.append(Child(f"node{i + 1}", argv_node,
                               os.path.join(workdir, f"node{i + 1}.log"), env=env))
        for n in nodes:
            n.start()
        for n, port in zip(nodes, node_ports):
            waited = wait_status_200(n, port, READY_PATH, args.ready_timeout)
            log(f"{n.name} on {HOST}:{port} ready ({waited:.1f} s)")
        lb = start_balancer(args, workdir, node_ports)

        sessions = [Session(i, stream=(i % 4 == 0)) for i in range(args.sessions)]
        records: list[dict] = []
        kill: dict = {}
        t0 = time.monotonic()
        pool = concurrent.futures.ThreadPoolExecutor(max_workers=args.workers)

        def killer(target: int, round_start: float):
            n = nodes[target]
            time.sleep(max(0.0, args.kill_delay - (time.monotonic() - round_start)))
            n.kill_now()
            kill["killed_at_s"] = round(time.monotonic() - t0, 3)
            kill["delay_after_round_start_s"] = round(time.monotonic() - round_start, 3)
            log(f"SIGKILL {n.name} ({node_addrs[target]})")
            time.sleep(args.restart_delay)
            if not port_free(node_ports[target]):
                log(f"warning: port {node_ports[target]} still busy after the kill")
            try:
                n.start()
                kill["restarted_at_s"] = round(time.monotonic() - t0, 3)
                log(f"restarted {n.name}")
                waited = wait_status_200(n, node_ports[target], READY_PATH, args.ready_timeout)
                kill["ready_at_s"] = round(time.monotonic() - t0, 3)
                log(f"{n.name} ready again ({waited:.1f} s after the restart)")
            except SetupError as e:
                kill["restart_error"] = str(e)
                log(f"restart failed: {e}")

        kill_thread = None
        for turn in range(1, args.turns + 1):
            round_start = time.monotonic()
            futures = [pool.submit(run_turn, args, t0, s, turn) for s in sessions]
            if turn == args.kill_after_turn + 1:
                # The node with the most sessions in the round before.
                prev = [r for r in records if r["turn"] == args.kill_after_turn and r["ok"]]
                counts = [sum(1 for r in prev if r["node"] == a) for a in node_addrs]
                target = max(range(3), key=lambda i: (counts[i], -i))
                kill.update(node=node_addrs[target], index=target, sessions=counts[target])
                kill_thread = threading.Thread(target=killer, args=(target, round_start),
                                               daemon=True)
                kill_thread.start()
            done = [f.result() for f in futures]
            records += done
            nfail = sum(1 for r in done if not r["ok"])
            log(f"turn {turn}: {len(done)} requests, {nfail} failed, "
                f"{time.monotonic() - round_start:.1f} s")
            if kill_thread is not None and turn == args.kill_after_turn + 1:
                kill_thread.join()
                if "restart_error" in kill:
                    raise SetupError(kill["restart_error"])
                if args.settle > 0:
                    time.sleep(args.settle)

        rep = analyse(args, records, sessions, node_addrs, kill)
        rep["kill"] = kill
        rep["config"] = {k: v for k, v in vars(args).items()}
        rep["nodes"] = node_addrs
        rep["workdir"] = workdir
        rep["requests"] = records
        print_report(args, rep, kill, node_addrs)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(rep, f, indent=1)
            log(f"wrote {args.json}")
        passed = rep["checks"]["passed"]
        return 0 if passed else 1
    except SetupError as e:
        log(f"setup failed: {e}")
        return 3
    except KeyboardInterrupt as e:
        log(f"interrupted ({e or 'Ctrl-C'}); stopping children")
        return 130
    finally:
        Child.stop_all()
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)
        if passed and not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            log(f"logs kept in {workdir}")


if __name__ == "__main__":
    sys.exit(main())
