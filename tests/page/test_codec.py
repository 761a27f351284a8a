"""live_client.html's codec section against carom/protocol.py, byte for byte, in Node.

The page carries JavaScript copies of the contract: control-message framing, the report datagram
encoder, the live result decoder and their constants, and the builders of its ``control`` and
``stats`` messages from its inputs and from getStats. They sit in one fenced, self-contained
section of its script, which these tests cut out and run in Node (no broker, no browser), against
vectors that carom/protocol.py encodes or decodes here, plus a few fixed hex strings written
below, so that a change made to both sides at once still fails. The page's ``findBall`` (which
bench/floor.py copies out the same way) is run on synthetic frames against the Python detector,
which pins its threshold, and on frames whose size changes as a live control changes it. Node is
required: without it these tests fail, they never skip.
"""

from __future__ import annotations

import functools
import json
import shutil
import struct
import subprocess
from typing import Any, get_args

import msgspec
import numpy as np
import numpy.typing as npt
import pytest

from bench import floor
from carom import protocol as p
from carom import schemas
from carom.signaling import SessionControl, SessionParams, SessionState
from carom_client import centroid
from carom_router.session import Limits, PublishStats, RelayControl, SendControl, SessionCore

PAGE = floor.PAGE
BEGIN = "// ---- codec: mirrors carom/protocol.py (pinned by tests/page/test_codec.py) ----"
END = "// ---- end codec ----"
NODE_TIMEOUT_S = 30

# Runs the codec in a context of its own that has only the JavaScript built-ins and the two text
# codecs every browser has: a reference to the DOM or to the rest of the page fails there. Every
# op's value goes back as JSON; NaN, the infinities and undefined as the strings JS prints.
HARNESS = r"""
"use strict";
const vm = require("vm");
const input = JSON.parse(require("fs").readFileSync(0, "utf8"));
const codec = vm.runInContext(
  `"use strict";\n${input.codec}\n({ PROTOCOL_VERSION, KIND_REPORT, KIND_ERROR, FLAG_DETECTED,
     REPORT_BYTES, ERROR_BYTES, STATUSES, CONTROL_INPUTS, frameMessage, FrameReader, encodeReport,
     decodeResult, controlSet, controlMessage, statsMessage })`,
  vm.createContext({ TextEncoder, TextDecoder }), { filename: "live_client.html codec" });
const findBall = vm.runInContext(`"use strict";\n${input.findBall}\nfindBall`,
  vm.createContext({ carom: { centroidMs: [] }, performance }), { filename: "findBall" });
const hex = (u8) => Buffer.from(u8).toString("hex");
// At an odd offset in its buffer, as a datagram may be.
const bytes = (h) => new Uint8Array(Buffer.from("ff" + h, "hex")).subarray(1);
const num = (v) => (v === null ? NaN : v);
const videoFrame = ({ format, width, height, data, layout }) => {
  const src = bytes(data);
  return {
    format, codedWidth: width, codedHeight: height, visibleRect: { width, height },
    allocationSize: () => src.length,
    copyTo: async (dst) => { dst.set(src); return layout; },
  };
};
const read = (chunks) => {
  const r = new codec.FrameReader(), frames = [];
  for (const c of chunks) frames.push(...r.feed(bytes(c)));
  return { frames, pending: r.buf.length };
};
const ops = {
  consts: () =>
    Object.fromEntries(Object.entries(codec).filter(([, v]) => typeof v !== "function")),
  encodeReport: ([seq, rtp, ball, tRecv, tAn]) =>
    hex(codec.encodeReport(seq, rtp, ball && ball.map(num), num(tRecv), num(tAn))),
  decodeResult: (h) => codec.decodeResult(bytes(h)),
  frame: (msg) => hex(codec.frameMessage(msg)),
  read,
  // The stream cut at every byte: [frames, bytes pending] after the first part, frames in all.
  cuts: (h) => {
    const out = [];
    for (let k = 0; k <= h.length / 2; k++) {
      const first = read([h.slice(0, 2 * k)]), both = read([h.slice(0, 2 * k), h.slice(2 * k)]);
      out.push([first.frames.length, first.pending, both.frames.length]);
    }
    return out;
  },
  findBall: (frame) => findBall(videoFrame(frame), {}),
  // One after another with one scratch buffer, as the page reads a stream whose size changes.
  findBalls: async (frames) => {
    const scratch = {}, out = [];
    for (const f of frames) out.push(await findBall(videoFrame(f), scratch));
    return out;
  },
  // The control frame the page sends for these inputs, or the error it shows instead.
  control: ([id, inputs]) => {
    const r = codec.controlSet(inputs);
    return r.error ? { error: r.error } : hex(codec.frameMessage(codec.controlMessage(id, r.set)));
  },
  stats: ([inbound, name]) => hex(codec.frameMessage(codec.statsMessage(inbound, name))),
};
(async () => {
  const out = [];
  for (const [op, arg] of input.ops) {
    try {
      out.push(await ops[op](arg));
    } catch (e) {
      out.push({ thrown: `${e.name}: ${e.message}` });
    }
  }
  process.stdout.write(JSON.stringify(out, (k, v) =>
    v === undefined || (typeof v === "number" && !Number.isFinite(v)) ? String(v) : v));
})();
"""


