#!/usr/bin/env python3
"""How much memory a large Batch API input costs the server: starts `edgeinfer serve` on a
fresh data directory, uploads a JSONL batch file of about `--mib` MiB (`--requests` chat
requests, each padded to size), creates a batch from it and cancels it at once, and reports
the server's peak resident memory (VmHWM, reset through /proc/PID/clear_refs first) over
its resident memory before the upload: after the upload, and after the batch's creation
(the peak of both; the allocator keeps some of what the upload freed for the creation).
Then it restarts the server on the same data and downloads the file
(`GET /v1/files/{id}/content`), reporting that peak over the fresh server's resident memory.
Standard library only; Linux only.

  scripts/batch_memory_probe.py target/release/edgeinfer --mib 190 --requests 50000
"""
import argparse
import json
import os
import subprocess
import tempfile
import time
import urllib.request
import uuid


def rss(pid, field):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} for {pid}")


def reset_peak(pid):
    with open(f"/proc/{pid}/clear_refs", "w") as f:
        f.write("5")


def call(url, method, path, body=None, content_type="application/json"):
    req = urllib.request.Request(url + path, data=body, method=method)
    if body is not None:
        req.add_header("Content-Type", content_type)
    with urllib.request.urlopen(req, timeout=1200) as r:
        return json.loads(r.read())


def batch_file(mib, requests):
    size = mib * 1024 * 1024 // requests
    lines = []
    for i in range(requests):
        line = {"custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions",
                "body": {"max_tokens": 1, "messages": [{"role": "user", "content": ""}]}}
        pad = max(0, size - len(json.dumps(line)) - 1)
        line["body"]["messages"][0]["content"] = ("lorem ipsum " * (pad // 12 + 1))[:pad]
        lines.append(json.dumps(line))
    return ("\n".join(lines) + "\n").encode()


def start(args, data, url):
    server = subprocess.Popen([args.binary, "serve", "--port", str(args.port),
                               "--data-dir", data],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while True:
        try:
            urllib.request.urlopen(url + "/ready", timeout=5)
            return server
        except OSError:
            if server.poll() is not None:
                raise SystemExit(f"the server exited with status {server.returncode}")
            time.sleep(0.2)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("binary")
    ap.add_argument("--mib", type=int, default=190)
    ap.add_argument("--requests", type=int, default=50_000)
    ap.add_argument("--port", type=int, default=8099)
    args = ap.parse_args()
    url = f"http://127.0.0.1:{args.port}"
    content = batch_file(args.mib, args.requests)
    boundary = uuid.uuid4().hex
    form = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nbatch\r\n"
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; "
            f"filename=\"in.jsonl\"\r\nContent-Type: application/jsonl\r\n\r\n").encode()
    form += content + f"\r\n--{boundary}--\r\n".encode()
    with tempfile.TemporaryDirectory() as data:
        server = start(args, data, url)
        try:
            pid = server.pid
            base = rss(pid, "VmRSS")
            reset_peak(pid)
            t = time.perf_counter()
            f = call(url, "POST", "/v1/files", form, f"multipart/form-data; boundary={boundary}")
            upload_s = time.perf_counter() - t
            upload_peak = rss(pid, "VmHWM")
            t = time.perf_counter()
            b = call(url, "POST", "/v1/batches", json.dumps(
                {"input_file_id": f["id"], "endpoint": "/v1/chat/completions",
                 "completion_window": "24h"}).encode())
            create_s = time.perf_counter() - t
            peak = rss(pid, "VmHWM")
            call(url, "POST", f"/v1/batches/{b['id']}/cancel", b"")
            server.terminate()
            server.wait()
            server = start(args, data, url)
            pid = server.pid
            fresh = rss(pid, "VmRSS")
            reset_peak(pid)
            t = time.perf_counter()
            got = 0
            with urllib.request.urlopen(url + f"/v1/files/{f['id']}/content", timeout=1200) as r:
                while chunk := r.read(1 << 20):
                    got += len(chunk)
            download_s = time.perf_counter() - t
            assert got == len(content), f"downloaded {got} bytes of {len(content)}"
            download_peak = rss(pid, "VmHWM")
            mib = 1024 * 1024
            print(json.dumps({
                "binary": args.binary, "file_mib": round(len(content) / mib, 1),
                "requests": b["request_counts"]["total"], "status": b["status"],
                "rss_before_mib": round(base / mib), "upload_peak_over_before_mib":
                round((upload_peak - base) / mib), "upload_s": round(upload_s, 2),
                "peak_over_before_mib": round((peak - base) / mib),
                "create_s": round(create_s, 2),
                "download_peak_over_before_mib": round((download_peak - fresh) / mib),
                "download_s": round(download_s, 2)}))
        finally:
            server.terminate()
            server.wait()


if __name__ == "__main__":
    main()
