"""`uvicorn app.main:app --workers N`, but with TCP_NODELAY on every connection: what the benchmark runs.

uvicorn's multi-worker path binds the listening socket itself with `proto` left at 0; accepted sockets
inherit it, and asyncio only turns TCP_NODELAY on for sockets that say IPPROTO_TCP. Nagle's algorithm then
holds back each keep-alive response's last segment until the client's delayed ACK, ~40 ms on Linux
(Kludex/uvicorn#3149, open as of uvicorn 0.54). A single uvicorn process (`hparena api`) is not affected:
asyncio builds that listener from getaddrinfo, which says IPPROTO_TCP. Here the listener is bound the way
asyncio would bind it and handed to uvicorn's own supervisor, which is all `uvicorn --workers N` does.

    python bench/_api_server.py HOST PORT WORKERS
"""

from __future__ import annotations

import socket
import sys

import uvicorn
from uvicorn.supervisors import Multiprocess


def main(host: str, port: int, workers: int) -> None:
    config = uvicorn.Config("app.main:app", host=host, port=port, workers=workers, access_log=False,
                            log_level="warning")
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.set_inheritable(True)
    Multiprocess(config, sockets=[sock]).run()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
