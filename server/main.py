"""Running the app under uvicorn, as ``rerankq serve`` does."""

from __future__ import annotations

import sys


def run_serve(host: str, port: int, loglevel: str) -> int:
    import uvicorn

    from rerankq.celeryconfig import settings
    from rerankq.server.app import create_app
    from rerankq.tasks import tracing

    tracing.setup(settings.tracing, "rerankq-serve")

    exposed = host not in ("127.0.0.1", "localhost", "::1")
    if exposed and not settings.serve_api_key:
        print(f"rerankq serve: listening on {host} with no API key: anyone who reaches port {port} can send jobs "
              "(set RERANKQ_SERVE_API_KEY to require 'Authorization: Bearer <key>')", file=sys.stderr, flush=True)
    # One process: every request is a coroutine awaiting its result, no thread each.
    uvicorn.run(create_app(settings), host=host, port=port, log_level=loglevel.lower(), access_log=False)
    return 0
