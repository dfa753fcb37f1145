"""A lease in Redis: of several watchdogs watching the same queues, one leads and the others stand by.

Each watchdog keeps its own hysteresis; two of them writing the route would disagree between the marks
and flip it every poll. So only the holder of the lease measures-and-writes; the others try to take it
every poll, and one does within the lease's life once the holder stops renewing it (killed, hung, cut
off from Redis). The lease lives half the route state's TTL, so a stand-by leads before the route state
the dead leader wrote expires.
"""

from __future__ import annotations

import os
import socket
import uuid

from rerankq.tasks import scripts
from rerankq.tasks.connections import BrokerRedis

_HOLD = scripts.lua("lease_hold")
_RELEASE = scripts.lua("lease_release")


class Lease:
    def __init__(self, broker: BrokerRedis, name: str, ttl_s: float) -> None:
        self.broker = broker
        self.key = broker.key("lease", name)
        self.ttl_ms = max(1, int(ttl_s * 1000))
        #: Who we are, in the lease and in the logs: host, pid, and a suffix for several in one process.
        self.holder = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"

    def hold(self) -> bool:
        """Take or renew the lease; True while this process leads."""
        return bool(self.broker.client.eval(_HOLD, 1, self.key, self.holder, self.ttl_ms))

    def leader(self) -> str | None:
        raw = self.broker.client.get(self.key)
        return raw.decode() if isinstance(raw, bytes) else raw

    def release(self) -> None:
        self.broker.client.eval(_RELEASE, 1, self.key, self.holder)
