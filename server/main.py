"""Running the app under uvicorn, as ``rerankq serve`` does."""

from __future__ import annotations

import contextlib
import sys


def run_serve(host: str, port: int, loglevel: str) -> int:
    import uvicorn

    from rerankq.celeryconfig import settings
    from rerankq.server.app import create_app
    from rerankq.server.protocol import with_read_deadline
    from rerankq.tasks import tracing

    tracing.setup(settings.tracing, "rerankq-serve")

    exposed = host not in ("127.0.0.1", "localhost", "::1")
    if exposed and not settings.serve_api_key:
        print(f"rerankq serve: listening on {host} with no API key: anyone who reaches port {port} can send jobs "
              "(set RERANKQ_SERVE_API_KEY to require 'Authorization: Bearer <key>')", file=sys.stderr, flush=True)
    _raise_file_limit()
    # One process: every request is a coroutine awaiting its result, no thread each. Past
    # RERANKQ_SERVE_MAX_CONNECTIONS open connections, uvicorn answers new requests 503 at once.
    uvicorn.run(create_app(settings), host=host, port=port, log_level=loglevel.lower(), access_log=False,
                http=with_read_deadline(settings.serve_read_timeout_s),
                limit_concurrency=settings.serve_max_connections)
    return 0


def _raise_file_limit() -> None:
    """Each connection is a file: take the hard limit for open files (a soft limit of 1,024 is common) so that
    RERANKQ_SERVE_MAX_CONNECTIONS, not the file limit, is what turns clients away."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        with contextlib.suppress(ValueError, OSError):  # some systems refuse an infinite soft limit: keep it
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