@functools.cache
def page_sources() -> tuple[str, str]:
    """The codec section and ``findBall``, as live_client.html has them now."""
    page = PAGE.read_text(encoding="utf-8")
    assert page.count(BEGIN) == 1 and page.count(END) == 1, (
        f"live_client.html must hold exactly one codec section, from {BEGIN!r} to {END!r}"
    )
    start, end = page.index(BEGIN), page.index(END)
    assert start < end, "the codec section's end marker comes before its start"
    return page[start : end + len(END)], floor.find_ball_js(page)


def run_js(*ops: tuple[str, Any]) -> list[Any]:
    """Each op's result from the page's code in Node, in order."""
    node = shutil.which("node")
    if node is None:
        pytest.fail(
            "node is not on PATH: tests/page/test_codec.py runs live_client.html's codec in "
            "Node.js. local/bootstrap installs Debian's nodejs (apt-get install nodejs).",
            pytrace=False,
        )
    codec, find_ball = page_sources()
    payload = json.dumps({"codec": codec, "findBall": find_ball, "ops": ops}, allow_nan=False)
    proc = subprocess.run(
        [node, "-e", HARNESS],
        input=payload,
        capture_output=True,
        text=True,
        timeout=NODE_TIMEOUT_S,
        check=False,
    )
    assert proc.returncode == 0, f"node exited {proc.returncode}: {proc.stderr.strip()}"
    out: list[Any] = json.loads(proc.stdout)
    return out


def js_float(v: Any) -> float | None:
    """A number from the page: NaN is Python's None (unknown), as in the decoders."""
    return None if v == "NaN" else float(v)


def assert_same_bytes(js_hex: str, py: bytes, what: str) -> None:
    js = bytes.fromhex(js_hex)
    if js != py:
        at = next((i for i, (a, b) in enumerate(zip(js, py, strict=False)) if a != b), None)
        where = f"byte {at}" if at is not None else f"length {len(js)} vs {len(py)}"
        raise AssertionError(f"{what}: page and carom/protocol.py differ at {where}:\n"
                             f"  page   {js.hex()}\n  python {py.hex()}")  # fmt: skip


#: The page's live result fields and LiveResult's names for them.
RESULT_FIELDS = {
    "status": "status", "rtp": "rtp_ts", "frame": "frame", "tx": "truth_x", "ty": "truth_y",
    "x": "x", "y": "y", "l2": "l2", "e2e": "render_to_router_ms", "total": "render_to_computed_ms",
}  # fmt: skip


def assert_same_result(js: dict[str, Any] | None, py: p.LiveResult, what: str) -> None:
    if js is None:
        raise AssertionError(f"{what}: the page drops a datagram Python decodes as {py}")
    assert set(js) == set(RESULT_FIELDS), f"{what}: the page's fields are {sorted(js)}"
    got = {
        name: js[key] if key in ("status", "rtp", "frame") else js_float(js[key])
        for key, name in RESULT_FIELDS.items()
    }
    want = {name: getattr(py, name) for name in RESULT_FIELDS.values()}
    if got != want:
        raise AssertionError(f"{what}: page decoded {got}, carom/protocol.py {want}")


def f32(v: float) -> float:
    (out,) = struct.unpack(">f", struct.pack(">f", v))
    return float(out)


T0_NS = 1_767_225_600_000_000_000


def frame_result(status: schemas.Status, **fields: Any) -> schemas.FrameResult:
    base: dict[str, Any] = {
        "session_id": "page-1a2b3c4d", "frame": 41, "rtp_ts": 3_690_000, "status": status,
        "truth_x": 320.5, "truth_y": 240.25, "t_render_ns": T0_NS,
        "t_router_recv_ns": T0_NS + 4_500_000, "t_computed_ns": T0_NS + 6_250_000,
    }  # fmt: skip
    if status == "ok":
        base |= {"x": 321.0, "y": 240.0, "l2": 0.5590169943749475}
    if status == "not_sent":
        base |= {"truth_x": None, "truth_y": None, "t_router_recv_ns": None}
    return schemas.FrameResult(**(base | fields))


# --- constants ------------------------------------------------------------------------------------


