"""Where rerankq bends kombu and Celery: every piece of code that depends on their internals, and why.

``surface.py`` lists each internal relied on and fingerprints each piece of library code copied or
replaced; ``tests/test_compat.py`` and every worker's start check them, so an upgrade past the versions in
``surface.SUPPORTED`` (pyproject.toml pins the same) fails by name. The bends:

* ``transport.py``: kombu's Redis channel receives with ``BLMOVE`` into a per-worker in-flight list, not
  ``BRPOP``, whose reply lost with a killed worker loses the job (celery/celery#4354, celery/kombu#305);
  one receive takes every waiting job of both lanes (one script, one ``MULTI`` for kombu's unacked
  records).
* ``acks.py``: its acks and put-backs touch only their own delivery's record (a job put back and received
  again keeps its delivery tag), settled jobs are acked in one round trip, and the jobs the chunk consumer
  still serves are not put back when a lost connection closes their channel.
* ``patches.py``, ``survive_redis_outage``: a Redis restart made the channel's close put unacked jobs back
  through a released connection (``AttributeError`` on ``None.hostname``, celery/kombu#582 and #970) and
  the worker exit as "unrecoverable"; acks and rejects of jobs received before a reconnect raised on the
  closed channel; a job popped as Redis went away was dropped unrecorded; a full Redis refused the
  visibility-timeout scan's mutex as the consumer connected, and the worker exited "unrecoverable".
* ``patches.py``, ``route_task_events``: celery 5.4-5.6 ``EventDispatcher.flush`` could clear task events
  another thread appended during the flush (celery/celery#10434, fixed in 5.7.0); the events of jobs
  received before a reconnect were dropped with the old dispatcher.
* ``strategy.py``: Celery's default task strategy, stopped where Celery would run the task, so that each
  job is handed to the chunk consumer unacked and keeps its own id, state and events.
* ``results.py``: results written as Celery's Redis backend writes them, pipelined for many jobs at once
  (its ``store_result`` is a read and a write per job).
* ``tasks/connections.py`` (shared with producers, so it stays there): kombu's key names, and its
  ``restore_by_tag`` with a check that the job is still unacked from the delivery being reclaimed.
"""
