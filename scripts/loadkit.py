"""Shared pieces of the abuse scripts (flood.py, soak.py, slowloris.py): one streaming chat
completion over raw asyncio sockets (HTTP/1.1, chunked SSE), with an optional disconnect
in a chosen phase, and percentiles. Standard library only."""
import asyncio
import json
import time
import urllib.parse

PROMPTS = [
    "Write a short story about a lighthouse keeper.",
    "Explain how a bicycle works.",
    "Describe the water cycle in detail.",
    "Tell me about the history of bread.",
    "What makes a good friend? Answer at length.",
    "Describe a walk through a forest in autumn.",
    "Explain why the sky is blue.",
    "Write a letter to a future version of yourself.",
]


def host_port(url):
    u = urllib.parse.urlparse(url)
    return u.hostname, u.port or 80


def pct(xs, p):
    xs = sorted(xs)
    if not xs:
        return float("nan")
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


async def _read_head(reader):
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        if ":" in line:
            k, v = line.split(":", 1)
            headers[k.strip().lower()] = v.strip()
    return status, headers


async def _body_chunks(reader, headers):
    """Yields the body's bytes as they arrive (chunked or content-length)."""
    if headers.get("transfer-encoding", "").lower() == "chunked":
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            if size == 0:
                await reader.readuntil(b"\r\n")
                return
            data = await reader.readexactly(size)
            await reader.readexactly(2)
            yield data
    elif "content-length" in headers:
        n = int(headers["content-length"])
        if n:
            yield await reader.readexactly(n)
    else:
        while True:
            data = await reader.read(65536)
            if not data:
                return
            yield data


async def chat_stream(url, prompt, max_tokens=64, api_key=None, disconnect=None,
                      disconnect_after_tokens=3, timeout=600):
    """One streaming chat completion. `disconnect`: None, "queued" (close right after
    sending), "prefill" (close at the response headers) or "decode" (close after some
    tokens). Returns a dict: status (int, or "reset"/"error"/"timeout"), latency (send to
    headers), ttft, tokens, done (saw [DONE]), retry_after, error."""
    host, port = host_port(url)
    out = {"status": None, "latency": None, "ttft": None, "tokens": 0, "done": False,
           "retry_after": None, "error": None, "disconnected": disconnect}
    body = json.dumps({"messages": [{"role": "user", "content": prompt}],
                       "max_tokens": max_tokens, "temperature": 0, "stream": True}).encode()
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}:{port}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n")
    if api_key:
        head += f"Authorization: Bearer {api_key}\r\n"
    head += "Connection: close\r\n\r\n"
    writer = None
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(host, port)
            start = time.perf_counter()
            writer.write(head.encode() + body)
            await writer.drain()
            if disconnect == "queued":
                out["status"] = "self"
                return out
            status, headers = await _read_head(reader)
            out["latency"] = time.perf_counter() - start
            out["status"] = status
            out["retry_after"] = headers.get("retry-after")
            if status != 200:
                raw = b"".join([c async for c in _body_chunks(reader, headers)])
                try:
                    out["error"] = json.loads(raw)["error"]["message"]
                except Exception:
                    out["error"] = f"not OpenAI's error shape: {raw[:120]!r}"
                return out
            if disconnect == "prefill":
                return out
            buf = b""
            async for data in _body_chunks(reader, headers):
                buf += data
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    line = line.strip()
                    if not line.startswith(b"data: "):
                        continue
                    payload = line[6:]
                    if payload == b"[DONE]":
                        out["done"] = True
                        continue
                    chunk = json.loads(payload)
                    if "error" in chunk:
                        out["error"] = chunk["error"].get("message")
                    for choice in chunk.get("choices", []):
                        if choice.get("delta", {}).get("content"):
                            out["tokens"] += 1
                            if out["ttft"] is None:
                                out["ttft"] = time.perf_counter() - start
                    if disconnect == "decode" and out["tokens"] >= disconnect_after_tokens:
                        return out
    except TimeoutError:
        out["status"] = "timeout"
    except (ConnectionResetError, BrokenPipeError, asyncio.IncompleteReadError) as e:
        out["status"] = out["status"] if disconnect else "reset"
        out["error"] = repr(e)
    except Exception as e:  # noqa: BLE001 - reported, never hidden
        out["status"] = "error"
        out["error"] = repr(e)
    finally:
        if writer is not None:
            writer.close()
    return out


async def clients(url, n, requests_each, max_tokens=64, api_key=None):
    """`n` clients, each sending `requests_each` streams one after another."""
    results = []

    async def client(i):
        for r in range(requests_each):
            results.append(await chat_stream(url, PROMPTS[(i + r) % len(PROMPTS)], max_tokens,
                                             api_key))

    await asyncio.gather(*(client(i) for i in range(n)))
    return results


def metrics(url):
    """The server's /metrics as {name: value} (first sample of each name)."""
    import urllib.request
    text = urllib.request.urlopen(url.rstrip("/") + "/metrics", timeout=10).read().decode()
    out = {}
    for line in text.splitlines():
        if line.startswith("#") or " " not in line:
            continue
        name, value = line.rsplit(" ", 1)
        out.setdefault(name.split("{")[0], float(value))
    return out


def rss_mib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")
