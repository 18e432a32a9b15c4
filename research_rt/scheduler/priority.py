"""Priority scheduling (`--enable-priority-scheduling`): queue order and preemption.

Each request may carry an integer `priority` (None counts as 0). Higher values run first, or lower
ones with `--schedule-low-priority-values-first`; `urgency` folds that choice into one number where
larger is always more urgent. The waiting queue is ordered by urgency, most urgent first; requests
of equal urgency keep the order `--schedule-policy` gave them (fcfs: arrival).

Preemption rule: when the most urgent waiting request that does not fit cannot be admitted
(`max_running_requests` reached, no free request row, or not enough KV room), running requests
whose urgency is lower than its by MORE than `--priority-scheduling-preemption-threshold`
(default 10) are retracted back to the queue, least urgent first (ties: the one with the fewest
output tokens), one at a time until the request fits. Nothing is preempted when even retracting
all of them could not make it fit. A preempted request keeps what it computed in the prefix cache
and later resumes with the same output (greedy decoding gives the same tokens); the request being
chunk-prefilled is never preempted.
"""

from __future__ import annotations

from collections.abc import Callable

from research_rt.core.req import Req
from research_rt.scheduler.cache import CacheManager
from research_rt.scheduler.decode import DecodeRoom


class PriorityPolicy:
    def __init__(self, args) -> None:
        self.enabled = bool(args.enable_priority_scheduling)
        self.low_first = bool(args.schedule_low_priority_values_first)
        self.threshold = int(args.priority_scheduling_preemption_threshold)

    def urgency(self, req: Req) -> int:
        p = req.priority or 0
        return -p if self.low_first else p

    def order(self, reqs: list[Req]) -> list[Req]:
        """Most urgent first; a stable sort, so equal urgency keeps the given order."""
        return sorted(reqs, key=lambda r: -self.urgency(r)) if self.enabled else list(reqs)

    def victims(self, req: Req, running: list[Req]) -> list[Req]:
        """Running requests `req` may preempt, in the order they would be retracted."""
        if not self.enabled:
            return []
        bar = self.urgency(req) - self.threshold
        eligible = [r for r in running if self.urgency(r) < bar]
        return sorted(eligible, key=lambda r: (self.urgency(r), len(r.output_ids)))

    def preemptor(self, cache: CacheManager, decode_room: DecodeRoom) -> Preemptor | None:
        return Preemptor(self, cache, decode_room) if self.enabled else None

    def retraction_key(self, req: Req) -> tuple[int, int, int]:
        """Which running request a full KV pool retracts first (the minimum): the least urgent,
        then the one with the least progress (as without priorities)."""
        urgency = self.urgency(req) if self.enabled else 0
        return urgency, len(req.output_ids), -len(req.input_ids)


class Preemptor:
    """Makes room for one waiting request by retracting running ones (see the module doc)."""

    def __init__(self, policy: PriorityPolicy, cache: CacheManager, decode_room: DecodeRoom) -> None:
        self.policy = policy
        self.cache = cache
        self.decode_room = decode_room

    def make_room(
        self,
        req: Req,
        need: float,
        room: float,
        fits: Callable[[float], bool],
        running: list[Req],
        waiting: list[Req],
        reserve: Callable[[Req], float],
    ) -> float | None:
        """Retract eligible running requests until `fits(room)` (a running slot, a request row and
        `need` KV room for `req`); the room then, or None when it still does not fit (nothing is
        retracted when even all of them could not free enough). `reserve(r)` is the decode room
        the adder set aside for running request `r`."""
        victims = self.policy.victims(req, running)
        # a request gives back at most its own slots (a shared prefix only if nobody else holds it)
        if not victims or room + sum(v.kv_len + reserve(v) for v in victims) < need:
            return None
        for victim in victims:
            if fits(room):
                break
            before = self.cache.room()
            self._retract(victim, running, waiting)
            room += self.cache.room() - before + reserve(victim)
        return room if fits(room) else None

    def _retract(self, victim: Req, running: list[Req], waiting: list[Req]) -> None:
        running.remove(victim)
        self.decode_room.retract(victim, waiting, reset_ratio=False)
