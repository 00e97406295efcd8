"""Continuous batching: which sequences run this step, and how many tokens each computes.

Each step has a token budget (``max_num_batched_tokens``). Running sequences go first, in
(priority, arrival) order: a decode costs one token, an unfinished prompt takes what is left of
the budget (chunked prefill, so a long prompt never stalls the decodes). Then waiting sequences
are admitted while the budget, ``max_num_seqs`` and free blocks allow. Without chunked prefill
(vLLM's original policy) waiting prompts go first, whole, in a prefill-only step that pauses the
decodes: a newcomer's first token comes sooner, everyone else's next one later. When a running sequence
cannot get a block, the latest-arrived (lowest-priority) running sequence is preempted: its
blocks are freed and it goes back to the waiting queue to be recomputed later; no request is lost.
"""

from __future__ import annotations

import bisect
import time

import attrs

from mini_vllm.engine.block_manager import BlockManager
from mini_vllm.engine.errors import ConfigError
from mini_vllm.engine.sequence import PLACEHOLDER, SeqStatus, Sequence


# Not frozen: a frozen attrs record sets each field through object.__setattr__, four times the cost
# of a plain one, and a step makes one per sequence. Nothing changes one after it is made.
@attrs.define
class ScheduledSeq:
    seq: Sequence
    start: int  # first position computed this step (== num_computed_tokens when scheduled)
    num_new_tokens: int
    # The live table, not a copy (a copy per sequence per step is measurable at 256 sequences):
    # valid until the next schedule/process, and ModelRunner.launch consumes it before returning.
    block_table: list[int]
    num_samples: int  # 0 for a prompt chunk that does not reach the end; n for a forking prefill

    # The step's sampled token (sample 0 for a forking prefill) lands at token_ids[end].

    @property
    def end(self) -> int:
        return self.start + self.num_new_tokens


# Block copies (source, destination) that an allocation asks for; most steps need none.
Copies = list[tuple[int, int]] | tuple[()]
NO_COPIES: tuple[()] = ()


@attrs.frozen
class SchedulerOutput:
    seqs: tuple[ScheduledSeq, ...]
    copies: tuple[tuple[int, int], ...]  # (src, dst) block copies to do first (copy-on-write)
    preempted: tuple[Sequence, ...]

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.seqs)


