"""The scrape cost of a proxy with many series, as a client and as Prometheus see it.

Run: .venv/bin/python bench/viz_scrape.py [--series 1000] [--scrapes 30]

One `tether proxy` on loopback whose destinations file maps N authorities (svc-0 ... svc-N-1) to one
small HTTP backend; one request to each makes N outbound HTTP series (request_total, response_total
and a 26-bucket latency histogram each). Then: the time to GET /metrics (median and p90 of
--scrapes sequential scrapes), the bytes and sample lines of one scrape, the proxy's CPU per scrape,
and what a real Prometheus (Debian's, scraping every second for --prom-seconds) reports as
scrape_duration_seconds and scrape_samples_scraped. Everything stops at the end.
"""

from __future__ import annotations

import argparse
import http.client
import json
import shutil
import statistics
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import TETHER, cpu_seconds, free_port, http_ok, rss_kib, start, wait_ready, wait_until


class Ok(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, format: str, *args: object) -> None:
        pass


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--series", type=int, default=1000)
    p.add_argument("--scrapes", type=int, default=30)
    p.add_argument("--prom-seconds", type=float, default=15.0)
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="tether-viz-scrape-"))
    backend = ThreadingHTTPServer(("127.0.0.1", 0), Ok)
    threading.Thread(target=backend.serve_forever, daemon=True).start()
    bport = backend.server_address[1]
    names = [f"svc-{i}.bench.svc.cluster.local:8080" for i in range(args.series)]
    (work / "destinations.yaml").write_text(
        "destinations:\n" + "".join(f'  "{n}": ["127.0.0.1:{bport}"]\n' for n in names))
    out_port, admin_port = free_port(), free_port()
    proxy = start("proxy", [str(TETHER), "proxy", "--outbound-addr", f"127.0.0.1:{out_port}",
                            "--admin-addr", f"127.0.0.1:{admin_port}", "--inbound-addr", f"127.0.0.1:{free_port()}",
                            "--destinations-file", str(work / "destinations.yaml")], work)
    prom = None
    try:
        wait_ready(proxy, http_ok(f"http://127.0.0.1:{admin_port}/ready"), 30, "tether /ready")
        conn = http.client.HTTPConnection("127.0.0.1", out_port, timeout=10)
        for n in names:
            conn.request("GET", "/", headers={"Host": n})
            r = conn.getresponse()
            r.read()
            if r.status != 200:
                raise SystemExit(f"request to {n}: {r.status}")
        conn.close()
        url = f"http://127.0.0.1:{admin_port}/metrics"
        with urllib.request.urlopen(url, timeout=30) as r:
            body = r.read()
        lines = [ln for ln in body.decode().splitlines() if ln and not ln.startswith("#")]
        http_series = sum(1 for ln in lines if ln.startswith("request_total{") and 'direction="outbound"' in ln)
        times = []
        cpu0 = cpu_seconds(proxy.pid)
        for _ in range(args.scrapes):
            t0 = time.perf_counter()
            with urllib.request.urlopen(url, timeout=30) as r:
                r.read()
            times.append(time.perf_counter() - t0)
        cpu = (cpu_seconds(proxy.pid) - cpu0) / args.scrapes
        times.sort()
        result = {
            "series": args.series, "outboundHttpSeries": http_series, "sampleLines": len(lines),
            "bytes": len(body), "scrapeMsMedian": statistics.median(times) * 1000,
            "scrapeMsP90": times[int(len(times) * 0.9) - 1] * 1000, "proxyCpuMsPerScrape": cpu * 1000,
            "proxyRssMiB": rss_kib(proxy.pid) / 1024,
        }
        exe = shutil.which("prometheus")
        if exe:
            pport = free_port()
            (work / "prom.yml").write_text(json.dumps({
                "global": {"scrape_interval": "1s", "scrape_timeout": "1s"},
                "scrape_configs": [{"job_name": "linkerd-proxy", "static_configs": [
                    {"targets": [f"127.0.0.1:{admin_port}"]}]}]}))
            prom = start("prometheus", [exe, f"--config.file={work / 'prom.yml'}",
                                        f"--storage.tsdb.path={work / 'data'}",
                                        f"--web.listen-address=127.0.0.1:{pport}"], work)
            wait_ready(prom, http_ok(f"http://127.0.0.1:{pport}/-/ready"), 30, "prometheus ready")
            time.sleep(args.prom_seconds)  # the span Prometheus scrapes; not a synchronisation

            def q(expr: str) -> float:
                u = f"http://127.0.0.1:{pport}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
                with urllib.request.urlopen(u, timeout=10) as r:
                    res = json.loads(r.read())["data"]["result"]
                return float(res[0]["value"][1]) if res else float("nan")

            wait_until(lambda: q('scrape_samples_scraped{job="linkerd-proxy"}') > 0, 30, "a scrape")
            result.update({
                "prometheusScrapeMsAvg": q(f'avg_over_time(scrape_duration_seconds{{job="linkerd-proxy"}}'
                                           f'[{int(args.prom_seconds)}s])') * 1000,
                "prometheusScrapeMsMax": q(f'max_over_time(scrape_duration_seconds{{job="linkerd-proxy"}}'
                                           f'[{int(args.prom_seconds)}s])') * 1000,
                "prometheusSamplesScraped": q('scrape_samples_scraped{job="linkerd-proxy"}'),
                "prometheusRssMiB": rss_kib(prom.pid) / 1024,
            })
        print(json.dumps(result, indent=2))
        return 0
    finally:
        if prom is not None:
            prom.stop()
        proxy.stop()
        backend.shutdown()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
