"""Lossless, incremental reading of the logs of a job's pods (the multi-node stage 1 streams them into its step).

The kubelet prefixes every line with its RFC 3339 timestamp when asked (``timestamps=true``) and returns only the
last ``sinceSeconds``: reading from the last line printed is cheap, and placing lines by time rather than by
position survives a log that shrank (rotation, a restarted container).
"""

from __future__ import annotations

import logging
import math
import re
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
    timestamp; each poll asks only for the lines since then (with a margin for clock skew between this pod and
    the node) and prints those that are newer. Unlike counting lines, this survives a log that shrank (kubelet
    rotation, a restarted container) and never re-reads a whole log.

    Args:
        api: Has ``pods(namespace, selector) -> [name]`` and ``logs(namespace, pod, since_seconds=None) -> text``
            with timestamped lines (:class:`mole.pipeline.trainjob.KubeApi`).
        log: Where each new line goes, as ``[pod] line``.
        wall: This process's wall clock (seconds since the epoch).
    """

    MARGIN_S = 10

    def __init__(
        self, api: Any, namespace: str, selector: str, log: Callable[[str], None], wall: Callable[[], float]
    ) -> None:
        self.api, self.namespace, self.selector, self.log, self.wall = api, namespace, selector, log, wall
        self.last: dict[str, tuple[tuple[float, int], int]] = {}

    def poll(self) -> None:
        """Print every pod's lines that were not printed yet (a pod without logs yet is skipped this time)."""
        try:
            pods = self.api.pods(self.namespace, self.selector)
        except Exception as err:  # listing pods is informational; the job's conditions decide
            logger.debug("listing pods failed: %s", err)
            return
        for pod in sorted(pods):
            last = self.last.get(pod)
            since = None if last is None else max(1, math.ceil(self.wall() - last[0][0]) + self.MARGIN_S)
            try:
                text = self.api.logs(self.namespace, pod, since_seconds=since)
            except Exception as err:
                logger.debug("no logs for %s yet: %s", pod, err)
                continue
            self._print(pod, text)

    def _print(self, pod: str, text: str) -> None:
        last_ts, same = self.last.get(pod, ((float("-inf"), 0), 0))
        seen_at_last = 0
        for raw in text.splitlines():
            stamp, _, line = raw.partition(" ")
            try:
                ts = parse_timestamp(stamp)
            except ValueError:  # a line without a timestamp: print it, it cannot be placed
                self.log(f"[{pod}] {raw}")
                continue
            if ts < last_ts:
                continue
            if ts == last_ts:
                seen_at_last += 1
                if seen_at_last <= same:
                    continue
                same += 1
            else:
                last_ts, same, seen_at_last = ts, 1, 1
            self.log(f"[{pod}] {line}")
        if last_ts[0] != float("-inf"):
            self.last[pod] = (last_ts, same)
