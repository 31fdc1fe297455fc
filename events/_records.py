"""The catalogue of audit-log record names (docs/events.md lists their fields)."""

from __future__ import annotations

SESSION_CREATED = "session.created"
SESSION_UPDATED = "session.updated"
SESSION_TOUCHED = "session.touched"
HASH_RECORDED = "hash.recorded"
SESSION_ESCALATED = "session.escalated"
COST_ADDED = "cost.added"
STICKY_PINNED = "sticky.pinned"
STICKY_EXPIRED = "sticky.expired"
DEPLOYMENT_SET = "deployment.set"
DEPLOYMENT_GROUP_SET = "deployment.group_set"
DECISION_MADE = "decision.made"
BUDGET_RESERVED = "budget.reserved"
BUDGET_RELEASED = "budget.released"
BUDGET_LAPSED = "budget.lapsed"
SESSION_EXPIRED = "session.expired"
SESSION_EVICTED = "session.evicted"
SESSION_CLEARED = "session.cleared"
SESSION_REFUSED = "session.refused"
INPUT_REJECTED = "input.rejected"
SHARD_RESTARTED = "shard.restarted"
LOG_SNAPSHOT = "log.snapshot"
LOG_SIGNED = "log.signed"

#: Records after which the session no longer exists.
ENDING_RECORDS = frozenset({SESSION_EXPIRED, SESSION_EVICTED, SESSION_CLEARED})

RECORD_NAMES = (
    SESSION_CREATED, SESSION_UPDATED, SESSION_TOUCHED, HASH_RECORDED,
    SESSION_ESCALATED, COST_ADDED, STICKY_PINNED, STICKY_EXPIRED, DEPLOYMENT_SET,
    DEPLOYMENT_GROUP_SET, DECISION_MADE, BUDGET_RESERVED, BUDGET_RELEASED, BUDGET_LAPSED, SESSION_EXPIRED,
    SESSION_EVICTED, SESSION_CLEARED,
    SESSION_REFUSED, INPUT_REJECTED, SHARD_RESTARTED, LOG_SNAPSHOT, LOG_SIGNED,
)
