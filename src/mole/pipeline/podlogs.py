"""Lossless, incremental reading of the logs of a job's pods (the multi-node stage 1 streams them into its step).

The kubelet prefixes every line with its RFC 3339 timestamp when asked (``timestamps=true``) and returns only the
last ``sinceSeconds``: reading from the last line printed is cheap, and placing lines by time rather than by
position survives a log that shrank (rotation, a restarted container).
"""

from __future__ import annotations

import logging
import math
import re
import threading
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

logger = logging.getLogger(__name__)

_TIMESTAMP = re.compile(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d{1,9}))?Z")


def parse_timestamp(text: str) -> tuple[float, int]:
    """An RFC 3339 timestamp as the kubelet writes it (``2026-11-29T23:39:08.123456789Z``: the fraction has up to
    nine digits, trailing zeros dropped) as (whole seconds since the epoch, nanoseconds): comparable, exact.

    Raises:
        ValueError: Not such a timestamp.
    """
    m = _TIMESTAMP.fullmatch(text)
    if not m:
        raise ValueError(f"not a UTC RFC 3339 timestamp: {text!r}")
    seconds = datetime.strptime(m[1], "%Y-%m-%dT%H:%M:%S").replace(tzinfo=UTC).timestamp()
    return seconds, int((m[2] or "").ljust(9, "0"))


class LogStreams:
    """Incremental, lossless log reading for every pod of a job.

    Per pod it remembers the timestamp of the last line printed and how many lines carried exactly that
    timestamp. A read starts from there (``sinceSeconds``, with a margin for clock skew between this pod and the
    node) and prints only newer lines. Unlike counting lines, this survives a log that shrank (kubelet rotation,
    a restarted container) and never re-reads a whole log.

    With ``follow`` (and an API that has ``stream``), each pod gets a thread that follows its log as it is
    written (``follow=true``: lines arrive at once, not at the next poll) and reconnects from the last line when
    the connection drops; :meth:`poll` then only starts followers for new pods. Without it, every
    :meth:`poll` reads what was added since the last one.

    Args:
        api: Has ``pods(namespace, selector) -> [name]``, ``logs(namespace, pod, since_seconds=None) -> text`` and,
            to follow, ``stream(namespace, pod, since_seconds=None) -> iterator of lines``, all lines timestamped
            (:class:`mole.pipeline.trainjob.KubeApi`).
        log: Where each new line goes, as ``[pod] line``.
        wall: This process's wall clock (seconds since the epoch).
    """

    MARGIN_S = 10

    def __init__(
        self, api: Any, namespace: str, selector: str, log: Callable[[str], None], wall: Callable[[], float],
        follow: bool = False,
    ) -> None:  # fmt: skip
        self.api, self.namespace, self.selector, self.log, self.wall = api, namespace, selector, log, wall
        self.follow = follow and hasattr(api, "stream")
        self.last: dict[str, tuple[tuple[float, int], int]] = {}
        self._lock = threading.Lock()
        self._followers: dict[str, threading.Thread] = {}
        self._closed = threading.Event()

    def _since(self, pod: str) -> int | None:
        last = self.last.get(pod)
        return None if last is None else max(1, math.ceil(self.wall() - last[0][0]) + self.MARGIN_S)

    def poll(self) -> None:
        """Print every pod's lines that were not printed yet (a pod without logs yet is skipped this time); when
        following, start a follower for each pod that has none running."""
        try:
            pods = self.api.pods(self.namespace, self.selector)
        except Exception as err:  # listing pods is informational; the job's conditions decide
            logger.debug("listing pods failed: %s", err)
            return
        for pod in sorted(pods):
            if self.follow:
                thread = self._followers.get(pod)
                if thread is None or not thread.is_alive():
                    thread = threading.Thread(target=self._follow, args=(pod,), name=f"logs-{pod}", daemon=True)
                    self._followers[pod] = thread
                    thread.start()
                continue
            self.read(pod)

    def read(self, pod: str) -> None:
        """One read of what ``pod`` logged since the last line printed."""
        try:
            text = self.api.logs(self.namespace, pod, since_seconds=self._since(pod))
        except Exception as err:
            logger.debug("no logs for %s yet: %s", pod, err)
            return
        cursor = {"seen": 0}
        for raw in text.splitlines():
            self._print(pod, raw, cursor)

    def _follow(self, pod: str) -> None:
        """Follow one pod's log until the stream ends (the container exited, or the connection dropped: the next
        :meth:`poll` reconnects from the last line printed) or :meth:`close`."""
        cursor = {"seen": 0}
        try:
            for raw in self.api.stream(self.namespace, pod, since_seconds=self._since(pod)):
                if self._closed.is_set():
                    return
                self._print(pod, raw, cursor)
        except Exception as err:
            logger.debug("following %s stopped: %s", pod, err)

    def close(self, timeout: float = 5.0) -> None:
        """Stop following; then one last read of every known pod, so that lines a follower had not delivered yet
        (or that arrived after its stream ended) are printed too."""
        self._closed.set()
        for thread in self._followers.values():
            thread.join(timeout)
        for pod in sorted(self._followers):
            self.read(pod)

    def _print(self, pod: str, raw: str, cursor: dict[str, int]) -> None:
        """Print ``raw`` unless it is at or before the last line printed. ``cursor`` counts, for one read or one
        connection, the lines seen at the last timestamp, to tell a line read again from a new one that carries
        the same timestamp."""
        stamp, _, line = raw.partition(" ")
        try:
            ts = parse_timestamp(stamp)
        except ValueError:  # a line without a timestamp: print it, it cannot be placed
            self.log(f"[{pod}] {raw}")
            return
        with self._lock:
            last_ts, same = self.last.get(pod, ((float("-inf"), 0), 0))
            if ts < last_ts:
                return
            if ts == last_ts:
                cursor["seen"] += 1
                if cursor["seen"] <= same:
                    return
                same += 1
            else:
                last_ts, same, cursor["seen"] = ts, 1, 1
            self.last[pod] = (last_ts, same)
            self.log(f"[{pod}] {line}")
