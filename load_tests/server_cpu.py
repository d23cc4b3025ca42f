"""Server CPU per request: start a server, send single-sample V2 requests from C client threads,
read the server process's CPU time from /proc before and after.

    python -m load_tests.server_cpu BUNDLE --requests 3000 --clients 8 [--format json] [--client httpx]
    # an older checkout, for a before/after figure (its entry point was `server.cli`):
    python -m load_tests.server_cpu BUNDLE --root /path/to/old/checkout --module server.cli
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from functools import partial
from pathlib import Path

from load_tests.run_locust import cpu_seconds, free_port

ROOT = Path(__file__).resolve().parents[1]


def _bodies(bundle: Path, count: int, fmt: str) -> list[tuple[bytes, dict[str, str]]]:
    """Single-sample requests on the test split of the bundle's own data set (the bench's encoders),
    binary in and out as tritonclient sends by default, or JSON."""
    from load_tests.data import test_split_for
    from server.bundle import load_bundle
    from server.http.codec import encode_request
    from server.http.text_codec import encode_text_request

    manifest = load_bundle(bundle).manifest
    data = test_split_for(manifest)
    binary = fmt == "binary"
    encode = encode_text_request if data.is_text else partial(encode_request, input_name=manifest.input.name)
    return [encode(data.x[i % len(data):i % len(data) + 1], binary=binary, binary_output=True if binary else None)
            for i in range(count)]


def measure(bundle: Path, root: Path, module: str, requests: int, clients: int, fmt: str,
            client: str = "raw") -> dict:
    import httpx

    from load_tests.raw_client import RawHttpClient

    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("OFFRAMP_")}
    env["PYTHONPATH"] = str(root)
    cmd = [sys.executable, "-m", module, "serve", "--bundle", str(bundle), "--port", str(port), "--host", "127.0.0.1",
           "--intra-op-threads", "1", "--state-dir", f"/tmp/offramp-cpu-state-{port}", "--log-level", "warning"]
    proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    model = json.loads((bundle / "manifest.json").read_text())["name"]
    bodies = _bodies(bundle, 300, fmt)
    try:
        for _ in range(600):  # bounded: up to a minute for the server to start
            try:
                if httpx.get(base + "/v2/health/ready").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        else:
            raise RuntimeError(f"{module} serve on {base} was not ready within a minute")

        def run(n: int) -> None:
            c = RawHttpClient(base) if client == "raw" else httpx.Client(base_url=base)
            try:
                for i in range(n):
                    body, headers = bodies[i % len(bodies)]
                    r = c.post(f"/v2/models/{model}/infer", content=body, headers=headers)
                    assert r.status_code == 200, r.text
            finally:
                c.close()

        run(200)  # warm up
        cpu0, began = cpu_seconds(proc.pid), time.perf_counter()
        threads = [threading.Thread(target=run, args=(requests // clients,)) for _ in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        seconds, used = time.perf_counter() - began, cpu_seconds(proc.pid) - cpu0
    finally:
        proc.terminate()
        proc.wait(30)
    done = (requests // clients) * clients
    return {"module": module, "root": str(root), "format": fmt, "client": client, "requests": done, "seconds": seconds,
            "requests_per_s": done / seconds, "server_cpu_ms_per_request": 1e3 * used / done}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m load_tests.server_cpu", description=__doc__.split("\n\n")[0])
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--root", type=Path, default=ROOT, help="the checkout whose server runs")
    parser.add_argument("--module", default="offramp.cli", help="its entry module (server.cli before the front door)")
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--format", choices=["binary", "json"], default="binary")
    parser.add_argument("--client", choices=["raw", "httpx"], default="raw",
                        help="the load generator's client (raw: load_tests/raw_client.py)")
    args = parser.parse_args(argv)
    r = measure(args.bundle, args.root, args.module, args.requests, args.clients, args.format, args.client)
    print(f"{r['module']} ({r['format']}, {r['client']} client): {r['requests']} requests in {r['seconds']:.1f} s "
          f"({r['requests_per_s']:.0f}/s), server CPU {r['server_cpu_ms_per_request']:.3f} ms per request")
    return 0


if __name__ == "__main__":
    sys.exit(main())
