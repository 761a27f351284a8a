"""The tracker's pacing policy: how its two receivers keep in step, and where the join clock stops.

The tracker reads two topics (truth and centroids) on a thread each and joins them on a third.
The join window runs on the tracker's clock; live, both topics are read as they are written and
nothing here ever holds anything. Draining a backlog (a restart after downtime, a slow tracker)
or coming back from a broker outage, two things can make a message wait out its window for a
partner that is merely still queued on the other topic: false misses and orphans. ``Pacing``
decides what prevents that; the consumer threads (``carom_tracker.consumer``) do the receiving,
the waiting and the clock reading, and pass every time in as an argument, so the whole policy is
replayable in a test (tests/tracker/test_pacing.py).

Vocabulary (``idx`` is the topic: 0 truth, 1 centroids; times ``now`` are monotonic seconds,
stream times ``*_ms`` are publish/event times in epoch ms):

- *mark*: the newest stream time received on a topic (receive side) or joined from it (join
  side).
- *hold* (``must_hold``): a received batch waits while the other topic is busy but its mark is
  behind the batch's oldest message by more than the *lead*, a quarter window. Both topics can
  never hold at once: each would be ahead of the other by more than the lead.
- *idle*: a topic whose last receive found nothing queued and which is caught up
  (``caught_up``): it has had the broker's last message, or, if that message is another
  replica's key and never comes here, it has been *silent* for ``base_silence_s`` (for
  ``silence_s`` during a recovery). An idle topic holds nothing back.
- *clock limit* (``clock_limit``): the join clock may not pass the join-side mark of a topic
  still busy, or idle with batches not yet joined (see ``Joiner.hold_clock``); live, that is a
  few ms behind the wall clock.
- *recovery*: while the broker link is down no topic is caught up, and for a while after it is
  back (``recovery_silence``) only silence counts: the producers' queued messages reach the
  topics only once they reconnect too, so the broker's last message is not yet the last one.

Each slot of the per-topic lists is written by one thread: the receive side by that topic's
receive thread (``received``, ``handed``, ``went_idle``), the join side by the join thread
(``joining``, ``joined``), and ``link_changed`` by the link watch's thread (it only ever makes a
topic busy again). Single reads and writes of list slots are atomic in CPython, which is all the
threads share.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final

__all__ = [
    "RECOVERY_SILENCE_S",
    "SILENCE_S",
    "MessageKey",
    "Pacing",
    "Positions",
    "recovery_silence",
]

#: Silence after which a topic whose broker-side last message never came here (another
#: replica's key) counts as caught up: above the dispatch pauses seen while the broker reads a
#: deep backlog from storage (0.7 s and more here).
SILENCE_S: Final = 2.0
#: After an outage, how long a topic must be silent to count as caught up: the outage's length,
#: within these bounds. Producers reconnect on their own back-off (the client's doubles up to a
#: minute), and until they have, the broker's last message is not the last one that will come.
RECOVERY_SILENCE_S: Final = (5.0, 75.0)

MessageKey = tuple[int, int]
"""A Pulsar message id as ``(ledger_id, entry_id)``: ordered as its partition is."""

Positions = Mapping[int, MessageKey]
"""A message id per partition of a topic (partition ``-1``: a topic that is not partitioned).

