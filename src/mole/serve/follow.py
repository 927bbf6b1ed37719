"""Following a registry alias: a service started from ``models:/mole@champion`` notices when the alias moves.

The service loads the version the alias pointed to at start-up (:func:`mole.tracking.resolve_version`). A
promotion made outside the pipeline (``mole promote``, the MLflow UI), or a service that no rollout reaches
(KServe), would keep serving the old version for ever. :class:`AliasFollower` checks the alias every
``interval`` seconds and, when it points elsewhere, calls ``on_move``: the server then stops gracefully (requests
in flight finish) and exits with :data:`MOVED_EXIT`, so that its orchestrator restarts it on the new version.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Protocol

logger = logging.getLogger(__name__)

#: Exit code of a service that stopped because its alias moved (EX_TEMPFAIL: restart me).
MOVED_EXIT = 75


class Moves(Protocol):
    def moved(self) -> str | None:
        """The version the alias points to now when it is not the loaded one, else None."""


class AliasFollower:
    """A daemon thread that asks ``loader.moved()`` every ``interval`` seconds until it answers, or until
    :meth:`stop`. A failed check (the registry is briefly unreachable) is logged and retried, never fatal."""

    def __init__(self, loader: Moves, interval: float, on_move: Callable[[str], None]) -> None:
        if interval <= 0:
            raise ValueError(f"the alias check interval must be positive, got {interval}")
        self.loader, self.interval, self.on_move = loader, interval, on_move
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="mole-follow-alias", daemon=True)

    def start(self) -> AliasFollower:
        self.thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                now = self.loader.moved()
            except Exception as err:  # registry down for a moment: keep serving, look again later
                logger.warning("checking the model alias failed (%s); serving on", err)
                continue
            if now:
                logger.info("the alias now points to %s: restarting to load it", now)
                self.on_move(now)
                return