class Scheduler:
    def __init__(
        self,
        block_manager: BlockManager,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        max_model_len: int,
        chunked_prefill: bool = True,
    ) -> None:
        self.block_manager = block_manager
        self.check_budget(chunked_prefill, max_num_batched_tokens, max_model_len)
        self.chunked_prefill = chunked_prefill
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.waiting: list[Sequence] = []  # sorted by sort_key
        self.running: list[Sequence] = []  # sorted by sort_key
        self.held: list[Sequence] = []  # waiting, but kept out of scheduling (engine.fault_isolation)
        self.num_preemptions = 0

    @staticmethod
    def check_budget(chunked_prefill: bool, max_num_batched_tokens: int, max_model_len: int) -> None:
        """Without chunked prefill a prompt is computed in one step, so the budget must hold the longest."""
        if not chunked_prefill and max_num_batched_tokens < max_model_len:
            raise ConfigError(
                f"with enable_chunked_prefill=False every prompt is computed in one step, so "
                f"max_num_batched_tokens ({max_num_batched_tokens}) must be >= max_model_len ({max_model_len}): "
                f"raise it or lower max_model_len"
            )

    def add(self, seq: Sequence) -> None:
        seq.status = SeqStatus.WAITING
        bisect.insort(self.waiting, seq, key=lambda s: s.sort_key)

    def add_running(self, seq: Sequence) -> None:
        seq.status = SeqStatus.RUNNING
        bisect.insort(self.running, seq, key=lambda s: s.sort_key)

    def remove(self, seq: Sequence) -> None:
        """Take a sequence out of the queues and free its blocks (finished or aborted)."""
        if seq.status is SeqStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SeqStatus.WAITING:
            (self.waiting if seq not in self.held else self.held).remove(seq)
        self.block_manager.free(seq.seq_id)
        seq.status = SeqStatus.FINISHED

    def requeue(self, seq: Sequence) -> None:
        """A running sequence back to waiting, to be recomputed (its step failed; not a preemption)."""
        self.running.remove(seq)
        self.block_manager.free(seq.seq_id)
        seq.num_computed_tokens = 0
        self.add(seq)

    def hold(self, seq: Sequence) -> None:
        """Keep a waiting sequence out of scheduling until ``release``."""
        if seq.status is SeqStatus.WAITING and seq not in self.held:
            self.waiting.remove(seq)
            self.held.append(seq)

    def release(self, seq: Sequence) -> None:
        if seq in self.held:
            self.held.remove(seq)
            self.add(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.block_manager.free(seq.seq_id)
        seq.num_computed_tokens = 0
        self.num_preemptions += 1
        self.add(seq)

    def schedule(self) -> SchedulerOutput:
        bm = self.block_manager
        budget = self.max_num_batched_tokens
        chosen: dict[int, tuple[Sequence, int, Copies]] = {}  # seq_id -> (seq, n, copies)
        preempted: list[Sequence] = []

        if not self.chunked_prefill:
            budget -= self._admit(chosen, budget, whole=True)
            if chosen:
                return self._output(chosen, preempted, in_running_order=False)

        # A preemption takes the last running sequence out of the list walked here: that only ends
        # the walk sooner (the victim, possibly seq itself, would have come after seq).
        for seq in self.running:
            if budget <= 0:
                break
            if seq.length_capped:  # its last token is still in flight; it finishes when that lands
                continue
            num_new = min(len(seq.token_ids) - seq.num_computed_tokens, budget)
            needed = seq.num_computed_tokens + num_new
            copies = NO_COPIES if bm.fits(seq.seq_id, needed) else bm.allocate(seq.seq_id, needed)
            while copies is None:
                victim = self.running[-1]
                if victim.seq_id in chosen:  # undo its place in this batch
                    _, n, _ = chosen.pop(victim.seq_id)
                    budget += n
                self._preempt(victim)
                preempted.append(victim)
                if victim is seq:
                    break
                copies = bm.allocate(seq.seq_id, seq.num_computed_tokens + num_new)
            if copies is None:
                break  # seq itself was preempted: it was the last one running
            chosen[seq.seq_id] = (seq, num_new, copies)
            budget -= num_new

        # Admit new work only when nothing had to be preempted: otherwise we would thrash.
        admitted = self.chunked_prefill and not preempted and self._admit(chosen, budget, whole=False) > 0
        return self._output(chosen, preempted, in_running_order=not admitted)

    def _admit(self, chosen: dict[int, tuple[Sequence, int, Copies]], budget: int, whole: bool) -> int:
        """Admit waiting sequences in order while the budget, ``max_num_seqs`` and free blocks
        allow; ``whole``: only a prompt whose whole remaining part fits. Returns the tokens used."""
        bm = self.block_manager
        used = 0
        while self.waiting and used < budget and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if seq.token_ids[-1] == PLACEHOLDER:
                break  # preempted with a token in flight: recompute once it has landed
            if seq.seq_id not in bm.tables:
                seq.num_computed_tokens = bm.match_prefix(seq.seq_id, seq.token_ids)
            remaining = len(seq.token_ids) - seq.num_computed_tokens
            num_new = remaining if whole else min(remaining, budget - used)
            copies = bm.allocate(seq.seq_id, seq.num_computed_tokens + num_new) if num_new <= budget - used else None
            if copies is None:
                # First come, first served: nobody overtakes the head of the queue. Keep no cached
                # blocks pinned while waiting; look the prefix up again next time.
                bm.free(seq.seq_id)
                seq.num_computed_tokens = 0
                break
            self.waiting.pop(0)
            self.add_running(seq)
            if seq.request.scheduled_at is None:  # its first batch (a preempted one was scheduled before)
                seq.request.scheduled_at = time.monotonic()
            chosen[seq.seq_id] = (seq, num_new, copies)
            used += num_new
        return used

    def _output(self, chosen: dict[int, tuple[Sequence, int, Copies]], preempted: list[Sequence],
                in_running_order: bool) -> SchedulerOutput:
        """The batch in running order, which keeps it deterministic. ``in_running_order``: ``chosen``
        already is (it was filled walking ``running``, and nobody admitted was inserted into it)."""
        tables = self.block_manager.tables
        max_model_len = self.max_model_len
        scheduled = []
        all_copies: list[tuple[int, int]] = []
        entries = chosen.values() if in_running_order else [
            chosen[s.seq_id] for s in self.running if s.seq_id in chosen
        ]
        for seq, num_new, copies in entries:
            if copies:
                all_copies.extend(copies)
            start = seq.num_computed_tokens
            token_ids = seq.token_ids
            request = seq.request
            samples = (1 if request.forked else request.params.n) if start + num_new == len(token_ids) else 0
            scheduled.append(ScheduledSeq(seq, start, num_new, tables[seq.seq_id], samples))
            # Account for the step now, so the next step can be scheduled before this one ends.
            seq.num_computed_tokens = start + num_new
            if samples:
                request.forked = True  # the other samples split off when this step lands
                token_ids.append(PLACEHOLDER)
                length = len(token_ids)
                if length - seq.num_prompt_tokens >= request.params.max_tokens or length >= max_model_len:
                    seq.length_capped = True
        return SchedulerOutput(tuple(scheduled), tuple(all_copies), tuple(preempted))
