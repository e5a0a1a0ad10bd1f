"""Run the API: `hparena api [--workers N]`, what docker-compose and bench/api_load.py start.

With N > 1 this is `uvicorn --workers N`, except that the listening socket is bound the way asyncio binds
it. uvicorn's multi-worker path binds it with `proto` left at 0; accepted sockets inherit that, and asyncio
only turns TCP_NODELAY on for sockets that say IPPROTO_TCP. Nagle's algorithm then holds back each
keep-alive response's last segment until the client's delayed ACK: ~40 ms added to every request
(Kludex/uvicorn#3149, open as of uvicorn 0.54; measured 47.8 ms against 2.0 ms for /api/health here).
"""

from __future__ import annotations

import socket

import uvicorn
from uvicorn.supervisors import Multiprocess


def serve(host: str, port: int, workers: int = 1, log_level: str = "info", access_log: bool = True) -> None:
    if workers <= 1:
        uvicorn.run("app.main:app", host=host, port=port, log_level=log_level, access_log=access_log)
        return
    config = uvicorn.Config("app.main:app", host=host, port=port, workers=workers, log_level=log_level,
                            access_log=access_log)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.set_inheritable(True)
    Multiprocess(config, sockets=[sock]).run()
