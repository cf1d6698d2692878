"""Start `carbon-proxy demo` from an installed package, wait until a request through the
proxy gets its figures, check the admin listener (metrics, live page and its assets),
then stop it with Ctrl-C (SIGINT) and expect a clean exit. Standard library only.

    python .ci/demo_smoke.py /path/to/venv/bin/carbon-proxy
"""

from __future__ import annotations

import json
import queue
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request

DEADLINE_SECONDS = 60.0


def fail(message: str, process: subprocess.Popen[str] | None = None) -> None:
    if process is not None and process.poll() is None:
        process.kill()
    print(f"demo smoke: {message}", file=sys.stderr)
    raise SystemExit(1)


def main(executable: str) -> None:
    process = subprocess.Popen(
        [executable, "demo", "--port", "0", "--admin-port", "0", "--sim-port", "0", "--traffic"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in process.stdout], daemon=True).start()  # type: ignore[union-attr]
    urls: dict[str, str] = {}
    output: list[str] = []
    deadline = time.monotonic() + DEADLINE_SECONDS
    while not {"proxy", "metrics"} <= urls.keys():
        try:
            line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
        except queue.Empty:
            fail("no banner with the proxy's URL:\n" + "".join(output), process)
        output.append(line)
        match = re.match(r"\s+(proxy|metrics|live)\s+(http://\S+)", line)
        if match:
            urls[match.group(1)] = match.group(2)
        if process.poll() is not None and lines.empty():
            fail(f"exited with {process.returncode}:\n" + "".join(output), process)

    body = json.dumps({"model": "sim-llm", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 8}).encode()
    request = urllib.request.Request(urls["proxy"] + "/v1/chat/completions", body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        answer = json.loads(response.read())
        grams = float(response.headers["X-CO2e-Grams"])
    if not answer.get("choices") or grams <= 0:
        fail(f"no completion or no CO2e figure through the proxy: {answer} {grams}", process)
    print(f"demo smoke: chat completion through the proxy, X-CO2e-Grams {grams:g}")

    with urllib.request.urlopen(urls["metrics"], timeout=10) as response:
        metrics = response.read().decode()
    if "carbon_proxy_requests_total" not in metrics:
        fail("/metrics has no carbon_proxy_requests_total", process)

    if "live" in urls:  # the live page and every asset it links must come from the wheel
        base = urls["live"].rstrip("/")
        with urllib.request.urlopen(base + "/", timeout=10) as response:
            page = response.read().decode()
        assets = re.findall(r'(?:src|href)="(/live/[^"]+)"', page)
        if not assets:
            fail("the live page links no assets", process)
        for asset in assets:
            with urllib.request.urlopen(base + asset, timeout=10) as response:
                if response.status != 200 or not response.read():
                    fail(f"live page asset {asset} is missing", process)
        print(f"demo smoke: live page and {len(assets)} asset(s) served")

    process.send_signal(signal.SIGINT)
    try:
        code = process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        fail("did not stop within 30 s of SIGINT", process)
    if code != 0:
        fail(f"exited with {code} after SIGINT", process)


if __name__ == "__main__":
    main(sys.argv[1])