def test_constants_equal_python() -> None:
    (consts,) = run_js(("consts", None))
    # The status codes as encode_result writes them, for every status a result can have.
    codes = {s: p.encode_result(frame_result(s))[2] for s in get_args(schemas.Status)}
    assert sorted(codes.values()) == list(range(len(codes))), "status codes must index a list"
    python = {
        "PROTOCOL_VERSION": p.PROTOCOL_VERSION, "KIND_REPORT": p.KIND_REPORT,
        "KIND_ERROR": p.KIND_ERROR, "FLAG_DETECTED": p.FLAG_DETECTED,
        "REPORT_BYTES": p.REPORT.size, "ERROR_BYTES": p.ERROR.size,
        "STATUSES": sorted(codes, key=codes.__getitem__),
    }  # fmt: skip
    kinds = consts.pop("CONTROL_INPUTS")
    # Every setting a control can change has its input; ``state`` is Stop and Resume, and
    # ``network`` the picker (a profile, not a text: its own change handler).
    assert set(kinds) == set(SessionControl.__struct_fields__) - {"state", "network"}
    assert kinds == {
        "fps": "number", "width": "integer", "height": "integer", "bitrate": "kbps",
        "keyframe_interval": "integer", "gravity": "number", "vx": "number", "vy": "number",
        "cor": "number", "background": "text", "latency": "text",
    }  # fmt: skip
    assert consts == python
    # Written down: changing the protocol means changing this test too.
    assert consts == {
        "PROTOCOL_VERSION": 1, "KIND_REPORT": 1, "KIND_ERROR": 2, "FLAG_DETECTED": 1,
        "REPORT_BYTES": 36, "ERROR_BYTES": 40,
        "STATUSES": ["ok", "not_detected", "missed", "not_sent"],
    }  # fmt: skip


def test_find_ball_threshold_and_weights_equal_the_python_detector() -> None:
    """findBall (I420 and NV12, padded rows) against centroid_v_plane, to the last bit."""
    t = centroid.V_THRESHOLD
    rng = np.random.default_rng(15)
    planes: dict[str, npt.NDArray[np.uint8]] = {
        "background": np.full((24, 32), 128, np.uint8),
        "only the threshold": np.full((24, 32), t, np.uint8),
        "one sample above it": np.full((24, 32), t, np.uint8),
        "a ball with a rim": np.full((24, 32), 128, np.uint8),
        "noise": rng.integers(0, 256, (24, 32), dtype=np.uint8),
    }
    planes["one sample above it"][7, 19] = t + 1
    ball = planes["a ball with a rim"]
    ball[5:12, 9:17] = 255
    ball[4, 9:17], ball[12, 9:17], ball[5:12, 8], ball[5:12, 17] = t + 1, t, t - 1, 200
    ops: list[tuple[str, Any]] = []
    for v in planes.values():
        ops += [("findBall", _i420(v)), ("findBall", _nv12(v))]
    got = run_js(*ops)
    for i, (name, v) in enumerate(planes.items()):
        want = centroid.centroid_v_plane(v)
        expected = None if want is None else list(want)
        assert got[2 * i] == expected, f"{name}, I420: page {got[2 * i]}, Python {expected}"
        assert got[2 * i + 1] == expected, f"{name}, NV12: page {got[2 * i + 1]}, Python {expected}"
    assert got[2:4] == [None, None] and got[4] == [2 * 19 + 1, 2 * 7 + 1]


PAD = 8  # bytes past each row, filled with 255 so that reading them would move the ball


def _i420(v: npt.NDArray[np.uint8]) -> dict[str, Any]:
    ch, cw = v.shape
    y = np.zeros((2 * ch, 2 * cw + PAD), np.uint8)
    u = np.full((ch, cw + PAD), 255, np.uint8)
    vv = np.full((ch, cw + PAD), 255, np.uint8)
    vv[:, :cw] = v
    layout = [
        {"offset": 0, "stride": y.shape[1]},
        {"offset": y.size, "stride": cw + PAD},
        {"offset": y.size + u.size, "stride": cw + PAD},
    ]
    data = y.tobytes() + u.tobytes() + vv.tobytes()
    return {"format": "I420", "width": 2 * cw, "height": 2 * ch, "data": data.hex(),
            "layout": layout}  # fmt: skip


def _nv12(v: npt.NDArray[np.uint8]) -> dict[str, Any]:
    ch, cw = v.shape
    y = np.zeros((2 * ch, 2 * cw + PAD), np.uint8)
    uv = np.full((ch, 2 * cw + PAD), 255, np.uint8)
    uv[:, 1 : 2 * cw : 2] = v
    layout = [{"offset": 0, "stride": y.shape[1]}, {"offset": y.size, "stride": uv.shape[1]}]
    return {"format": "NV12", "width": 2 * cw, "height": 2 * ch,
            "data": (y.tobytes() + uv.tobytes()).hex(), "layout": layout}  # fmt: skip


