"""Whom to blame when a step fails: group testing over the requests that were in it.

A step runs every scheduled request at once, so one request that breaks it (a value no check
foresaw) would otherwise fail all of them. After a failed step the engine rolls every running
request back to its landed tokens (``LLMEngine.roll_back``: recomputed later, as after a
preemption, so greedy outputs stay exact) and this policy halves the suspects: one half runs while
the other is held out of scheduling. A half whose every request lands a token is cleared; a half
whose step fails again is halved again, until one request fails alone: only that one is failed.
Requests that arrive meanwhile are held until the search ends. A step that fails with nothing
left to suspect, or two requests failing alone in a row, is no request's fault: then every
request fails, and the verdict says so.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import attrs


@attrs.frozen
class Verdict:
    blame: tuple[str, ...] = ()  # fail these: their step failed with them alone
    hold: tuple[str, ...] = ()  # keep these out of scheduling for now
    release: tuple[str, ...] = ()  # schedule these again
    systemic: bool = False  # the steps fail whatever they hold: fail everything


class FaultIsolation:
    def __init__(self) -> None:
        self.testing: dict[str, int] = {}  # request -> tokens landed since its test began
        self.held: list[str] = []  # suspects not tested yet, in arrival order
        self.waiting: list[str] = []  # arrived during the search: not suspects, held until it ends
        self._lone_failures = 0

    @property
    def active(self) -> bool:
        return bool(self.testing or self.held)

    @property
    def needs_news(self) -> bool:
        """Whether ``landed`` wants to hear of successful steps (a search, or a recent lone failure)."""
        return self.active or self._lone_failures > 0

    def failed(self, running: Iterable[str]) -> Verdict:
        """A step failed; ``running``: the unfinished requests that were running (now rolled back)."""
        if self._lone_failures > 1:  # still failing whatever it holds, since the last verdict said so
            return self._give_up()
        suspects = list(self.testing) if self.active else list(dict.fromkeys(running))
        if not suspects:  # only cleared requests (or none) ran: nobody to blame
            return self._give_up()
        if len(suspects) == 1:
            self._lone_failures += 1
            if self._lone_failures > 1:
                return self._give_up()
            self.testing = {}
            return attrs.evolve(self._next(), blame=(suspects[0],))
        half = len(suspects) // 2
        self.testing = dict.fromkeys(suspects[:half], 0)
        self.held = [*suspects[half:], *self.held]
        return Verdict(hold=tuple(suspects[half:]))

    def arrived(self, request_id: str) -> bool:
        """A new request: True if it must be held (a search is going on)."""
        if self.active:
            self.waiting.append(request_id)
        return self.active

    def landed(self, tokens: Mapping[str, int], ended: Iterable[str]) -> Verdict:
        """A step succeeded: ``tokens`` landed per request, ``ended``: requests that ended."""
        if not self.active:
            if any(tokens.values()):  # a step that landed tokens: the last lone failure was that request's
                self._lone_failures = 0
            return Verdict()
        for rid in ended:
            self.testing.pop(rid, None)
            if rid in self.held:
                self.held.remove(rid)
            if rid in self.waiting:
                self.waiting.remove(rid)
        for rid, n in tokens.items():
            if rid in self.testing:
                self.testing[rid] += n
        if all(n > 0 for n in self.testing.values()):  # this half is cleared
            self._lone_failures = 0
            self.testing = {}
            return self._next()
        return Verdict()

    def _next(self) -> Verdict:
        """Test the next half of the held suspects; when none is left, release everyone."""
        if not self.held:
            release, self.waiting = tuple(self.waiting), []
            return Verdict(release=release)
        half = max(1, len(self.held) // 2)
        batch, self.held = self.held[:half], self.held[half:]
        self.testing = dict.fromkeys(batch, 0)
        return Verdict(release=tuple(batch))

    def forget(self, request_id: str) -> None:
        """The request ended outside a step (aborted, failed)."""
        self.testing.pop(request_id, None)
        for queue in (self.held, self.waiting):
            if request_id in queue:
                queue.remove(request_id)

    def _give_up(self) -> Verdict:
        self.testing, self.held, self.waiting = {}, [], []  # the caller fails every request
        self._lone_failures = 2  # until a step lands tokens, a failure is nobody's fault
        return Verdict(systemic=True)
