"""Schema validation on good and malformed input (pure, no broker)."""

from __future__ import annotations

import json
import math

import pytest

from carom import schemas
from carom.schemas import Centroid, FrameResult, SchemaError, Truth

T0 = 1_795_000_000_000_000_000


def truth(**kw: object) -> Truth:
    base: dict[str, object] = dict(
        session_id="s-1", frame=7, rtp_ts=123456, x=320.25, y=11.5, t_render_ns=T0
    )
    base.update(kw)
    return schemas.build(Truth, **base)


def centroid(**kw: object) -> Centroid:
    base: dict[str, object] = dict(
        session_id="s-1",
        rtp_ts=123456,
        detected=True,
        x=320.0,
        y=11.0,
        t_browser_recv_ns=T0 + 5,
        t_browser_analysed_ns=T0 + 6,
        t_router_recv_ns=T0 + 7,
        t_published_ns=T0 + 8,
        clock_offset_ns=-42,
    )
    base.update(kw)
    return schemas.build(Centroid, **base)


def error(**kw: object) -> FrameResult:
    base: dict[str, object] = dict(
        session_id="s-1",
        frame=7,
        rtp_ts=123456,
        status="ok",
        truth_x=320.25,
        truth_y=11.5,
        x=320.0,
        y=11.0,
        l2=0.559,
        t_render_ns=T0,
        t_computed_ns=T0 + 99,
    )
    base.update(kw)
    return schemas.build(FrameResult, **base)


@pytest.mark.parametrize("make", [truth, centroid, error])
def test_round_trip_keeps_every_field(make) -> None:  # type: ignore[no-untyped-def]
    msg = make()
    data = schemas.encode(msg)
    assert schemas.decode(data, type(msg)) == msg
    assert schemas.decode_any(data) == msg
    doc = json.loads(data)
    assert doc["schema_version"] == schemas.SCHEMA_VERSION
    assert doc["kind"] in {"truth", "centroid", "error"}


def test_not_detected_report_has_no_position() -> None:
    msg = centroid(detected=False, x=None, y=None)
    assert schemas.decode(schemas.encode(msg), Centroid).x is None
    with pytest.raises(SchemaError, match="required when `detected`"):
        centroid(detected=True, x=None, y=None)
    with pytest.raises(SchemaError, match="must be null when `detected` is false"):
        centroid(detected=False, x=1.0, y=2.0)


def test_error_result_l2_matches_status() -> None:
    assert error(status="missed", x=None, y=None, l2=None).l2 is None
    with pytest.raises(SchemaError, match="`l2` is required"):
        error(status="ok", l2=None)
    with pytest.raises(SchemaError, match="`l2` is required"):
        error(status="not_detected", x=None, y=None, l2=1.0)


@pytest.mark.parametrize(
    ("field", "value", "needle"),
    [
        ("x", "12", "`$.x`"),  # wrong type
        ("x", -0.5, "`$.x`"),  # off the frame
        ("x", 1e9, "`$.x`"),  # huge
        ("y", math.inf, "`$.y`"),
        ("y", math.nan, "`$.y`"),
        ("rtp_ts", 2**32, "`$.rtp_ts`"),
        ("rtp_ts", -1, "`$.rtp_ts`"),
        ("frame", 1.5, "`$.frame`"),
        ("t_render_ns", -1, "`$.t_render_ns`"),
        ("session_id", "", "`$.session_id`"),
        ("session_id", "a b", "`$.session_id`"),
        ("session_id", "x" * 65, "`$.session_id`"),
        ("schema_version", 2, "`$.schema_version`"),
    ],
)
def test_build_rejects_bad_values_naming_the_field(field: str, value: object, needle: str) -> None:
    with pytest.raises(SchemaError) as info:
        truth(**{field: value})
    assert needle in str(info.value)


@pytest.mark.parametrize(
    ("raw", "needle"),
    [
        (b"", "truncated"),
        (b"not json", "malformed"),
        (b"[1,2,3]", "Expected `object`"),
        (b'{"kind":"truth"}', "missing required field"),
        (b'{"kind":"nope","session_id":"a"}', "Invalid value 'nope'"),
        (
            b'{"kind":"truth","session_id":"a","frame":1,"rtp_ts":1,"x":NaN,"y":1,"t_render_ns":1}',
            "malformed",
        ),
        (
            b'{"kind":"truth","session_id":"a","frame":1,"rtp_ts":1,"x":1e400,"y":1,"t_render_ns":1}',
            "`$.x`",
        ),
    ],
)
def test_decode_rejects_malformed_bytes(raw: bytes, needle: str) -> None:
    with pytest.raises(SchemaError) as info:
        schemas.decode_any(raw)
    assert needle in str(info.value)


