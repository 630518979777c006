"""Eval and publishing: rank 0's side of the loop (pipeline/loop.py), at the cadences the loop decides.

`evaluate` measures the task's eval metrics of the current weights; `publish` writes them, with exactly those
weights, as the next published version (pipeline/publishing.py). Both record what they did in the run's
metrics and its history (pipeline/history.py).
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from typing import TYPE_CHECKING

from streamssl.pipeline.lineage import artifacts, lineage
from streamssl.pipeline.mirror import check_mirror, mirror_published
from streamssl.pipeline.publishing import OlderThanLatest
from streamssl.pipeline.rundir import RunDirError

if TYPE_CHECKING:
    from streamssl.pipeline.loop import Loop

log = logging.getLogger(__name__)


class Release:
    def __init__(self, loop: Loop) -> None:
        self.loop = loop
        check_mirror(loop.cfg.publish)

    def evaluate(self) -> None:
        loop = self.loop
        if loop.collective.rank != 0:
            return
        started = time.perf_counter()
        metrics = loop.task.evaluate()
        if metrics:
            loop.metrics.eval_seconds.observe(time.perf_counter() - started)
            loop.history.append("eval", loop.state, metrics)
            loop.callbacks.eval(loop.state.step, metrics)
        loop.state.eval_metrics, loop.state.eval_step = metrics, loop.state.step

    def publish(self) -> None:
        loop, state = self.loop, self.loop.state
        if loop.collective.rank != 0:
            state.published_step = state.step
            return
        if state.eval_step != state.step:
            self.evaluate()  # the manifest carries the metrics of exactly the weights it publishes
        encoder = loop.task.encoder()
        if encoder is None:
            return
        manifest = loop.task.manifest()
        manifest = replace(manifest, step=state.step, samples_seen=state.samples_seen, method=loop.cfg.method,
                           metrics={**state.eval_metrics, **manifest.metrics}, lineage=lineage(loop))
        state.published_step = state.step
        try:
            version, folder = loop.publisher.publish(encoder, manifest, artifacts(loop.cfg))
        except OlderThanLatest as err:
            loop.metrics.publish_refused.labels(reason="older_lineage").inc()
            log.warning("not published: %s (an older lineage never replaces a newer one)", err)
            return
        except OSError as err:
            loop.metrics.publish_failures.inc()
            raise RunDirError(f"cannot publish to {loop.publisher.directory} ({err.strerror}); "
                              "`latest` still points at the version before") from None
        loop.metrics.observe_publish(version)
        loop.history.append("publish", state, {"version": version})
        loop.callbacks.publish(state.step, version, folder)
        log.info("published %s", folder)
        mirror_published(loop.cfg.publish, loop.publisher.directory, loop.metrics.publish_mirror_failures)
