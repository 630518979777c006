"""The one training loop of every job: messages from a feed → the task's step, with stop reasons, non-finite
handling and rollback, the schedule horizon, eval, checkpoint and publish cadences, and metrics.

A job is a `Task` (pipeline/task.py: images in pipeline/images.py, continuous series in pipeline/series/job.py);
what several workers must agree on goes through the injected `Collective`.

Stopping (SIGINT/SIGTERM via `stop`, max_steps, max_minutes, the end of a finite stream, the task's own end)
always ends the same way: the step finishes, then eval, checkpoint, publish (a signal: checkpoint first; a slow eval and
its publish wait for the next start). Resuming from the run dir restores the task (model, optimizer, method state, RNGs)
and the stream position, so N steps in one go and N/2 + N/2 across a restart train on the same samples in the same way.

The run dir belongs to one run at a time (pipeline/rundir.py): `run()` takes its lock before it writes
anything there and refuses, as a RunDirError, a run dir whose checkpoints all fail to load (unless
`checkpoint.allow_fresh`) or that cannot be written.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import sys
import threading
import time
from pathlib import Path
from typing import Any, TextIO

from streamssl.monitoring.metrics import Metrics
from streamssl.pipeline.callbacks import Callbacks
from streamssl.pipeline.checkpointing import Checkpointer, NoReadableCheckpoint
from streamssl.pipeline.collective import Collective
from streamssl.pipeline.config import Config, ConfigError, redacted
from streamssl.pipeline.history import History
from streamssl.pipeline.loading.commits import CommitJournal
from streamssl.pipeline.loading.deadletter import DeadLetters
from streamssl.pipeline.loading.messages import End, Failure, Message, Reject
from streamssl.pipeline.loading.positions import position_from_dict, position_to_dict
from streamssl.pipeline.loading.sources import dead_letter_topic
from streamssl.pipeline.log_format import ProgressLog
from streamssl.pipeline.publishing import Publisher
from streamssl.pipeline.release import Release
from streamssl.pipeline.run_state import RunState
from streamssl.pipeline.rundir import RunDirError, RunDirLock, append_audit, create_run_dir, prepare_run_dir
from streamssl.pipeline.schedule import HorizonEstimate, is_due
from streamssl.pipeline.task import Feed, Task
from streamssl.streams.files import RunPaths
from streamssl.streams.records import SourceError

log = logging.getLogger(__name__)


class TrainingDiverged(Exception):
    """The loss stayed non-finite after every allowed rollback; the CLI prints it as one line."""


class Loop:
    """Runs `task` in `cfg.run_dir` until a stop reason; `run()` returns the final counters.

    Args:
        cfg: The run's config.
        task: The job (built first: a missing data path or a bad option fails before the run dir is written).
        stop: Set to stop after the current step.
        collective: What the workers agree on (default: this process alone).
        checkpointer: The run dir's checkpoints (default: this process's own; see pipeline/ray/worker.py).
        out: Where progress lines and the final `done: …` line go (`streamssl forecast` keeps stdout for its JSON).
        callbacks: What a Python caller is told of steps, evals, checkpoints and publishes (pipeline/callbacks.py).
    """

    lock_wait_seconds = 0.0  # how long run() waits for the run dir's lock before refusing

    def __init__(self, cfg: Config, task: Task, stop: threading.Event | None = None, *,
                 collective: Collective | None = None, checkpointer: Checkpointer | None = None,
                 out: TextIO = sys.stdout, callbacks: Callbacks | None = None) -> None:
        self.cfg, self.task, self.out, self.callbacks = cfg, task, out, callbacks or Callbacks()
        self.progress_log = ProgressLog(out, cfg.train)
        self.stop = stop or threading.Event()
        self.collective = collective or Collective()
        self.paths = RunPaths(Path(cfg.run_dir))
        create_run_dir(self.paths.root)
        self.lock = RunDirLock(self.paths.lock)  # taken by run(): nothing is written into the run dir before
        self.metrics = Metrics(cfg.method, self.collective.rank if self.collective.world_size > 1 else None)
        self.dead_letter_topic = topic = dead_letter_topic(cfg.data, cfg.kafka, self.paths.root, self.collective.rank)

        def forward(source: str, key: str, reason: str, detail: str = "", payload: bytes = b"") -> None:
            topic.send(key, payload, reason, detail, source)

        self.dead_letters = DeadLetters(self.paths.dead_letters, self.metrics, None if topic is None else forward)
        self.checkpointer = checkpointer or Checkpointer(self.paths.checkpoints, keep=cfg.checkpoint.keep)
        self.commits = CommitJournal(self.paths.root, self.collective)  # what Kafka commits say, and the last ones
        self.publisher = Publisher(self.paths.published)
        self.history = History(self.paths.history, enabled=self.collective.rank == 0, log_cfg=cfg.log)
        self.release = Release(self)
        self.evaluate, self.publish = self.release.evaluate, self.release.publish  # rank 0's eval and publishing
        self.state = RunState()
        self.metrics_port = 0
        self.loop_seconds = 0.0
        self.startup_seconds = 0.0  # of loop_seconds, until the first message arrived (connecting, joining, first fetch)
        self.feed: Feed | None = None
        self._held: Any = None  # a message taken from the feed that the other workers have not matched yet
        self._checkpointed: tuple[int, Any] = (-1, None)  # step and position object of the last checkpoint
        self._nonfinite_in_a_row = 0
        self._rollbacks = 0
        self._horizon_estimate: HorizonEstimate | None = None
        task.attach(self)

    # --- checkpoint / resume / rollback ------------------------------------------------------------
    def checkpoint_state(self) -> dict[str, Any]:
        st, own = self.state, self.task.state_dict()
        state = {
            "format": 1, "method_name": self.cfg.method, "step": st.step, "samples_seen": st.samples_seen,
            "checkpoints_written": st.checkpoints_written, **own, "source": position_to_dict(st.position),
            "first_source": position_to_dict(st.first_position),
            # the LR is a pure function of step and horizon
            "schedule": {**own.get("schedule", {}), "step": st.step, "horizon_steps": st.horizon_steps,
                         "cycle_start": st.cycle_start},
            "eval_metrics": st.eval_metrics, "eval_step": st.eval_step, "config": redacted(self.cfg),
        }
        if self.collective.world_size > 1:  # every worker's own stream position and RNG, in rank order
            ranks = self.collective.gather({"position": state["source"], "rng": own.get("rng", {})})
            state.update(ranks=ranks, world_size=self.collective.world_size)
        return state

    def load_latest(self) -> tuple[dict[str, Any], Any] | None:
        """The newest readable checkpoint in today's layout (the task upgrades older ones) and its path.

        Raises NoReadableCheckpoint where there are checkpoints and none loads."""
        found = self.checkpointer.load_latest(map_location=self.task.map_location)
        return None if found is None else (self.task.upgrade(found[0]), found[1])

    def resume(self) -> bool:
        try:
            found = self.load_latest()
        except NoReadableCheckpoint as err:
            # A silent fresh start would prune the trained checkpoints and publish a fresh encoder over theirs.
            if not self.cfg.checkpoint.allow_fresh:
                raise RunDirError(f"{err}; restore a good one, or --set checkpoint.allow_fresh=true "
                                  "to start this run dir over") from None
            log.warning("%s; starting over (checkpoint.allow_fresh)", err)
            found = None
        if found is None:
            return False
        ckpt, path = found
        if ckpt.get("method_name") != self.cfg.method:
            raise ConfigError(f"run dir {self.paths.root} holds a '{ckpt.get('method_name')}' run, not '{self.cfg.method}'")
        self.task.load_state_dict(ckpt)
        schedule, metrics = ckpt.get("schedule", {}), dict(ckpt.get("eval_metrics", {}))
        self.state = RunState(ckpt["step"], ckpt["samples_seen"], ckpt["checkpoints_written"],
                              position_from_dict(ckpt["source"]), metrics,
                              self.publisher.latest_step(), schedule.get("horizon_steps", 0), schedule.get("cycle_start", 0),
                              ckpt.get("eval_step", int(metrics.get("knn_step", -1))),
                              position_from_dict(ckpt.get("first_source", {})))
        self._checkpointed = (self.state.step, self.state.position)
        self.history.restart(self.state.step)
        log.info("resumed from %s at step %d (%d samples seen)", path.name, self.state.step, self.state.samples_seen)
        return True

    def roll_back(self) -> None:
        """After `nan_rollback_after` non-finite losses in a row: back to the last good checkpoint's weights,
        optimizer and RNG, but not its stream position: the batches that diverged are skipped, not replayed."""
        cfg = self.cfg.train
        try:
            found = self.load_latest()
        except NoReadableCheckpoint:
            found = None
        if found is None or self._rollbacks >= cfg.max_rollbacks:
            why = "no checkpoint to roll back to" if found is None else f"{self._rollbacks} rollbacks did not help"
            raise TrainingDiverged(f"loss was not finite for {self._nonfinite_in_a_row} steps in a row and {why}; "
                                   "lower the learning rate or check the data")
        ckpt, path = found
        self.task.roll_back(ckpt)
        self._rollbacks += 1
        self._nonfinite_in_a_row = 0
        self.metrics.rollbacks.inc()
        log.warning("rolled back from step %d to %s (rollback %d of at most %d)", self.state.step, path.name,
                    self._rollbacks, cfg.max_rollbacks)
        self.state.step, self.state.samples_seen = ckpt["step"], ckpt["samples_seen"]
        self.history.restart(self.state.step)

    def save_checkpoint(self) -> None:
        started = time.perf_counter()
        self.state.checkpoints_written += 1
        self.state.position = self.commits.checkpointed(self.state.position, self.state.step)
        try:
            path = self.checkpointer.save(self.checkpoint_state(), self.state.step)
        except OSError as err:  # a full disk, a read-only mount: stop, with nothing committed past the last one
            last = self._checkpointed[0]
            kept = f"the checkpoint of step {last} is intact" if last >= 0 else "no checkpoint was written"
            raise RunDirError(f"cannot write a checkpoint to {self.checkpointer.directory} ({err.strerror}); "
                              f"stopped at step {self.state.step}, {kept}") from None
        self._checkpointed = (self.state.step, self.state.position)
        self.metrics.observe_checkpoint(time.perf_counter() - started)
        self.callbacks.checkpoint(self.state.step, path)
        if self.feed is not None:  # durable now: Kafka may move the group's committed offsets up to it
            self.commits.committing(self.state.position)
            self.feed.commit(self.state.position)

    def _save_if_new(self) -> None:
        if self._checkpointed[0] != self.state.step or self._checkpointed[1] is not self.state.position:
            self.save_checkpoint()

    # --- the schedule horizon ----------------------------------------------------------------------
    def plan_horizon(self) -> None:
        """The horizon of this invocation (see pipeline/schedule.py): the step budget, a stored time-based
        horizon not reached yet (a resumed run continues its schedule), or a new estimate from the time budget."""
        cfg = self.cfg
        optim = getattr(cfg, "optim", None)
        fixed = (optim.total_steps if optim is not None else 0) or cfg.train.max_steps
        if fixed:
            self.state.horizon_steps, self.state.cycle_start = fixed, 0
        elif not cfg.train.max_minutes:
            self.state.horizon_steps = 0
        elif self.state.horizon_steps <= self.state.step:
            self.state.cycle_start = self.state.step
            self._horizon_estimate = HorizonEstimate(self.state.step, cfg.train.max_minutes * 60)
            self.state.horizon_steps = self._horizon_estimate.update(self.state.step, 0.0)

    def update_horizon(self, elapsed: float) -> None:
        estimate = self._horizon_estimate
        if estimate is None:
            return
        horizon, frozen = estimate.update(self.state.step, elapsed), estimate.frozen
        if self.collective.world_size > 1:  # the smallest estimate, frozen once every worker's is: one LR for all
            horizon, frozen = self.collective.min_int(horizon), not self.collective.any(not frozen)[0]
        self.state.horizon_steps = horizon
        if frozen:
            log.info("schedule horizon: step %d (estimated from the step rate and the time budget)", horizon)
            self._horizon_estimate = None

    # --- stopping and messages ---------------------------------------------------------------------
    def stop_reason(self, deadline: float) -> str:
        """Why this worker should stop before its next step ("" to go on)."""
        if self.stop.is_set():
            return "stop requested"
        if self.cfg.train.max_steps and self.state.step >= self.cfg.train.max_steps:
            return f"reached max_steps {self.cfg.train.max_steps}"
        if time.monotonic() >= deadline:
            return f"time budget of {self.cfg.train.max_minutes} min used"
        return self.task.finished

    def receive(self, message: Message) -> str:
        """Holds a message to train on; dead-letters a reject and moves to its position; why the run stops, or ""."""
        if isinstance(message, Reject):
            self.dead_letters.reject(message.source, message.key, message.reason, message.detail, message.payload)
            self.state.position = message.position
        elif isinstance(message, End):
            return "stream ended"
        elif isinstance(message, Failure):
            raise SourceError(message.message)
        else:
            self._held = message
        return ""

    def next_message(self, feed: Feed, deadline: float) -> tuple[Any, str]:
        """The next message to train on, or (None, why the run stops), in rounds that every worker joins.

        A worker that has no message yet still joins each round, so a worker never waits in a collective
        for one that waits for data. A Ray `streaming_split` pass starts only when every worker asks for
        it: when one worker's reader waits there, all others read to the end of their pass (`drain`)
        instead of holding back behind a full prefetch queue.
        """
        while True:
            reason = self.stop_reason(deadline)
            if self._held is None and not reason:
                waited = time.perf_counter()
                with contextlib.suppress(queue.Empty):
                    reason = self.receive(feed.next(timeout=0.5))
                self.metrics.wait_seconds.inc(time.perf_counter() - waited)
            waiting = bool(getattr(feed, "waiting_for_pass", False))
            stop_any, missing_any, waiting_any = self.collective.any(bool(reason), self._held is None, waiting)
            if stop_any:
                return None, reason or "another worker stopped"
            if waiting_any and self.collective.world_size > 1 and hasattr(feed, "drain"):
                feed.drain()
            if not missing_any:
                message, self._held = self._held, None
                return message, ""

    def checkpoint_due(self, seconds_since_checkpoint: float) -> bool:
        cfg = self.cfg.checkpoint
        due = is_due(cfg.every_steps, cfg.every_seconds, self.state.step, seconds_since_checkpoint)
        if self.collective.world_size > 1 and cfg.every_seconds:  # by steps alone, every worker decides the same
            due = self.collective.any(due)[0]
        return due

    def serve_metrics(self) -> None:
        cfg = self.cfg.metrics
        port = cfg.port + self.collective.rank  # every worker exports, on the port plus its rank
        if not cfg.port:
            return
        try:
            self.metrics_port = self.metrics.serve(port, cfg.host)
        except OSError as err:
            raise ConfigError(f"cannot serve metrics on {cfg.host}:{port} ({err.strerror}); "
                              "pick another --metrics-port or 0 for none") from None
        log.info("metrics on http://%s:%d/metrics", cfg.host, self.metrics_port)

    # --- the loop ----------------------------------------------------------------------------------
    def run(self) -> RunState:
        try:
            if self.collective.rank == 0:  # the workers of one run share its run dir; rank 0 writes it
                self.lock.acquire(self.lock_wait_seconds)
                prepare_run_dir(self.paths, self.cfg)
            self.serve_metrics()
            if self.resume() and self.state.step > 0 and self.state.published_step < self.state.step:
                self.publish()  # a signal stop left these weights unevaluated (finish): publish them before they change
            self.plan_horizon()
            feed = self.feed = self.task.open(self.commits.resumed(self.state.position))
            self._train(feed)
        finally:
            if self.feed is not None:
                self.feed.close()
                self.feed = None
            self.task.close()
            if self.dead_letter_topic is not None:
                self.dead_letter_topic.close()
            self.release.close()  # delivers the publish notifications still queued
            self.history.close()
            self.metrics.close()
            self.lock.release()
        return self.state

    def _train(self, feed: Feed) -> None:
        cfg, state = self.cfg, self.state
        started = time.monotonic()
        deadline = started + cfg.train.max_minutes * 60 if cfg.train.max_minutes else float("inf")
        self.progress_log.start(state.step)
        last_checkpoint_time = last_eval_time = last_log_time = started
        last_log_samples, last_loss, logs, last_log_wait = state.samples_seen, float("nan"), {}, 0.0
        while True:
            message, reason = self.next_message(feed, deadline)
            if message is None:
                break
            if not self.startup_seconds:
                self.startup_seconds = time.monotonic() - started
            step_started = time.perf_counter()
            result = self.task.step(message)
            # A skipped step still consumed its message: the position moves on, the step count does not.
            state.position = message.position
            if state.first_position is None:
                state.first_position = message.position
            self.metrics.observe_source(getattr(message, "source_stats", None) or {}, getattr(message.position, "topic", ""),
                                        getattr(feed, "queued_batches", None))
            if result is None:
                continue
            if not result.finite:
                self._nonfinite_in_a_row += 1
                self.metrics.skipped_steps.inc()
                log.warning("step %d: non-finite loss, step skipped (%d in a row)", state.step, self._nonfinite_in_a_row)
                if self._nonfinite_in_a_row >= cfg.train.nan_rollback_after:
                    self.roll_back()
                continue
            self._nonfinite_in_a_row = 0
            last_loss, logs = result.loss, result.logs
            state.step += 1
            if cfg.train.audit_keys and hasattr(message, "keys"):
                append_audit(self.paths.trained_keys, state.step, message.keys)
            state.samples_seen += result.samples * self.collective.world_size
            self.metrics.observe_step(result.samples, time.perf_counter() - step_started, result.lr)
            self.metrics.observe_logs({"loss": last_loss, **logs})
            self.callbacks.step(state.step, last_loss, logs)

            now = time.monotonic()
            self.update_horizon(now - started)
            if is_due(cfg.eval.every_steps, cfg.eval.every_seconds, state.step, now - last_eval_time):
                self.evaluate()
                last_eval_time = now = time.monotonic()
            if now - last_log_time >= cfg.train.log_every_seconds:
                rate = (state.samples_seen - last_log_samples) / (now - last_log_time)
                self.metrics.samples_per_second.set(rate)
                waited = next(iter(self.metrics.wait_seconds.collect())).samples[0].value  # its _total, however labelled
                fields = {"samples_per_second": rate, "loss": last_loss, **logs,
                          "input_wait_share": (waited - last_log_wait) / (now - last_log_time)}
                if self.collective.rank == 0:  # the history gets the line's own values too (the LR, points/s)
                    line = self.task.progress(rate, now - last_log_time, last_loss, logs)
                    self.history.append("progress", state, {**fields, **getattr(line, "fields", {})})
                    self.progress_log.progress(line, state, fields)
                last_log_time, last_log_samples, last_log_wait = now, state.samples_seen, waited
            if self.checkpoint_due(now - last_checkpoint_time):
                self.save_checkpoint()
                last_checkpoint_time = time.monotonic()
                every = cfg.checkpoint.publish_every
                if every and state.checkpoints_written % every == 0:
                    self.publish()
        self.loop_seconds = time.monotonic() - started
        self.finish(reason)  # while the feed still runs: the final checkpoint's offsets are committed too

    def finish(self, reason: str) -> None:
        log.info("stopping: %s", reason)
        state, signalled = self.state, self.stop.is_set()
        if signalled:  # an orchestrator's grace period is short: what was trained is made durable first
            self._save_if_new()
        if state.step > 0 and state.eval_step != state.step and (not signalled or self.task.quick_eval):
            self.evaluate()
        self._save_if_new()
        if state.published_step != state.step and (state.eval_step == state.step or not signalled):
            self.publish()
        elif state.step > 0 and state.published_step < state.step:  # a kNN pass outlasts the grace: run() does both
            log.info("not published on a signal: step %d is evaluated and published at the next start", state.step)
        self.progress_log.done(f"done: {reason}; step {state.step}{self.task.summary()}", state)