# --- report datagram (page -> router) -------------------------------------------------------------

T_MS = 1_767_225_600_123.25
#: (seq, rtp_ts, centroid, t_recv_ms, t_analysed_ms), as encode_report takes them.
REPORTS: list[tuple[int, int, tuple[float, float] | None, float | None, float | None]] = [
    (0, 0, None, None, None),
    (1, 2**32 - 1, (0.0, 0.0), T_MS, T_MS + 1.5),
    (2, 90_000, None, T_MS, T_MS + 0.001),
    (3, 123_456_789, (320.5, 240.25), None, T_MS),
    (4, 7, (1 / 3, 639.9999999), T_MS, None),
    (5, 8, (0.1, 8191.99999), 1.0, 99_999_999_999_999.98),
    (6, 9, (8192.0, 1e-30), T_MS, T_MS),
    (2**32 + 5, 10, (12.0, 34.0), T_MS, T_MS),  # seq wraps at 2**32
    (2**40 + 3, 11, None, T_MS, T_MS),
]
#: encode_report(7, 90000, (320.5, 240.25), 1767225600123.25, 1767225600125.5), written down.
FIXED_REPORT = "010100010000000700015f9043a04000437040004279b76daa87b4004279b76daa87d800"


def test_report_encoder_equals_python_and_decodes_back() -> None:
    fixed = (7, 90_000, (320.5, 240.25), T_MS, T_MS + 2.25)
    got = run_js(*(("encodeReport", v) for v in [*REPORTS, fixed]))
    for v, js in zip(REPORTS, got, strict=False):
        seq, rtp, ball, t_recv, t_an = v
        assert_same_bytes(js, p.encode_report(*v), f"report {v}")
        back = p.decode_report(bytes.fromhex(js))
        assert back == p.Report(
            seq & 0xFFFFFFFF, rtp, ball is not None,
            None if ball is None else f32(ball[0]), None if ball is None else f32(ball[1]),
            t_recv, t_an,
        )  # fmt: skip
    assert got[-1] == FIXED_REPORT
    assert p.encode_report(*fixed).hex() == FIXED_REPORT


def test_reports_the_router_rejects_are_rejected_whoever_encodes_them() -> None:
    """A position or time the page could get wrong: the same bytes from either side, refused."""
    nan = float("nan")
    bad: list[tuple[tuple[float, float] | None, float | None, str]] = [
        ((-0.5, 10.0), T_MS, "range"),
        ((10.0, 8192.5), T_MS, "range"),
        ((nan, 10.0), T_MS, "nan"),
        ((10.0, 10.0), 0.0, "time"),
        ((10.0, 10.0), -T_MS, "time"),
        (None, 1e14, "time"),
    ]
    # JSON has no NaN: null stands for it on the way to the page (see HARNESS).
    js_args = [
        [1, 2, ball and [None if x != x else x for x in ball], t, T_MS] for ball, t, _ in bad
    ]
    got = run_js(*(("encodeReport", args) for args in js_args))
    for (ball, t, code), js in zip(bad, got, strict=True):
        assert_same_bytes(js, p.encode_report(1, 2, ball, t, T_MS), f"report {ball} {t}")
        with pytest.raises(p.ProtocolError) as exc:
            p.decode_report(bytes.fromhex(js))
        assert exc.value.code == code, f"report {ball} {t}"


# --- live result datagram (router -> page) --------------------------------------------------------

#: Every status, with and without each optional value (None is NaN on the wire).
RESULTS: list[schemas.FrameResult] = [
    frame_result("ok"),
    frame_result("ok", frame=2**32 + 41, rtp_ts=2**32 - 1, l2=0.0, x=320.5, y=240.25),
    frame_result("ok", x=1 / 3, y=8192.0, truth_x=0.0, truth_y=1e-30, l2=16384.0),
    frame_result("ok", t_router_recv_ns=T0_NS - 250_000),  # router clock behind: negative hop
    frame_result("ok", t_router_recv_ns=None, t_computed_ns=T0_NS + 1),
    frame_result("not_detected"),
    frame_result("not_detected", t_router_recv_ns=None),
    frame_result("missed", t_router_recv_ns=None),
    frame_result("missed", frame=0, rtp_ts=0),
    frame_result("not_sent"),
]
#: encode_result(frame_result("ok", l2=0.5)), written down, and what it decodes to.
FIXED_RESULT = "0102000000384e100000002943a040004370400043a08000437000003f0000004090000040c80000"
FIXED_FIELDS = {
    "status": "ok", "rtp": 3_690_000, "frame": 41, "tx": 320.5, "ty": 240.25, "x": 321.0,
    "y": 240.0, "l2": 0.5, "e2e": 4.5, "total": 6.25,
}  # fmt: skip


