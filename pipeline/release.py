"""Eval and publishing: rank 0's side of the loop (pipeline/loop.py), at the cadences the loop decides.

`evaluate` measures the task's eval metrics of the current weights; `publish` writes them, with exactly those
weights, as the next published version (pipeline/publishing.py) if the gate lets it (pipeline/publish_gate.py;
a refused one is kept as a candidate), prunes what retention does not keep (pipeline/retention.py) and tells
consumers (pipeline/notify.py). Both record what they did in the run's metrics and its history
(pipeline/history.py).
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from typing import TYPE_CHECKING

from torch import nn

from streamssl.models.encoder_io import Manifest
from streamssl.pipeline.lineage import artifacts, lineage
from streamssl.pipeline.mirror import check_mirror, mirror_published
from streamssl.pipeline.notify import Notifier, publish_event
from streamssl.pipeline.publish_gate import judge
from streamssl.pipeline.publishing import OlderThanLatest
from streamssl.pipeline.retention import prune_candidates, prune_versions
from streamssl.pipeline.rundir import RunDirError

if TYPE_CHECKING:
    from streamssl.pipeline.loop import Loop

log = logging.getLogger(__name__)


class Release:
    def __init__(self, loop: Loop) -> None:
        self.loop = loop
        check_mirror(loop.cfg.publish)
        self.notifier = Notifier(loop.cfg, loop.metrics.publish_notify_failures)

    def close(self) -> None:
        self.notifier.close()

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
        probe = getattr(loop.task, "probe_inputs", None)  # optional: tasks without one skip the collapse check
        verdict = judge(loop.cfg.publish, loop.publisher.directory, encoder, probe() if probe else None, manifest.metrics)
        if verdict.record:  # what the gate measured, and the best so far that later gates compare with
            manifest = replace(manifest, extra={**manifest.extra, "gate": verdict.record})
        if verdict.refused:
            self.keep_candidate(encoder, manifest, verdict.refused, verdict.why)
            return
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
        cfg = loop.cfg.publish
        removed = prune_versions(loop.publisher.directory, cfg.keep, cfg.keep_every)  # after `latest` moved
        if removed:
            log.info("retention (publish.keep %d, keep_every %d): removed %s", cfg.keep, cfg.keep_every, ", ".join(removed))
        mirror_published(loop.cfg.publish, loop.publisher.directory, loop.metrics.publish_mirror_failures)
        self.notifier.send(publish_event(folder))

    def keep_candidate(self, encoder: nn.Module, manifest: Manifest, reason: str, why: str) -> None:
        """Counts and logs a refused publish, and keeps the encoder under candidates/ (bounded)."""
        loop, cfg = self.loop, self.loop.cfg.publish
        loop.metrics.publish_refused.labels(reason=reason).inc()
        loop.history.append("publish_refused", loop.state, {"reason": reason})
        kept = "not kept (publish.keep_candidates 0)"
        if cfg.keep_candidates:
            try:
                folder = loop.publisher.keep_candidate(encoder, manifest, reason)
                prune_candidates(folder.parent, cfg.keep_candidates)
                kept = f"kept as {folder.relative_to(loop.publisher.directory)}"
            except OSError as err:  # a candidate is a courtesy: the run and `latest` are not at stake
                kept = f"not kept ({err.strerror})"
        log.warning("not published (%s) at step %d: %s; %s", reason, manifest.step, why, kept)
