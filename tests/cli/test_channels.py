"""``carom-channels``: each channel record decoded to a line (in memory), a session's video or
audio written to a playable file, and both commands as a user runs them against the broker."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import pulsar
import pytest
import yaml

from carom.channels import ChannelEnd, Record, encode_record
from carom_cli.main import (
    channel_line,
    load_routes,
    resolve_channel,
    session_chunks,
    write_media_file,
)
from carom_local.pulsar import Broker
from carom_runtime import media
from carom_runtime.pulsar_io import quiet_logger
from tests.recorder import records

ROOT = Path(__file__).resolve().parents[2]


def test_each_format_decodes_to_a_line() -> None:
    cam = records.record("s1", "camera", "video", 7, b"\x01" * 1234,
                         {"codec": "vp8", "key": True, "timestamp_us": 233333, "width": 640,
                          "height": 480})  # fmt: skip
    assert channel_line(cam) == "s1 camera #7 video: vp8 key 640x480 ts 233333 us, 1234 bytes"
    delta = records.record("s1", "camera", "video", 8, b"\x01", {"codec": "h264", "key": False,
                           "timestamp_us": 1})  # fmt: skip
    assert channel_line(delta) == "s1 camera #8 video: h264 delta ts 1 us, 1 bytes"
    mic = records.record("s1", "microphone", "audio", 1, b"\x01" * 90, {"codec": "opus",
                         "timestamp_us": 20000, "sample_rate": 48000, "channels": 2})  # fmt: skip
    assert channel_line(mic) == "s1 microphone #1 audio: opus 48000 Hz x2 ts 20000 us, 90 bytes"
    chat = records.chat("s1", ["", "héllo, world"])[1]
    assert channel_line(chat) == "s1 chat #1 text: héllo, world"
    cloud = records.points("s1", 1, count=1500)[0]
    assert channel_line(cloud) == "s1 points #0 points: shape (1500, 3), 18000 bytes"
    blob = records.record("s1", "blob", "bytes", 3, b"abc", {})
    assert channel_line(blob) == "s1 blob #3 bytes: 3 bytes"
    end = ChannelEnd(session_id="s1", type="chat", accepted=5, last_seq=6, refused=2,
                     refused_seqs=[2, 4], failed_seqs=[5], reason="bye")  # fmt: skip
    assert channel_line(end) == (
        "s1 chat end: accepted 5, last seq 6, refused 2, refused seqs [2, 4], failed seqs [5] (bye)"
    )


def test_channels_resolve_by_type_or_topic() -> None:
    routes = load_routes(str(ROOT / "router" / "routes.yaml"))
    camera = routes.routes["camera"].topic
    assert resolve_channel("camera", routes) == (camera, "camera")
    assert resolve_channel(camera, routes) == (camera, "camera")
    other = "persistent://public/default/elsewhere"
    assert resolve_channel(other, routes) == (other, None)
    with pytest.raises(ValueError, match="neither a type"):
        resolve_channel("camra", routes)
    with pytest.raises(ValueError, match="cannot read routes file"):
        load_routes("/nonexistent/routes.yaml")


def test_a_session_is_written_once_per_seq_in_order(tmp_path: Path) -> None:
    cam = records.video("s1", records.vp8_chunks(15))
    other = records.video("s2", records.vp8_chunks(3))
    mixed: list[Record] = [*cam[8:], *other, *cam[:8], cam[3], records.end_of(cam)]
    msgs, dups = session_chunks(mixed, "s1")
    assert [m.seq for m in msgs] == list(range(15)) and dups == 1
    said = write_media_file(msgs, str(tmp_path / "c.webm"), "unused")
    assert said == f"wrote {tmp_path / 'c.webm'}: 15 vp8 chunks, 15 frames decode"
    assert media.count_frames(tmp_path / "c.webm") == 15
    mic = records.audio("s1", records.opus_chunks(20))
    said = write_media_file(mic, None, str(tmp_path / "s1-microphone"))
    assert said.startswith(f"wrote {tmp_path / 's1-microphone.ogg'}: {len(mic)} opus chunks")
    assert media.count_frames(tmp_path / "s1-microphone.ogg", "audio") == len(mic)
    with pytest.raises(ValueError, match="no media file"):
        write_media_file(records.chat("s1", ["hi"]), None, str(tmp_path / "x"))
    with pytest.raises(ValueError, match="no messages"):
        write_media_file([], None, str(tmp_path / "x"))


def channels(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", "from carom_cli.main import channels_main; channels_main()", *args],
        capture_output=True, text=True, timeout=60, check=False, cwd=cwd, env=dict(os.environ),
    )  # fmt: skip


def test_read_and_save_against_the_broker(pulsar_broker: Broker, tmp_path: Path) -> None:
    tag = uuid.uuid4().hex[:10]
    topics = {
        "camera": f"persistent://public/default/test-ch-camera-{tag}",
        "chat": f"persistent://public/default/test-ch-chat-{tag}",
    }
    routes = tmp_path / "routes.yaml"
    routes.write_text(yaml.safe_dump({"routes": {
        "camera": {"topic": topics["camera"], "format": "video"},
        "chat": {"topic": topics["chat"], "format": "text"},
    }}))  # fmt: skip
    cam = records.video("s1", records.vp8_chunks(12))
    noise = records.video("s2", records.vp8_chunks(4))
    chat = records.chat("s1", ["hello", "bye"])
    client = pulsar.Client(pulsar_broker.service_url, logger=quiet_logger())
    try:
        cp = client.create_producer(topics["camera"], batching_enabled=False)
        sent: list[Record] = [*cam[:6], *noise, cam[2], *cam[6:], records.end_of(cam)]
        for r in sent:
            cp.send(encode_record(r), partition_key=r.session_id)
        tp = client.create_producer(topics["chat"], batching_enabled=False)
        said: list[Record] = [*chat, records.end_of(chat)]
        for r in said:
            tp.send(encode_record(r), partition_key=r.session_id)
        tp.send(b"not a record")
        tp.send(encode_record(records.chat("s1", ["after"])[0]))
    finally:
        client.close()
    common = ["--routes", str(routes), "--url", pulsar_broker.service_url]
    read = channels("read", "chat", *common, "-p", "earliest", "-n", "4", cwd=tmp_path)
    assert read.returncode == 0, read.stderr
    assert read.stdout.splitlines() == [
        "s1 chat #0 text: hello",
        "s1 chat #1 text: bye",
        "s1 chat end: accepted 2, last seq 1, refused 0 (bye)",
        "s1 chat #0 text: after",
    ]
    assert "not a channel record" in read.stderr and "4 messages read" in read.stderr
    only = channels("read", topics["camera"], *common, "-p", "earliest", "-n", "2",
                    "--session", "s2", cwd=tmp_path)  # fmt: skip
    assert only.returncode == 0, only.stderr
    assert [x.split(" video:")[0] for x in only.stdout.splitlines()] == ["s2 camera #0",
                                                                       "s2 camera #1"]  # fmt: skip
    save = channels("save", "camera", *common, "--session", "s1", cwd=tmp_path)
    assert save.returncode == 0, save.stderr
    assert save.stdout.strip() == "wrote s1-camera.webm: 12 vp8 chunks, 12 frames decode"
    assert "1 duplicate messages left out" in save.stderr
    assert media.count_frames(tmp_path / "s1-camera.webm") == 12
    none = channels("save", "camera", *common, "--session", "nobody", cwd=tmp_path)
    assert none.returncode == 1 and "no messages of that session" in none.stderr