def test_result_decoder_equals_python_for_every_status() -> None:
    assert {r.status for r in RESULTS} == set(get_args(schemas.Status))
    datagrams = [p.encode_result(r) for r in RESULTS]
    datagrams.append(bytes.fromhex(FIXED_RESULT)[:3] + b"\x7f" + bytes.fromhex(FIXED_RESULT)[4:])
    got = run_js(*(("decodeResult", d.hex()) for d in datagrams), ("decodeResult", FIXED_RESULT))
    for d, js in zip(datagrams, got, strict=False):
        assert_same_result(js, p.decode_result(d), f"result {d.hex()}")
    for r, js in zip(RESULTS, got, strict=False):
        assert (js["status"], js["frame"], js["rtp"]) == (r.status, r.frame & 0xFFFFFFFF, r.rtp_ts)
        assert (js["tx"] == "NaN") == (r.truth_x is None) and (js["l2"] == "NaN") == (r.l2 is None)
    assert got[-1] == FIXED_FIELDS
    assert p.encode_result(frame_result("ok", l2=0.5)).hex() == FIXED_RESULT


def test_bad_result_datagrams_are_rejected_by_both() -> None:
    good = bytes.fromhex(FIXED_RESULT)
    dropped = {  # the page ignores these datagrams (decodeResult gives null)
        "empty": b"",
        "one byte short": good[:-1],
        "one byte long": good + b"\x00",
        "a report's size": good[: p.REPORT.size],
        "version 0": b"\x00" + good[1:],
        "version 2": b"\x02" + good[1:],
        "kind report": good[:1] + bytes([p.KIND_REPORT]) + good[2:],
        "kind 3": good[:1] + b"\x03" + good[2:],
    }
    unknown = {f"status {s}": good[:2] + bytes([s]) + good[3:] for s in (4, 255)}
    got = run_js(*(("decodeResult", d.hex()) for d in [*dropped.values(), *unknown.values()]))
    for (name, d), js in zip([*dropped.items(), *unknown.items()], got, strict=True):
        with pytest.raises(p.ProtocolError, match=r"not an error datagram|unknown status"):
            p.decode_result(d)
        if name in dropped:
            assert js is None, f"{name}: the page decoded {js}"
        else:  # decoded, but with no status: the page counts it received and uses none of it
            assert js is not None and js["status"] == "undefined", f"{name}: {js}"


# --- control frames -------------------------------------------------------------------------------

SDP = "v=0\r\no=- 4611731400430051336 2 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\n"
#: What the page sends, built as the page builds it, and what the router must read from it.
PAGE_MESSAGES: list[tuple[dict[str, Any], p.ClientMessage]] = [
    (
        {"type": "hello", "session_id": "page-1a2b3c4d", "protocol": 1,
         "params": {"fps": 60, "gravity": 0, "vx": 1000, "vy": -250.5, "cor": 0.9,
                    "latency": "interactive"},
         "client": "chromium-page"},
        p.Hello(session_id="page-1a2b3c4d", client="chromium-page",
                params=SessionParams(fps=60, gravity=0, vx=1000, vy=-250.5, cor=0.9,
                                     latency="interactive")),
    ),
    (
        {"type": "hello", "session_id": "page-5e6f7a8b", "protocol": 1, "params": {},
         "client": "pâge ✓ 🎱"},
        p.Hello(session_id="page-5e6f7a8b", client="pâge ✓ 🎱"),
    ),
    ({"type": "offer", "sdp": SDP}, p.Offer(sdp=SDP)),
    ({"type": "pong", "id": 7, "t_client_ms": T_MS}, p.Pong(id=7, t_client_ms=T_MS)),
    (
        {"type": "stats", "fps": 59.94, "jitter_buffer_ms": None, "decode_ms": 1.25,
         "frames_decoded": 1200, "frames_dropped": 0, "codec": "H264", "frames_received": 1201,
         "freeze_count": 1, "freezes_ms": 212.5, "bytes_received": 987_654, "width": 640,
         "height": 480, "jitter_buffer_delay_s": 8.4, "jitter_buffer_emitted": 1200},
        p.BrowserStats(fps=59.94, decode_ms=1.25, frames_decoded=1200, frames_dropped=0,
                       codec="H264", frames_received=1201, freeze_count=1, freezes_ms=212.5,
                       bytes_received=987_654, width=640, height=480,
                       jitter_buffer_delay_s=8.4, jitter_buffer_emitted=1200),
    ),
    (
        {"type": "control", "id": 3, "set": {"state": "stopped"}},
        p.Control(id=3, set=SessionControl(state="stopped")),
    ),
    ({"type": "bye"}, p.Bye()),
]  # fmt: skip
#: frame(Bye()), written down.
FIXED_BYE = "0000000e7b2274797065223a22627965227d"


