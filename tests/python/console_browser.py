"""Drives the built-in console in headless Chromium (Debian's, through Playwright) against a
running node with keys on: the page asks for a key, then a prompt streams its reply, JSON mode
gives JSON, the live charts and the usage table update. Prints a JSON report; exits non-zero
(with the reason on stderr) when something fails.

    python console_browser.py BASE KEY CHROMIUM SCREENSHOT.png
"""
import json
import sys
import time

from playwright.sync_api import sync_playwright

base, key, chromium, shot = sys.argv[1:5]
report = {}


def check(cond, what):
    if not cond:
        print(f"FAILED: {what}\nreport so far: {json.dumps(report)}", file=sys.stderr)
        sys.exit(1)


def wait_js(page, expr, timeout):
    """Polls a JS expression until it is truthy (page.wait_for_function would need eval,
    which the console's Content-Security-Policy forbids, as it should)."""
    deadline = time.time() + timeout / 1000
    while time.time() < deadline:
        if page.evaluate(expr):
            return
        time.sleep(0.1)
    check(False, f"timed out waiting for {expr}")


def send_and_watch(page, prompt):
    """Sends a prompt; samples the reply's text while it streams. Returns the lengths seen."""
    page.fill("#prompt", prompt)
    before = page.locator(".msg.assistant").count()
    page.click("#send")
    reply = page.locator(".msg.assistant").nth(before)
    reply.wait_for()
    lengths = []
    deadline = time.time() + 120
    while time.time() < deadline:
        text = reply.locator(".text").text_content() or ""
        if not lengths or lengths[-1] != len(text):
            lengths.append(len(text))
        if page.is_enabled("#send") and page.locator("#reply-stats").text_content():
            break
        time.sleep(0.02)
    text = reply.locator(".text").text_content() or ""
    if lengths[-1] != len(text):  # the last pieces landed between the two reads above
        lengths.append(len(text))
    return text, lengths


with sync_playwright() as p:
    browser = p.chromium.launch(
        executable_path=chromium,
        headless=True,
        args=[
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
        ],
    )
    page = browser.new_page(viewport={"width": 1360, "height": 900})
    console_errors = []
    page.on("console", lambda m: m.type == "error" and console_errors.append(m.text))
    page.on("pageerror", lambda e: console_errors.append(str(e)))
    page.goto(base + "/")

    # Keys are on: without one the console says so and shows no model.
    page.wait_for_selector("#auth-error:not([hidden])", timeout=15000)
    report["without_key"] = page.text_content("#auth-error")
    check("key" in report["without_key"].lower(), "the 401 message names the key")
    page.fill("#api-key", key)
    page.dispatch_event("#api-key", "change")
    wait_js(page, "document.getElementById('model').textContent.includes('context')", timeout=15000)
    report["model"] = page.text_content("#model")
    wait_js(page, "document.getElementById('node-status').textContent === 'ready'", timeout=15000)
    check(page.is_hidden("#auth-error"), "the 401 message goes away with the key")
    check(page.evaluate("localStorage.getItem('edgeinfer.key')") is None
          and page.evaluate("sessionStorage.getItem('edgeinfer.key')") == key,
          "the key is kept for the tab only (sessionStorage), never in localStorage")
    # The 401s above were expected; from here on the page must log no error.
    console_errors.clear()

    points_before = int(page.get_attribute("#c-throughput", "data-points") or 0)

    # A prompt streams its reply: the text grows in several steps before the reply ends.
    page.fill("#system", "You are a poet. Answer in verse.")
    page.fill("#temperature", "0")
    # 200 tokens stream for long enough to be sampled in pieces on a fast host too.
    page.fill("#max-tokens", "200")
    text, lengths = send_and_watch(page, "Write a short poem about the sea.")
    report["reply"] = text
    report["lengths_seen"] = lengths
    report["reply_stats"] = page.text_content("#reply-stats")
    check(len(text) > 20, "the reply has text")
    check(len([n for n in lengths if 0 < n < len(text)]) >= 3, "the text arrived in pieces (streamed)")
    check("200 out" in report["reply_stats"] or "stop" in report["reply_stats"], "the reply's usage is shown")

    # JSON mode: the reply is JSON.
    page.check("#json-mode")
    page.fill("#max-tokens", "64")
    text, _ = send_and_watch(page, "Give the capital of France as a JSON object with a key city.")
    report["json_reply"] = text
    try:
        json.loads(text)
        parsed = True
    except ValueError:
        parsed = False
    check(parsed or "length" in page.text_content("#reply-stats"), "JSON mode gives JSON")

    # The live panels move: new samples, throughput above zero while generating, a TTFT.
    wait_js(
        page,
        "Math.max(...state.samples.map(s => s.throughput)) > 0", timeout=10000
    )
    time.sleep(1.5)
    report["chart_points"] = [points_before, int(page.get_attribute("#c-throughput", "data-points"))]
    check(report["chart_points"][1] > report["chart_points"][0], "the charts gained samples")
    report["peak_tok_s"] = page.evaluate("Math.max(...state.samples.map(s => s.throughput))")
    report["ttft_ms"] = page.evaluate(
        "state.samples.map(s => s.ttft).filter(v => v !== null)"
    )
    check(len(report["ttft_ms"]) >= 1 and report["ttft_ms"][0] > 0, "a TTFT was drawn")
    # The usage table shows this key's requests from the ledger.
    wait_js(
        page,
        "[...document.querySelectorAll('#usage tbody tr')].some(r => Number(r.children[1].textContent) >= 2)",
        timeout=15000,
    )
    report["usage_rows"] = page.eval_on_selector_all(
        "#usage tbody tr", "rows => rows.map(r => [...r.children].map(c => c.textContent))"
    )
    page.screenshot(path=shot, full_page=True)
    report["console_errors"] = console_errors
    check(not console_errors, "no errors in the page's console")
    browser.close()

print(json.dumps(report))
