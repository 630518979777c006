"""The one line a followed directory logs when it runs dry, so that a run that has read everything says so.

A run in follow mode trains on what lands and waits, silently otherwise, for more: `WaitingNotice` logs
"waiting for new shards in DIR" the first time a listing finds nothing new, then again every
`every_seconds` (5 minutes) while nothing arrives, with how long it has waited; the first new file resets it.
"""

from __future__ import annotations

import logging
import time

log = logging.getLogger("streamssl.streams")

REPEAT_SECONDS = 300.0


class WaitingNotice:
    def __init__(self, what: str, directory: str, every_seconds: float | None = None) -> None:
        self.what, self.directory = what, directory
        self.every_seconds = REPEAT_SECONDS if every_seconds is None else every_seconds
        self._since: float | None = None  # when the directory ran dry; None while there is something to read
        self._logged = 0.0

    def dry(self) -> None:
        """A listing found nothing new."""
        now = time.monotonic()
        if self._since is None:
            self._since = self._logged = now
            log.info("waiting for new %s in %s", self.what, self.directory)
        elif now - self._logged >= self.every_seconds:
            self._logged = now
            log.info("still waiting for new %s in %s (nothing new for %.0f min)", self.what, self.directory,
                     (now - self._since) / 60)

    def found(self) -> None:
        """A listing found something to read."""
        self._since = None
