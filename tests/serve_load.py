"""A bounded load test of a running ``genlab serve``: N requests from C concurrent clients, latency and throughput.

    python tests/serve_load.py --url http://127.0.0.1:8000 --requests 200 --clients 16 --model vae

Prints one JSON object: status counts, p50/p95/max latency of the 200s, requests/s, and whether every 200 was a
valid PNG. The suite runs it against a live server (tests/test_serve.py); run it by hand for bigger figures.
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def one_request(url: str, body: dict, timeout: float) -> tuple[int, float, bool, dict]:
    """(status, seconds, a valid PNG?, headers) of one POST /generate-image."""
    data = json.dumps(body).encode()
    request = urllib.request.Request(f"{url}/generate-image", data=data, method="POST",
                                     headers={"Content-Type": "application/json", "Accept": "image/png"})
    started = time.perf_counter()
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            payload = response.read()
            return response.status, time.perf_counter() - started, payload.startswith(PNG_MAGIC), dict(response.headers)
    except urllib.error.HTTPError as err:
        err.read()
        return err.code, time.perf_counter() - started, False, dict(err.headers)


def load_test(url: str, requests: int = 200, clients: int = 16, model: str = "vae", prompt: str = "a red circle",
              timeout: float = 60.0) -> dict:
    lock = threading.Lock()
    results: list[tuple[int, float, bool, dict]] = []

    def client(index: int) -> None:
        outcome = one_request(url, {"prompt": prompt, "model": model, "n": 1, "seed": index}, timeout)
        with lock:
            results.append(outcome)

    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=clients) as pool:
        list(pool.map(client, range(requests)))
    seconds = time.perf_counter() - started
    ok = sorted(latency for status, latency, _, _ in results if status == 200)
    statuses = Counter(status for status, _, _, _ in results)

    def quantile(q: float) -> float | None:
        return ok[min(len(ok) - 1, int(q * len(ok)))] if ok else None

    return {
        "requests": requests, "clients": clients, "model": model, "seconds": seconds,
        "statuses": {str(k): v for k, v in sorted(statuses.items())},
        "ok_per_second": len(ok) / seconds,
        "p50_s": quantile(0.5), "p95_s": quantile(0.95), "max_s": ok[-1] if ok else None,
        "mean_s": statistics.fmean(ok) if ok else None,
        "every_200_is_png": all(png for status, _, png, _ in results if status == 200),
        "every_503_has_retry_after": all({key.lower() for key in headers} >= {"retry-after"}
                                         for status, _, _, headers in results if status == 503),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--model", default="vae")
    parser.add_argument("--prompt", default="a red circle")
    options = parser.parse_args()
    print(json.dumps(load_test(options.url, options.requests, options.clients, options.model, options.prompt),
                     indent=2))


if __name__ == "__main__":
    main()
