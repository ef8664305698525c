"""A mistake's statuses (memory/lifecycle.py owns the transitions between them).

Its own module because the tables (memory/schema.py) need the enum for the status column and
memory/lifecycle.py needs the tables to record each change: both import this, neither the other.
"""

from __future__ import annotations

from enum import StrEnum


class Status(StrEnum):
    REPORTED = "reported"  # seen, not yet at quorum (or not yet looked at by the policy)
    QUEUED = "queued"  # at quorum, target decided, waiting for the worker
    CONFLICTING = "conflicting"  # reporters disagree on the target; no winner above the share
    ALREADY_FIXED = "already_fixed"  # the current model already gives the target
    PATCHING = "patching"  # claimed by the worker; a crash leaves it here until recovery
    PATCHED = "patched"  # a neuron for it was accepted by the gate and is in the model
    GATE_REJECTED = "gate_rejected"  # every try was refused by the locality/retention gate
    FAILED = "failed"  # training or the forward raised; nothing was kept
    REVOKED = "revoked"  # an operator removed its neuron; it stays out until re-queued by hand
    # at quorum, but no reporter of its target is established yet (policy.reporter_probation_s):
    # waits for an operator's `patchd review approve|dismiss`
    HELD = "held"
    DISMISSED = "dismissed"  # an operator judged a held correction wrong; it is never patched


# Statuses from which new reports may still change the policy's decision.
OPEN: frozenset[Status] = frozenset({Status.REPORTED, Status.QUEUED, Status.CONFLICTING})
