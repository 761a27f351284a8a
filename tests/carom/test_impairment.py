"""The impairment model: each knob does what it says, to the accuracy issue 20 asks for."""

from __future__ import annotations

import itertools
import random
import statistics

import msgspec
import pytest

from carom import impairment
from carom.impairment import Link, Path, Profile, Verdict

Out = list[tuple[Verdict, float]]

PACKETS = 10_000
GAP_S = 1 / 100  # a packet every 10 ms: 100 packets/s, the order of a 30 fps video's RTP


def run(path: Path, packets: int = PACKETS, size: int = 1200, seed: int = 7) -> tuple[Link, Out]:
    link = Link(path, random.Random(seed))
    out = [link.admit(i * GAP_S, size) for i in range(packets)]
    return link, out


def delays_ms(out: Out) -> list[float]:
    return [(t - i * GAP_S) * 1000 for i, (v, t) in enumerate(out) if v == "sent"]


def test_a_clear_path_sends_every_packet_at_once() -> None:
    _link, out = run(impairment.CLEAR)
    assert all(v == "sent" for v, _ in out) and max(delays_ms(out)) == 0
    assert impairment.CLEAR.is_clear and not Path(delay_ms=1).is_clear


def test_a_50_ms_delay_is_50_ms() -> None:
    _, out = run(Path(delay_ms=50))
    assert all(abs(d - 50) < 1e-6 for d in delays_ms(out))


def test_jitter_spreads_the_delay_and_keeps_the_order() -> None:
    link, out = run(Path(delay_ms=50, jitter_ms=5))
    d = delays_ms(out)
    assert 49 < statistics.mean(d) < 53  # in-order holding adds a little on top of 50
    assert 3 < statistics.stdev(d) < 6
    times = [t for _, t in out]
    assert times == sorted(times) and link.counts.reordered == 0


def test_uniform_jitter_stays_within_its_width() -> None:
    _, out = run(Path(delay_ms=50, jitter_ms=10, jitter="uniform"), packets=2_000)
    d = delays_ms(out)
    assert min(d) >= 40 - 1e-9 and max(d) <= 60 + 1e-9


def test_5_percent_random_loss_is_5_plus_or_minus_1_percent() -> None:
    for seed in range(5):
        link, _ = run(Path(loss_pct=5), seed=seed)
        assert 4.0 <= 100 * link.counts.lost / PACKETS <= 6.0, (seed, link.counts)


def test_bursty_loss_keeps_its_rate_and_comes_in_bursts_of_its_length() -> None:
    link, out = run(Path(loss_pct=5, burst_len=4), packets=100_000)
    assert 4.0 <= 100 * link.counts.lost / 100_000 <= 6.0
    bursts, n = [], 0
    for v, _ in out:
        if v == "lost":
            n += 1
        elif n:
            bursts.append(n)
            n = 0
    assert 3.5 <= statistics.mean(bursts) <= 4.5
    _, random_out = run(Path(loss_pct=5), packets=100_000)
    lone = sum(1 for a, b in itertools.pairwise(random_out) if a[0] == b[0] == "lost")
    assert lone < sum(bursts) / 4  # independent losses rarely come two in a row


def test_a_rate_limit_spaces_packets_and_drops_what_waits_too_long() -> None:
    # 1200 B every 10 ms is 960 kbps: at 480 kbps the queue grows until it holds 100 ms.
    link, out = run(Path(rate_kbps=480, queue_ms=100), packets=2_000)
    sent = [t for v, t in out if v == "sent"]
    gaps = [b - a for a, b in itertools.pairwise(sent)]
    assert min(gaps) >= 1200 * 8 / 480_000 - 1e-9  # 20 ms per packet on the wire
    assert 0.45 < link.counts.queue_full / 2_000 < 0.55  # half the offered load does not fit
    assert max(delays_ms(out)) <= 100 + 20 + 1e-6  # the queue's bound plus one packet's time


def test_a_rate_with_room_adds_only_the_serialisation_time() -> None:
    _, out = run(Path(rate_kbps=10_000), packets=1_000)
    assert all(abs(d - 1200 * 8 / 10_000) < 1e-6 for d in delays_ms(out))  # 0.96 ms each


def test_reordering_holds_its_share_back_and_the_next_overtake_it() -> None:
    link, out = run(Path(delay_ms=10, reorder_pct=10, reorder_gap_ms=25))
    assert 8.5 <= 100 * link.counts.reordered / PACKETS <= 11.5
    times = [t for _, t in out]
    overtaken = sum(1 for a, b in itertools.pairwise(times) if b < a)
    assert overtaken > 0.8 * link.counts.reordered


def test_the_same_seed_gives_the_same_run() -> None:
    path = Path(delay_ms=20, jitter_ms=5, loss_pct=2, burst_len=2, reorder_pct=1)
    assert run(path, seed=3)[1] == run(path, seed=3)[1]
    assert run(path, seed=3)[1] != run(path, seed=4)[1]


def test_counts_say_what_happened() -> None:
    link, _ = run(Path(delay_ms=30, loss_pct=10), packets=1_000)
    c = link.counts
    assert c.packets == 1_000 and c.sent + c.lost == 1_000 and c.queue_full == 0
    assert abs(c.mean_delay_ms - 30) < 1e-6


def test_profiles_by_name_and_by_fields() -> None:
    assert impairment.profile("satellite").media.delay_ms == 270
    assert impairment.profile("lte").reports.rate_kbps == 3_000
    assert impairment.profile("clear").is_clear
    custom = impairment.profile('{"media": {"delay_ms": 100, "loss_pct": 2}}')
    assert custom == Profile(media=Path(delay_ms=100, loss_pct=2))
    assert impairment.profile({"results": {"jitter_ms": 3}}).results.jitter_ms == 3
    with pytest.raises(KeyError, match="known: clear, lte"):
        impairment.profile("dialup")


def test_custom_profiles_take_their_names_and_never_a_built_in_one() -> None:
    mine = impairment.named({"dsl": Profile(media=Path(delay_ms=15))})
    assert mine["dsl"].name == "dsl" and mine["dsl"].media.delay_ms == 15
    with pytest.raises(ValueError, match="lte is a built-in profile's name"):
        impairment.named({"lte": Profile()})


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({"media": {"delay_ms": -5}}, "$.media.delay_ms"),
        ({"reports": {"loss_pct": 101}}, "$.reports.loss_pct"),
        ({"media": {"rate_kbps": 1e12}}, "$.media.rate_kbps"),
        ({"media": {"rate_kbps": 0}}, "$.media.rate_kbps"),
        ({"results": {"jitter": "pareto"}}, "$.results.jitter"),
        ({"media": {"burst_len": 0.5}}, "$.media.burst_len"),
        ({"media": {"delay": 5}}, "$.media"),  # an unknown field: a typo is never ignored
        ({"media": {"loss_pct": 100, "burst_len": 3}}, "burst_len"),
    ],
)
def test_a_bad_profile_is_refused_with_the_field_named(
    fields: dict[str, object], named: str
) -> None:
    with pytest.raises(msgspec.ValidationError) as err:
        impairment.profile(fields)
    assert named in str(err.value), str(err.value)


def test_every_named_profile_is_valid_and_round_trips() -> None:
    for name, p in impairment.PROFILES.items():
        assert p.name == name
        assert msgspec.json.decode(msgspec.json.encode(p), type=Profile) == p
