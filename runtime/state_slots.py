"""Per-request recurrent state for models with recurrent layers (Mamba, Mamba-2, gated delta
nets, short convolutions): a request takes a slot when admitted and gives it back when it
finishes, is aborted or is preempted. A slot starts empty; the runner asks the model for a fresh
state (`new_state()`) on the request's first forward, so a preempted request, which recomputes
from its tokens, starts from a fresh state too. Nothing of a state is shared between requests:
there is no prefix cache for these models."""

from __future__ import annotations

from typing import Any, Callable

from kiln.runtime.request import Request


class StateSlots:
    def __init__(self, num_slots: int):
        self.states: list[Any] = [None] * num_slots
        self.free_slots = list(range(num_slots - 1, -1, -1))

    @property
    def num_free(self) -> int:
        return len(self.free_slots)

    def allocate(self, req: Request) -> None:
        req.state_slot = self.free_slots.pop()
        self.states[req.state_slot] = None

    def free(self, req: Request) -> None:
        if req.state_slot is not None:
            self.states[req.state_slot] = None  # (drop the tensors now, not at the slot's next use)
            self.free_slots.append(req.state_slot)
            req.state_slot = None

    def state(self, req: Request, new_state: Callable[[], Any]) -> Any:
        """The request's state, made by `new_state` on its first use since admission."""
        if self.states[req.state_slot] is None:
            self.states[req.state_slot] = new_state()
        return self.states[req.state_slot]

    def __str__(self) -> str:
        return f"state slots {len(self.states) - self.num_free}/{len(self.states)} in use"
