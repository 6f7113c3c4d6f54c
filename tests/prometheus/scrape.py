"""Scrapes Prometheus endpoints and parses them with the Prometheus project's own
Python parser (prometheus_client.parser), for the metrics tests.

Usage: scrape.py URL...  Prints one JSON object: for each URL, its HTTP status,
Content-Type, and every metric family (name, type) with its samples
(name, labels, value). A body the parser rejects exits non-zero with the error.
"""

import json
import sys
import urllib.request

from prometheus_client.parser import text_string_to_metric_families


def scrape(url):
    with urllib.request.urlopen(url, timeout=10) as resp:
        status = resp.status
        content_type = resp.headers.get("Content-Type", "")
        body = resp.read().decode("utf-8")
    families = []
    for family in text_string_to_metric_families(body):
        families.append(
            {
                "name": family.name,
                "type": family.type,
                "samples": [
                    {"name": s.name, "labels": s.labels, "value": s.value}
                    for s in family.samples
                ],
            }
        )
    return {"status": status, "content_type": content_type, "families": families}


def main():
    out = {url: scrape(url) for url in sys.argv[1:]}
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main()