def test_page_frames_are_read_by_the_router() -> None:
    got = run_js(*(("frame", msg) for msg, _ in PAGE_MESSAGES), ("frame", {"type": "bye"}))
    stream = b"".join(bytes.fromhex(h) for h in got[:-1])
    for chunk in (len(stream), 7, 1):  # whole, in pieces, byte by byte
        reader = p.FrameReader()
        bodies = [
            b for i in range(0, len(stream), chunk) for b in reader.feed(stream[i : i + chunk])
        ]
        assert [p.parse_client(b) for b in bodies] == [want for _, want in PAGE_MESSAGES]
        assert reader.pending == 0
    # To the byte: the page writes the fields in msgspec's order, the length in UTF-8 bytes.
    for (msg, want), js in zip(PAGE_MESSAGES, got, strict=False):
        assert_same_bytes(js, p.frame(want), f"{msg['type']} frame")
    assert got[-1] == FIXED_BYE and p.frame(p.Bye()).hex() == FIXED_BYE


ROUTER_MESSAGES: list[p.RouterMessage] = [
    p.Welcome(session_id="page-1a2b3c4d", max_report_rate=240.0),
    p.Ping(id=5, t_server_ns=T0_NS + 123_456_789),
    p.ClockEstimate(offset_ms=-0.25, rtt_ms=0.53),
    p.Answer(sdp=SDP, codec="H264",
             params=SessionParams(fps=60, width=640, height=480, latency="smooth")),
    p.Status(state="degraded", part="broker", detail="the Pulsar broker is unreachable — ✓"),
    p.Status(state="recovered", part="tracker"),
    p.Error(code="simulator_400", message="the offer cannot receive H264 video"),
    p.Error(code="too_many_errors", message="closed", fatal=True),
    p.End(complete=True, frames_due=600),
    p.End(complete=False, reason="peer failed"),
    p.ControlAck(id=3, ok=True, state="stopped", phase=2,
                 params=SessionParams(fps=30, width=320, height=240, bitrate=300_000)),
    p.ControlAck(id=4, ok=False, error="busy: control 3 is still in flight; wait for its ack"),
]  # fmt: skip