Ids are ordered within a partition only, so a topic's position is one id per partition: a
partitioned topic is caught up when every partition is.
"""


def recovery_silence(outage_s: float) -> float:
    """The silence that counts as caught up after an outage of ``outage_s``."""
    low, high = RECOVERY_SILENCE_S
    return min(high, max(low, outage_s))


class Pacing:
    """Receive alignment, caught-up tracking and the join clock's limit for the two topics.

    ``window_s``: the join window; the lead is a quarter of it and the silence at least one.
    ``now``: the monotonic time at start (a topic's silence counts from it until a message).
    """

    def __init__(self, window_s: float, now: float) -> None:
        self.window_s: Final = window_s
        self.lead_ms: Final = int(window_s * 1000 / 4)
        #: Silence that counts as caught up outside a recovery.
        self.base_silence_s: Final = max(window_s, SILENCE_S)
        #: Silence that counts as caught up during a recovery (``recovery_silence``; the base
        #: again once it is over).
        self.silence_s = self.base_silence_s
        #: Monotonic time until which only silence counts as caught up (``inf``: link down).
        self.recover_until = 0.0
        # Receive side, per topic: newest stream time (ms), whether its last receive found
        # nothing and it is caught up (unknown at start: not idle), batches handed to the join,
        # when it last received and the id of the last message it got from each partition.
        self.marks = [0, 0]
        self.idle = [False, False]
        self.put = [0, 0]
        self.last_rx = [now, now]
        self.last_id: list[dict[int, MessageKey]] = [{}, {}]
        # Join side, per topic: batches joined, newest stream time joined (ms).
        self.done = [0, 0]
        self.joined_ms = [0, 0]
        #: Stream time (ms) the join clock stays at from a link loss to the end of its recovery.
        self.frozen_ms: int | None = None

    # -- receive side (each topic's receive thread) ---------------------------------------------

    def received(self, idx: int, now: float, last_ids: Positions, newest_ms: int) -> None:
        """A batch came on topic ``idx`` at ``now``: its last message of each partition it came
        from, and its newest stream time."""
        self.idle[idx] = False
        self.last_rx[idx] = now
        self.last_id[idx].update(last_ids)
        self.marks[idx] = max(self.marks[idx], newest_ms)

    def must_hold(self, idx: int, oldest_ms: int) -> bool:
        """Whether a batch of topic ``idx`` starting at ``oldest_ms`` must wait for the other.

        It must while the other topic is busy and its mark is more than the lead behind.
        """
        other = 1 - idx
        return not (self.idle[other] or self.marks[other] >= oldest_ms - self.lead_ms)

    def handed(self, idx: int) -> None:
        """A batch of topic ``idx`` was handed to the join thread."""
        self.put[idx] += 1

    def went_idle(self, idx: int) -> None:
        """Topic ``idx`` found nothing queued and is caught up (``caught_up`` said so)."""
        self.idle[idx] = True

    def recovering(self, now: float) -> bool:
        """Whether only silence counts as caught up (the link is down or lately came back)."""
        return now < self.recover_until

    def caught_up(self, idx: int, now: float, last_ids: Positions | None) -> bool:
        """After a receive on topic ``idx`` found nothing: has it had everything in its topic?

        ``last_ids``: the broker's last message id of each partition of the topic (entry ``< 0``:
        an empty partition); None when the broker was not asked (``recovering``: its answer
        would not count) or could not answer (a broker failing over). The
        caller answers False itself while the link is down: an outage is not the end of a
        stream.

        An empty local queue alone proves nothing: the broker pauses dispatch for a second or
        more while it reads a deep backlog from storage (seen here draining 100k frames), hence
        the comparison with the broker's last message. With replicas, that message may be
        another replica's key and never come here: after ``silence_s`` of silence the topic
        counts as caught up anyway. The silence alone used to be one window, which with a short
        window let a dispatch pause pass for caught up (669 false misses in 1 of 6 runs of
        tests/tracker/test_service.py's 0.1 s-window backlog, once producers stopped batching:
        one broker entry per message, more reads from storage).
        """
        recovering = self.recovering(now)
        # Once the recovery is over, the usual silence again: the outage's, kept for good, held
        # the join clock that long at every session's end, where the partition's last message
        # was the other replica's key (15 s after a 15 s failover, past the router's 10 s wait
        # for the session's results: an end reported incomplete, tests/faults).
        need = self.silence_s if recovering else self.base_silence_s
        silent = now - self.last_rx[idx] >= need
        if last_ids is None or recovering:
            return silent  # the topic's last message may still be in a producer's queue
        got = self.last_id[idx]
        if all(last[1] < 0 or got.get(p, (-1, -1)) >= last for p, last in last_ids.items()):
            return True  # every partition's last message came here (or the partition is empty)
        return silent

    def link_changed(self, up: bool, outage_s: float, now: float) -> None:
        """The broker link went down, or came back at ``now`` after ``outage_s``."""
        if not up:
            self.recover_until = float("inf")
            self.idle[0] = self.idle[1] = False
            if self.frozen_ms is None:  # a loss within a recovery keeps the first freeze
                joined = [j for j in self.joined_ms if j]
                self.frozen_ms = min(joined) if joined else None
            return
        silence = recovery_silence(outage_s)
        self.silence_s = max(self.base_silence_s, silence)
        self.last_rx[0] = self.last_rx[1] = now
        self.recover_until = now + silence
        self.idle[0] = self.idle[1] = False

    def behind_ms(self, now_ms: int) -> int:
        """How far the busiest busy topic's newest message is behind ``now_ms`` (0 if none)."""
        behind = [now_ms - self.marks[t] for t in (0, 1) if not self.idle[t] and self.marks[t]]
        return max(0, *behind) if behind else 0

    # -- join side (the join thread) -----------------------------------------------------------

    def joining(self, idx: int, oldest_ms: int) -> None:
        """A batch of topic ``idx`` is about to be joined: the clock stays at or below its oldest.

        A partner further on in the batch must not be given up on before it is reached.
        """
        self.joined_ms[idx] = max(self.joined_ms[idx], oldest_ms)

    def joined(self, idx: int, newest_ms: int) -> None:
        """That batch is joined: until now this topic was not caught up."""
        self.done[idx] += 1
        self.joined_ms[idx] = max(self.joined_ms[idx], newest_ms)

    def clock_limit(self, now: float) -> int | None:
        """The join clock's limit (epoch ns): stream time while a topic has messages to join.

        A topic that is idle with all its batches joined sets no limit, nor one that has joined
        nothing yet; any other holds the clock at the newest stream time joined from it.

        From a link loss to the end of its recovery (``recovering``) the clock also stays where
        both topics had been joined to when the link was lost (``frozen_ms``). A topic's mark is
        its newest message over all its partitions: when only some partitions are away (one
        broker of a cluster lost, the other serving the rest), the other partitions keep the
        topic's mark moving while the lost ones' messages wait in their producers, and every
        frame of a session on a lost partition would be given up on (measured: 143 false misses
        in a 10 s failover of a 4-partition cluster). Nothing is given up on until what the
        producers held has come.
        """
        limit: int | None = None
        for t in (0, 1):
            caught_up = self.idle[t] and self.done[t] == self.put[t]
            if caught_up or self.joined_ms[t] == 0:
                continue
            ns = self.joined_ms[t] * 1_000_000
            limit = ns if limit is None else min(limit, ns)
        if self.frozen_ms is not None:
            if not self.recovering(now):
                self.frozen_ms = None
            else:
                frozen = self.frozen_ms * 1_000_000
                limit = frozen if limit is None else min(limit, frozen)
        return limit
