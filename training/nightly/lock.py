"""The nightly lock: at most one nightly or bootstrap run at a time, across machines."""

from __future__ import annotations

import logging
import os
import socket
import threading
import uuid
from typing import Any

from training.nightly.config import NightlyError

log = logging.getLogger(__name__)


class LockHeld(NightlyError):
    """Another run holds the nightly lock."""


class LockLost(NightlyError):
    """This run's lock expired or was taken over; it must not publish or advance the position."""


# Compare-and-act scripts: only the holder's token may extend or delete the lock, so a run whose
# lock already expired (and was taken by another run) cannot release or extend someone else's.
_EXTEND = """
if redis.call('get', KEYS[1]) == ARGV[1] then
  return redis.call('pexpire', KEYS[1], ARGV[2])
end
return 0
"""
_RELEASE = """
if redis.call('get', KEYS[1]) == ARGV[1] then
  return redis.call('del', KEYS[1])
end
return 0
"""


class RedisLock:
    """A lock with expiry: SET key token NX PX ttl, a heartbeat thread, compare-and-delete release.

    If the holder is SIGKILLed the heartbeat stops with it and the key expires after the TTL, so
    a crashed run blocks the next one for at most one TTL.
    """

    def __init__(self, client: Any, key: str, ttl_s: float) -> None:
        self.client = client
        self.key = key
        self.ttl_ms = max(1, int(ttl_s * 1000))
        self.token = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:12]}"
        self.lost = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def acquire(self) -> None:
        if not self.client.set(self.key, self.token, nx=True, px=self.ttl_ms):
            holder = self.client.get(self.key)
            ttl_ms = self.client.pttl(self.key)
            expires = f"expires in {ttl_ms / 1000:.1f} s" if ttl_ms and ttl_ms > 0 else "expiring"
            raise LockHeld(
                f"another nightly run holds the lock {self.key!r} (holder {holder}, {expires}); "
                f"refusing to overlap. If that run died, the lock frees itself when it expires."
            )
        self._thread = threading.Thread(target=self._heartbeat, name="nightly-lock", daemon=True)
        self._thread.start()

    def _heartbeat(self) -> None:
        interval = self.ttl_ms / 3000
        while not self._stop.wait(interval):
            try:
                if not self.client.eval(_EXTEND, 1, self.key, self.token, self.ttl_ms):
                    self.lost = True
                    log.error("lost the nightly lock %s; this run will not publish", self.key)
                    return
            except Exception as exc:  # a Redis blip: try again next beat, check() decides
                log.warning("could not extend the nightly lock: %s", exc)

    def check(self) -> None:
        """Raise LockLost unless this run still holds the lock (call before any commit step)."""
        if self.lost or self.client.get(self.key) != self.token:
            self.lost = True
            raise LockLost(
                f"the nightly lock {self.key!r} expired or was taken over during the run"
            )

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        try:
            self.client.eval(_RELEASE, 1, self.key, self.token)
        except Exception as exc:  # it expires anyway
            log.warning("could not release the nightly lock: %s", exc)

    def __enter__(self) -> RedisLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
