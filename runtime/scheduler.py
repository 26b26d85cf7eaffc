"""Continuous batching: each step, pick which requests compute how many tokens.

Every request has `num_computed_tokens` of its `num_tokens` in the KV cache; a step gives each
scheduled request the next `num_new_tokens` of them, within a token budget. Running requests go
first (a decode is one token), then waiting ones (a prefill, cut into chunks when it does not
fit the budget). When blocks run out, the most recently admitted running request is preempted:
its blocks are freed and it will recompute its tokens from the start (its outputs so far kept).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from kiln.runtime.block_manager import BlockManager
from kiln.runtime.request import Request, RequestStatus
from kiln.runtime.state_slots import StateSlots


@dataclass
class SchedulerOutput:
    scheduled: list[tuple[Request, int]] = field(default_factory=list)  # (request, num_new_tokens)
    preempted: list[Request] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(n for _, n in self.scheduled)

    def __str__(self) -> str:
        parts = [f"{r.request_id}:{r.num_computed_tokens}+{n}" for r, n in self.scheduled]
        return f"step[{self.num_tokens} tokens] " + " ".join(parts) + (
            f" preempted={[r.request_id for r in self.preempted]}" if self.preempted else "")


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int,
                 enable_chunked_prefill: bool = True, cross_slots: "CrossSlots | None" = None,
                 state_slots: "StateSlots | None" = None):
        self.block_manager = block_manager
        self.cross_slots = cross_slots  # encoder-decoder models: a request holds one from admission to finish
        self.state_slots = state_slots  # recurrent models: one from admission to finish or preemption
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.enable_chunked_prefill = enable_chunked_prefill
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0  # over the engine's life, for tests and metrics

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        bm = self.block_manager

        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            num_new = min(req.num_tokens - req.num_computed_tokens, budget)
            while not bm.allocate(req, num_new):
                victim = self.running.pop()
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is req:
                    break
            else:
                out.scheduled.append((req, num_new))
                budget -= num_new
                i += 1

        # Admit waiting requests only when nothing had to be preempted: the cache is tight.
        while self.waiting and not out.preempted and budget > 0 and len(self.running) < self.max_num_seqs:
            req = self.waiting[0]
            cached = bm.find_cached_prefix(req) if not req.block_ids else []
            num_new = req.num_tokens - req.num_computed_tokens - len(cached) * bm.block_size
            if num_new > budget:
                if not self.enable_chunked_prefill:
                    break
                num_new = budget
            needs_slot = req.encoder_input is not None and req.cross_slot is None
            if needs_slot and not self.cross_slots.num_free:
                break
            needs_state = self.state_slots is not None and req.state_slot is None
            if needs_state and not self.state_slots.num_free:
                break
            if not bm.allocate(req, num_new, cached):
                break
            if needs_slot:
                self.cross_slots.allocate(req)
            if needs_state:
                self.state_slots.allocate(req)
            self.waiting.popleft()
            req.num_computed_tokens += len(cached) * bm.block_size
            if req.num_preemptions == 0:
                req.num_cached_tokens = req.num_computed_tokens
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            out.scheduled.append((req, num_new))
            budget -= num_new
        return out

    def _preempt(self, req: Request) -> None:
        self.block_manager.free(req)
        if self.state_slots is not None:  # it recomputes from its tokens, from a fresh state
            self.state_slots.free(req)
        req.num_computed_tokens = 0
        req.num_preemptions += 1
        self.num_preemptions += 1
        req.status = RequestStatus.PREEMPTED
        self.waiting.appendleft(req)

    def finish(self, req: Request, status: RequestStatus) -> None:
        """Take a request out of the queues and free its blocks (finished or aborted)."""
        if req in self.running:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        self.block_manager.free(req)
        if self.cross_slots is not None:
            self.cross_slots.free(req)
        if self.state_slots is not None:
            self.state_slots.free(req)
        req.status = status


class CrossSlots:
    """The cross-attention cache's slots: an encoder-decoder request takes one when admitted (its
    encoder output's keys and values are written there once) and gives it back when it finishes.
    A preempted request keeps its slot: recomputing its decoder tokens needs no second encoder run."""

    def __init__(self, num_slots: int):
        self.free_slots = list(range(num_slots - 1, -1, -1))

    @property
    def num_free(self) -> int:
        return len(self.free_slots)

    def allocate(self, req: Request) -> None:
        req.cross_slot, req.encoded = self.free_slots.pop(), False

    def free(self, req: Request) -> None:
        if req.cross_slot is not None:
            self.free_slots.append(req.cross_slot)
            req.cross_slot = None


class PoolingScheduler:
    """Pooling requests have no decode and keep no KV cache: each step packs whole prompts, first
    come first served, up to the token budget (a prompt longer than the budget runs alone)."""

    def __init__(self, max_num_seqs: int, max_num_batched_tokens: int):
        self.max_num_seqs, self.max_num_batched_tokens = max_num_seqs, max_num_batched_tokens
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # always empty between steps
        self.num_preemptions = 0

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    def has_unfinished(self) -> bool:
        return bool(self.waiting)

    def schedule(self) -> SchedulerOutput:
        out, budget = SchedulerOutput(), self.max_num_batched_tokens
        while self.waiting and len(out.scheduled) < self.max_num_seqs:
            n = self.waiting[0].num_tokens
            if out.scheduled and n > budget:
                break
            req = self.waiting.popleft()
            req.status = RequestStatus.RUNNING
            out.scheduled.append((req, n))
            budget -= n
        return out

    def finish(self, req: Request, status: RequestStatus) -> None:
        if req.status == RequestStatus.WAITING:  # (a scheduled request has already left the queue)
            self.waiting.remove(req)
        req.status = status