def test_unknown_fields_are_rejected() -> None:
    data = json.loads(schemas.encode(truth()))
    data["extra"] = 1
    with pytest.raises(SchemaError, match="unknown field `extra`"):
        schemas.decode(json.dumps(data), Truth)


def test_wrong_kind_for_topic_is_rejected() -> None:
    with pytest.raises(SchemaError, match=r"`\$\.kind`"):
        schemas.decode(schemas.encode(centroid()), Truth)


def test_direct_construction_rejects_nan() -> None:
    with pytest.raises(ValueError, match="finite"):
        Truth(session_id="a", frame=0, rtp_ts=0, x=math.nan, y=0.0, t_render_ns=0)


def test_validate_checks_a_directly_built_message() -> None:
    ok = Truth(session_id="a", frame=0, rtp_ts=0, x=1.0, y=1.0, t_render_ns=0)
    assert schemas.validate(ok) == ok
    bad = Truth(session_id="a", frame=0, rtp_ts=2**40, x=1.0, y=1.0, t_render_ns=0)
    with pytest.raises(SchemaError, match="rtp_ts"):
        schemas.validate(bad)


def test_json_schema_documents_all_kinds() -> None:
    text = json.dumps(schemas.json_schema())
    for name in ("Truth", "Centroid", "FrameResult", "t_router_recv_ns", "rtp_ts"):
        assert name in text


def test_playout_modes_map_to_the_delay_a_sender_writes() -> None:
    assert schemas.playout_delay("smooth") is None
    assert schemas.playout_delay("interactive") == (0, 0)
    assert schemas.playout_delay("0-100") == (0, 100)
    for bad in ("", "fast", "100-0", "5-10", "0-40960", "-10-0", "0-"):
        with pytest.raises(ValueError, match="latency"):
            schemas.playout_delay(bad)


def test_truth_and_not_sent_say_their_playout_mode() -> None:
    t = Truth(session_id="s", frame=1, rtp_ts=2, x=1.0, y=2.0, t_render_ns=3)
    assert t.latency == "smooth"  # what every frame was before the mode existed
    raw = schemas.encode(Truth(session_id="s", frame=1, rtp_ts=2, x=1.0, y=2.0, t_render_ns=3,
                               latency="interactive"))  # fmt: skip
    assert schemas.decode_truth_topic(raw) == Truth(
        session_id="s", frame=1, rtp_ts=2, x=1.0, y=2.0, t_render_ns=3, latency="interactive"
    )
    with pytest.raises(SchemaError, match="latency"):
        schemas.decode_truth_topic(raw.replace(b"interactive", b"30-20"))
    with pytest.raises(ValueError, match="latency"):
        schemas.NotSent(session_id="s", frame=1, rtp_ts=2, t_due_ns=3, reason="late",
                        latency="fast")  # fmt: skip


def test_several_results_of_one_session_travel_as_one_message() -> None:
    """``FrameResults``: decoded from the errors topic with each result validated, refused when a
    result is another session's or when it is empty or over the bound, and opened by
    ``results_in`` (which gives one for a ``FrameResult`` and none for other kinds)."""
    several = schemas.FrameResults(session_id="s-1", results=[error(frame=i) for i in range(3)])
    back = schemas.decode_errors_topic(schemas.encode(several))
    assert back == several and [r.frame for r in schemas.results_in(back)] == [0, 1, 2]
    assert schemas.results_in(error()) == [error()]
    end = schemas.SessionResults(session_id="s-1", frames_due=3, t_computed_ns=T0)
    assert schemas.results_in(end) == []
    with pytest.raises(SchemaError, match="session 's-2' in 's-1'"):
        schemas.build(schemas.FrameResults, session_id="s-1",
                      results=[error(), error(session_id="s-2")])  # fmt: skip
    with pytest.raises(SchemaError, match="length"):
        schemas.build(schemas.FrameResults, session_id="s-1", results=[])
    too_many = [error(frame=i) for i in range(schemas.MAX_RESULTS_PER_MESSAGE + 1)]
    with pytest.raises(SchemaError, match="length"):
        schemas.decode_errors_topic(
            schemas.encode(schemas.FrameResults(session_id="s-1", results=too_many))
        )
    bad = schemas.encode(several).replace(b'"l2":0.559', b'"l2":-1.0', 1)
    with pytest.raises(SchemaError, match="l2"):
        schemas.decode_errors_topic(bad)
