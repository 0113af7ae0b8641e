"""Reads a Tollgate /metrics page with the official Prometheus Python parser.

Usage: parse_metrics.py PAGE_FILE REQUESTS_SENT. Fails (exit 1) unless the page parses, every family has a
type, tollgate_requests adds up to REQUESTS_SENT, and the histograms are well formed (cumulative buckets
ending in +Inf equal to _count).
"""
import sys

from prometheus_client.parser import text_string_to_metric_families


def main() -> int:
    page = open(sys.argv[1], encoding="utf-8").read()
    sent = int(sys.argv[2])
    families = {f.name: f for f in text_string_to_metric_families(page)}
    problems = []
    for f in families.values():
        if f.type == "unknown":
            problems.append(f"{f.name}: no type")
    req = families.get("tollgate_requests")
    if req is None or req.type != "counter":
        problems.append("tollgate_requests: missing or not a counter")
    else:
        total = sum(s.value for s in req.samples if s.name == "tollgate_requests_total")
        if total != sent:
            problems.append(f"tollgate_requests_total adds up to {total}, {sent} were sent")
    for name in (
        "gen_ai_server_request_duration_seconds",
        "gen_ai_server_time_to_first_token_seconds",
        "tollgate_gateway_added_seconds",
        "tollgate_ledger_commit_seconds",
    ):
        f = families.get(name)
        if f is None or f.type != "histogram":
            problems.append(f"{name}: missing or not a histogram")
            continue
        series = {}
        for s in f.samples:
            key = tuple(sorted((k, v) for k, v in s.labels.items() if k != "le"))
            series.setdefault(key, {"buckets": [], "count": None})
            if s.name.endswith("_bucket"):
                series[key]["buckets"].append((float(s.labels["le"]), s.value))
            elif s.name.endswith("_count"):
                series[key]["count"] = s.value
        for key, v in series.items():
            b = v["buckets"]
            if not b or b[-1][0] != float("inf") or b[-1][1] != v["count"]:
                problems.append(f"{name}{key}: +Inf bucket is not the count")
            if any(b[i][1] > b[i + 1][1] for i in range(len(b) - 1)):
                problems.append(f"{name}{key}: buckets are not cumulative")
    for p in problems:
        print("FAIL", p)
    print(f"{len(families)} families parsed, {len(problems)} problems")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
