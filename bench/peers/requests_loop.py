"""The peers benchmark's Python peer: a `requests` loop as edx-braze-client sends.

edx-braze-client keeps one `requests.Session`, updates its headers (`Authorization: Bearer`,
`Content-Type: application/json`) before each call, posts `data=json.dumps(body)` to
`urljoin(api_url, endpoint)` with `timeout=2`, then `raise_for_status()` and `resp.json()`;
its `send_canvas_message` sends one body, so the loop over calls of at most 50 recipients is
the caller's, one call after another. This script does that, written here for the benchmark.

    python requests_loop.py URL API_KEY N CANVAS_ID CONTEXT_JSON

Prints {"sent": <recipients in calls answered 201>}.
"""

from __future__ import annotations

import json
import sys
from urllib.parse import urljoin

import requests

ENDPOINT = "/canvas/trigger/send"


def main(url: str, key: str, n: int, canvas_id: str, context: dict[str, object]) -> int:
    session = requests.Session()
    sent = 0
    for start in range(0, n, 50):
        recipients = [
            {"external_user_id": f"user-{i}", "context": {"order": i}}
            for i in range(start, min(start + 50, n))
        ]
        body = {"canvas_id": canvas_id, "context": context, "recipients": recipients}
        session.headers.update({"Authorization": f"Bearer {key}", "Content-Type": "application/json"})
        resp = session.post(urljoin(url, ENDPOINT), data=json.dumps(body), timeout=2)
        resp.raise_for_status()
        resp.json()
        if resp.status_code == 201:
            sent += len(recipients)
    return sent


if __name__ == "__main__":
    url, key, count, canvas_id, context = sys.argv[1:]
    print(json.dumps({"sent": main(url, key, int(count), canvas_id, json.loads(context))}))