def _as_js(v: Any) -> Any:
    """What JSON.parse makes of ``v``: every number a double."""
    if isinstance(v, dict):
        return {k: _as_js(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_as_js(x) for x in v]
    return float(v) if isinstance(v, int | float) and not isinstance(v, bool) else v


def test_router_frames_are_read_by_the_page() -> None:
    stream = b"".join(p.frame(m) for m in ROUTER_MESSAGES)
    h = stream.hex()
    whole, pieces, bytewise, cuts = run_js(
        ("read", [h]),
        ("read", [h[i : i + 14] for i in range(0, len(h), 14)]),
        ("read", [h[i : i + 2] for i in range(0, len(h), 2)]),
        ("cuts", h),
    )
    want = [_as_js(msgspec.to_builtins(m)) for m in ROUTER_MESSAGES]
    for got in (whole, pieces, bytewise):
        assert [_as_js(m) for m in got["frames"]] == want and got["pending"] == 0
    # Cut anywhere, the page holds back what carom/protocol.py's FrameReader holds back.
    py_cuts = []
    for k in range(len(stream) + 1):
        reader = p.FrameReader()
        first = reader.feed(stream[:k])
        py_cuts.append([len(first), reader.pending, len(first) + len(reader.feed(stream[k:]))])
    assert cuts == py_cuts


def test_bad_control_frames_are_rejected_by_both() -> None:
    bodies = [b"not json", b'{"type":"end","complete":true', b"", b'{"type":"end"}}']
    got = run_js(*(("read", [(struct.pack(">I", len(b)) + b).hex()]) for b in bodies))
    for body, js in zip(bodies, got, strict=True):
        assert list(js) == ["thrown"] and js["thrown"].startswith("SyntaxError"), (body, js)
        (read,) = p.FrameReader().feed(struct.pack(">I", len(body)) + body)
        with pytest.raises(p.ProtocolError):
            p.parse_router(read)


# --- the comparisons themselves -------------------------------------------------------------------


def _flip(data: bytes, i: int) -> bytes:
    return data[:i] + bytes([data[i] ^ 0x01]) + data[i + 1 :]


def test_one_byte_changed_fails_the_comparison() -> None:
    report = bytes.fromhex(FIXED_REPORT)
    for i in range(len(report)):
        with pytest.raises(AssertionError, match=f"differ at byte {i}:"):
            assert_same_bytes(_flip(report, i).hex(), report, "self-test")
    with pytest.raises(AssertionError, match="differ at length"):
        assert_same_bytes(FIXED_REPORT + "00", report, "self-test")
    # A result datagram with any one byte changed: the page's reading of it is not Python's
    # reading of the original, except for the padding byte, which both ignore.
    result = bytes.fromhex(FIXED_RESULT)
    got = run_js(*(("decodeResult", _flip(result, i).hex()) for i in range(len(result))))
    assert len(got) == p.ERROR.size
    for i, js in enumerate(got):
        if i == 3:
            assert_same_result(js, p.decode_result(result), "padding")
            continue
        with pytest.raises(AssertionError):
            assert_same_result(js, p.decode_result(result), f"byte {i} changed")


def test_find_ball_follows_a_change_of_frame_size_mid_stream() -> None:
    """One scratch buffer for frames of 3 sizes in turn (a live control changed width and
    height): each frame is read at its own size and layout, none at the last one's."""
    frames, want = [], []
    for ch, cw, row, col in [(24, 32, 7, 19), (8, 10, 2, 3), (60, 90, 41, 77), (24, 32, 20, 5)]:
        v = np.full((ch, cw), 128, np.uint8)
        v[row, col] = 255
        frames += [_i420(v), _nv12(v)]
        want += [list(centroid.centroid_v_plane(v) or ())] * 2
    (got,) = run_js(("findBalls", frames))
    assert got == want and got[0] == [2 * 19 + 1, 2 * 7 + 1] and got[4] == [155, 83]


# --- live control and stats (page -> router) ------------------------------------------------------

#: The page's inputs (their text, as typed) and the control the router must read from them.
CONTROLS: list[tuple[dict[str, str], SessionControl]] = [
    ({"fps": "30"}, SessionControl(fps=30)),
    ({"width": "1280", "height": " 720 "}, SessionControl(width=1280, height=720)),
    ({"bitrate": "1500"}, SessionControl(bitrate=1_500_000)),  # typed in kbps, sent in bits/s
    ({"bitrate": "0"}, SessionControl(bitrate=0)),  # 0: the encoder's own
    ({"bitrate": "62.5"}, SessionControl(bitrate=62_500)),
    ({"keyframe_interval": "60"}, SessionControl(keyframe_interval=60)),
    ({"background": "warm"}, SessionControl(background="warm")),
    ({"latency": "interactive"}, SessionControl(latency="interactive")),
    ({"latency": "0-100"}, SessionControl(latency="0-100")),
    ({"gravity": "-980.5", "vx": "0", "vy": "-1e3", "cor": "0.9"},
     SessionControl(gravity=-980.5, vx=0, vy=-1000, cor=0.9)),
    ({"fps": "60", "width": "320", "height": "240", "bitrate": "300", "keyframe_interval": "0",
      "gravity": "0", "vx": "400", "vy": "250", "cor": "1", "background": "texture"},
     SessionControl(fps=60, width=320, height=240, bitrate=300_000, keyframe_interval=0,
                    gravity=0, vx=400, vy=250, cor=1, background="texture")),
]  # fmt: skip


def test_control_messages_built_from_the_inputs_are_read_by_the_router() -> None:
    ops = [("control", [i, inputs]) for i, (inputs, _) in enumerate(CONTROLS)]
    ops.append(("control", [0, {}]))  # Stop and Resume go the same way
    got = run_js(*ops)
    for i, ((inputs, want), js) in enumerate(zip(CONTROLS, got, strict=False)):
        (body,) = p.FrameReader().feed(bytes.fromhex(js))
        assert p.parse_client(body) == p.Control(id=i, set=want), inputs
    (body,) = p.FrameReader().feed(bytes.fromhex(got[-1]))
    assert p.parse_client(body) == p.Control(id=0, set=SessionControl())


def test_inputs_that_are_no_value_are_refused_by_the_page_naming_them() -> None:
    bad = {
        "fps: not a number": {"fps": "abc"},
        "vx: not a number": {"vx": ""},
        "width: a whole number is needed": {"width": "640.5"},
        "keyframe_interval: a whole number is needed": {"keyframe_interval": "1.5"},
        "background: empty": {"background": "  "},
        "radius: not a setting of the stream": {"radius": "5"},
    }
    got = run_js(*(("control", [1, inputs]) for inputs in bad.values()))
    assert got == [{"error": e} for e in bad]


def test_values_out_of_range_go_out_and_the_routers_ack_names_the_field() -> None:
    """The page keeps no copy of the ranges: the router refuses them, naming the field."""
    cases = {"fps": "500", "width": "641", "cor": "0", "bitrate": "10", "background": "Warm"}
    got = run_js(*(("control", [i, {k: v}]) for i, (k, v) in enumerate(cases.items())))
    core = SessionCore(Limits(), created_ns=T0_NS)
    core.control(p.frame(p.Hello(session_id="page-1a2b3c4d")), T0_NS)
    core.control(p.frame(p.Offer(sdp=SDP)), T0_NS)
    core.relay_done("v=0 answer", "H264", SessionParams())
    for i, (name, js) in enumerate(zip(cases, got, strict=True)):
        acts = core.control(bytes.fromhex(js), T0_NS + i)
        assert not any(isinstance(a, RelayControl) for a in acts)
        (send,) = acts
        assert isinstance(send, SendControl)
        ack = p.parse_router(p.FrameReader().feed(send.data)[0])
        assert isinstance(ack, p.ControlAck) and ack.id == i and not ack.ok
        assert ack.error.startswith(f"{name}: "), ack
    # And one in range goes to the simulator; its state comes back as the page reads it.
    (ok,) = run_js(("control", [9, {"fps": "24"}]))
    (relay,) = core.control(bytes.fromhex(ok), T0_NS + 10)
    assert relay == RelayControl("page-1a2b3c4d", 9, SessionControl(fps=24))
    state = SessionState(session_id="page-1a2b3c4d", state="streaming", phase=1,
                         params=SessionParams(fps=24))  # fmt: skip
    (send,) = core.control_done(9, state)
    assert isinstance(send, SendControl)
    (read,) = run_js(("read", [send.data.hex()]))
    assert read["frames"] == [{"type": "control_ack", "id": 9, "ok": True, "state": "streaming",
                               "phase": 1, "params": {"fps": 24.0}, "error": "",
                               "warning": ""}]  # fmt: skip


#: getStats' inbound-rtp video records (Chromium's field names), as the page reads them.
INBOUND: list[dict[str, Any]] = [
    {"framesPerSecond": 29.97, "jitterBufferDelay": 4.2, "jitterBufferEmittedCount": 600,
     "framesDecoded": 600, "totalDecodeTime": 0.75, "framesDropped": 1, "framesReceived": 601,
     "freezeCount": 2, "totalFreezesDuration": 0.345, "bytesReceived": 1_234_567,
     "frameWidth": 1280, "frameHeight": 720, "codecId": "CIT01_102", "kind": "video"},
    {},  # nothing yet: every field null
    {"framesReceived": 0, "framesDecoded": 0, "frameWidth": 0, "frameHeight": 0,
     "jitterBufferEmittedCount": 0, "jitterBufferDelay": 0},  # no frame yet: no size, no means
]  # fmt: skip


def _python_stats(inbound: dict[str, Any], codec: str) -> p.BrowserStats:
    """What the page must send for ``inbound``, computed here the way the page's comments say."""
    emitted, decoded = inbound.get("jitterBufferEmittedCount"), inbound.get("framesDecoded")
    freezes, w, h = (inbound.get(k) for k in ("totalFreezesDuration", "frameWidth", "frameHeight"))
    return p.BrowserStats(
        fps=inbound.get("framesPerSecond"),
        jitter_buffer_ms=1000 * inbound["jitterBufferDelay"] / emitted if emitted else None,
        decode_ms=1000 * inbound["totalDecodeTime"] / decoded if decoded else None,
        frames_decoded=decoded, frames_dropped=inbound.get("framesDropped"),
        codec=codec or None, frames_received=inbound.get("framesReceived"),
        freeze_count=inbound.get("freezeCount"),
        freezes_ms=None if freezes is None else 1000 * freezes,
        bytes_received=inbound.get("bytesReceived"),
        width=w or None, height=h or None,
        jitter_buffer_delay_s=inbound.get("jitterBufferDelay"), jitter_buffer_emitted=emitted,
    )  # fmt: skip


def test_stats_messages_built_from_get_stats_are_read_by_the_router() -> None:
    ops = [("stats", [inbound, "H264" if i == 0 else ""]) for i, inbound in enumerate(INBOUND)]
    got = run_js(*ops)
    for i, (inbound, js) in enumerate(zip(INBOUND, got, strict=True)):
        (body,) = p.FrameReader().feed(bytes.fromhex(js))
        msg = p.parse_client(body)
        assert msg == _python_stats(inbound, "H264" if i == 0 else ""), inbound
    first = p.parse_client(p.FrameReader().feed(bytes.fromhex(got[0]))[0])
    assert isinstance(first, p.BrowserStats)
    assert (first.freezes_ms, first.width, first.height) == (345.0, 1280, 720)
    assert first.frames_received == 601 and first.bytes_received == 1_234_567
    # The router publishes each one as it is, beside the session's reports.
    core = SessionCore(Limits(), created_ns=T0_NS)
    core.control(p.frame(p.Hello(session_id="page-1a2b3c4d")), T0_NS)
    (pub,) = core.control(bytes.fromhex(got[0]), T0_NS + 1)
    assert isinstance(pub, PublishStats)
    assert schemas.decode_centroid_topic(schemas.encode(pub.message)) == schemas.ClientStats(
        session_id="page-1a2b3c4d", t_router_recv_ns=T0_NS + 1,
        **msgspec.structs.asdict(first),
    )  # fmt: skip
