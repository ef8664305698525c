"""The serial patch loop: one thread, one mistake at a time.

    take the next mistake by the policy (Store.next_mistake claims it: status `patching`)
    one frozen forward: the current model already gives the target?  -> already_fixed
    else train a neuron, gate it (a failed gate is retried inside Patcher.propose with a stronger
    memory weight, `gate.retries` times), then
      accepted -> the patch row is stored (the mistake becomes `patched` in the same transaction),
                  and only then the in-memory model changes
      rejected -> the try is stored for the record, the mistake becomes `gate_rejected`
    an exception while training -> `failed` (an operator re-queues it with `patchd replay`)

"already_fixed" is how paraphrases of earlier fixes and recurrences after a fix are absorbed: the
neuron kept for the first report already answers the later ones.

Stopping: `request_stop()` lets the current mistake finish (its outcome is stored), then the
thread ends (warm stop). A hard kill at any point loses nothing: a mistake left in `patching` is
re-queued at the next start (Store.recover_interrupted) and a stored patch is replayed.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from daemon.logs import bind, clear_context, get_logger, log_context
from daemon.model import PatchedModel
from daemon.settings import PolicySettings
from memory.lifecycle import Status
from memory.records import MistakeRecord
from memory.store import Store
from patching.engine import Proposal

log = get_logger(__name__)

# how long an idle worker sleeps before looking again (the consumer wakes it earlier on new reports)
IDLE_WAIT_S = 1.0
# notes stored with a status change are for people: keep them short
NOTE_CHARS = 500


@dataclass
class EditTiming:
    mistake_id: int
    outcome: str  # already_fixed | patched | gate_rejected | failed
    ms: float  # from claim to stored outcome: forward, training, gate, retries, database writes
    attempts: int = 0
    steps: int = 0


@dataclass
class WorkerStats:
    outcomes: Counter[str] = field(default_factory=Counter)
    timings: list[EditTiming] = field(default_factory=list)
    busy_since: float | None = None  # when the current mistake was claimed (health: stuck worker)
    gate_failures: Counter[str] = field(default_factory=Counter)  # check that refused it -> count


def training_equivalents(mistake: MistakeRecord, policy: PolicySettings) -> list[str]:
    """The paraphrases a patch for `mistake` trains on: those reported with the winning target,
    first seen first (DESIGN §7), without the input itself, at most `policy.max_equivalents`.
    An audit that re-runs the worker's edits (`patchd bench chaos`) must pass exactly these."""
    if not policy.train_on_equivalents:
        return []
    own = mistake.input[0] if isinstance(mistake.input, tuple) else mistake.input
    return [e for e in mistake.equivalents if e != own][: policy.max_equivalents]


class Worker(threading.Thread):
    def __init__(
        self,
        store: Store,
        model: PatchedModel,
        policy: PolicySettings,
        *,
        work_allowed: threading.Event,
        ingest_done: threading.Event,
        once: bool = False,
    ):
        super().__init__(name="patchd-worker", daemon=True)
        self.store = store
        self.model = model
        self.model_name = model.settings.model.name
        self.policy = policy
        self.work_allowed = work_allowed  # set by the consumer once it caught up (or paused)
        self.ingest_done = ingest_done  # --once: no more reports will come
        self.once = once
        self.stats = WorkerStats()
        self.on_patched: Callable[[], None] = lambda: None  # a patch is in the model: publish it soon
        self.error: BaseException | None = None
        self._stop_requested = threading.Event()
        self._wake = threading.Event()

    def wake(self) -> None:
        """New reports were stored: look for work now instead of at the next idle tick."""
        self._wake.set()

    def request_stop(self) -> None:
        """Finish the current mistake, store its outcome, then end (a warm stop)."""
        self._stop_requested.set()
        self._wake.set()

    @property
    def busy(self) -> bool:
        return self.stats.busy_since is not None

    def run(self) -> None:
        bind(thread="worker")
        try:
            self._loop()
        except BaseException as exc:  # the service sees .error, stops, and exits non-zero
            self.error = exc
            log.exception("worker stopped by an error; the service will stop")
        finally:
            clear_context()

    def _loop(self) -> None:
        while not self._stop_requested.is_set():
            if not self.work_allowed.wait(IDLE_WAIT_S):
                continue
            # read before looking: if ingest was done before an empty look, the queue is truly empty
            ingest_done = self.ingest_done.is_set()
            self._wake.clear()
            mistake = self.store.next_mistake(
                self.model_name,
                self.policy.quorum,
                self.policy.conflict_share,
                claim=True,
                probation_s=self.policy.reporter_probation_s,
            )
            if mistake is None:
                if self.once and ingest_done:
                    log.info("queue drained", **dict(self.stats.outcomes))
                    return
                self._wake.wait(IDLE_WAIT_S)
                continue
            self.process(mistake)

    def process(self, mistake: MistakeRecord) -> str:
        """Patch one claimed mistake and store the outcome; returns it."""
        t0 = time.perf_counter()
        self.stats.busy_since = time.time()
        attempts = steps = 0
        with log_context(mistake_id=mistake.id, fingerprint=mistake.fingerprint[:16]):
            try:
                proposal = self.model.propose(mistake, training_equivalents(mistake, self.policy))
            except (ValueError, RuntimeError) as exc:
                # an error is not a verdict: nothing was kept, an operator may re-queue it
                outcome = Status.FAILED
                self.store.set_status(mistake.id, outcome, note=f"{type(exc).__name__}: {exc}"[:NOTE_CHARS])
                log.error("patch failed", error=repr(exc))
            else:
                if proposal is None:
                    outcome = Status.ALREADY_FIXED
                    self.store.set_status(mistake.id, outcome, note="the current model gives the target")
                else:
                    attempts, steps = proposal.attempts, proposal.train.steps
                    outcome = self._keep_or_reject(mistake, proposal)
            ms = (time.perf_counter() - t0) * 1000
            self.stats.busy_since = None
            self.stats.outcomes[str(outcome)] += 1
            self.stats.timings.append(EditTiming(mistake.id, str(outcome), round(ms, 2), attempts, steps))
            log.info(
                "mistake done",
                outcome=str(outcome),
                ms=round(ms, 1),
                attempts=attempts,
                steps=steps,
                reporters=mistake.reporter_count,
                **{"total_" + k: v for k, v in self.stats.outcomes.items()},
            )
        return str(outcome)

    def _keep_or_reject(self, mistake: MistakeRecord, proposal: Proposal) -> Status:
        row = self.model.patch_row(proposal)
        patch_id = self.store.add_patch(mistake.id, row)  # durable first: a crash now replays it
        if proposal.accepted:
            # a failure here would leave the database ahead of the model: let it stop the service,
            # the restart rebuilds the model from the stored patches
            self.model.commit(proposal, patch_id, row)
            log.info(
                "patch kept",
                patch_id=patch_id,
                neurons=row.n_neurons,
                attempts=proposal.attempts,
                changed=proposal.gate.changed,
            )
            self.on_patched()
            return Status.PATCHED
        reasons = "; ".join(proposal.gate.reasons) or "gate refused"
        # "locality: 3 held-out prediction(s) changed" -> "locality"
        self.stats.gate_failures.update(r.split(":", 1)[0] for r in proposal.gate.reasons or ["refused"])
        self.store.set_status(
            mistake.id, Status.GATE_REJECTED, note=f"{proposal.attempts} tries: {reasons}"[:NOTE_CHARS]
        )
        log.warning("patch rejected by the gate", patch_id=patch_id, attempts=proposal.attempts, reasons=reasons)
        return Status.GATE_REJECTED
