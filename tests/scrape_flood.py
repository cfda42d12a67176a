"""A bounded flood of scrapes, as its own process: `python scrape_flood.py HOST:PORT THREADS`.

Each thread GETs /metrics over one kept-alive connection as fast as it is answered, until
stdin closes (or 60 s pass); then the process prints how many scrapes were answered."""

from __future__ import annotations

import http.client
import sys
import threading
import time

LONGEST_SECONDS = 60.0


def scrape(host: str, port: int, until: float, stop: threading.Event, answered: list[int]) -> None:
    connection: http.client.HTTPConnection | None = None
    while not stop.is_set() and time.monotonic() < until:
        try:
            if connection is None:
                connection = http.client.HTTPConnection(host, port, timeout=5)
            connection.request("GET", "/metrics")
            reply = connection.getresponse()
            reply.read()
            answered.append(reply.status)
        except (OSError, http.client.HTTPException):
            connection = None


def main() -> None:
    host, port = sys.argv[1].rsplit(":", 1)
    stop, answered = threading.Event(), list[int]()
    until = time.monotonic() + LONGEST_SECONDS
    threads = [
        threading.Thread(target=scrape, args=(host, int(port), until, stop, answered))
        for _ in range(int(sys.argv[2]))
    ]
    for thread in threads:
        thread.start()
    print("started", flush=True)
    sys.stdin.read()
    stop.set()
    for thread in threads:
        thread.join()
    print(sum(status == 200 for status in answered), flush=True)


if __name__ == "__main__":
    main()
