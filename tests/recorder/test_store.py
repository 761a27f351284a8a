"""A session's files for one type: data, rows, torn tails after a crash, the media file and the
summary at the end (real codecs; no broker)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from carom.channels import ChannelMessage
from carom_recorder.ledger import Ledger, Row
from carom_recorder.store import TypeFiles, read_chunks, read_duplicates, read_rows
from carom_runtime import media
from tests.recorder import records
from tests.runtime.test_media import h264_chunks


def write_all(files: TypeFiles, ledger: Ledger, msgs: list[ChannelMessage]) -> None:
    rows = []
    for i, m in enumerate(msgs):
        mid = f"1:{i}:-1:-1"
        ledger.admit(m.seq, mid)
        files.write_data(m)
        rows.append(Row.of(m, mid, m.t_published_ns + 1_000_000))
    files.sync_data()
    for row in rows:
        files.write_row(row)
        ledger.written(row)
    files.sync_rows()


def test_video_is_stored_then_muxed_and_summarized(tmp_path: Path) -> None:
    msgs = records.video("s1", records.vp8_chunks(20))
    files = TypeFiles(tmp_path, "s1", "camera", "video")
    ledger = Ledger("s1", "camera")
    write_all(files, ledger, msgs)
    files.write_duplicate(3, "1:99:-1:-1", 1)
    files.sync_rows()
    files.close()
    assert [f.seq for f in read_chunks(files.chunk_path)] == list(range(20))
    assert [r.seq for r in read_rows(files.csv_path)] == list(range(20))
    assert read_duplicates(files.dup_path) == [3]
    info = files.write_media()
    assert info is not None and info["file"] == "camera.webm", info
    assert info["decoded_frames"] == 20 and info["chunks"] == 20
    assert media.count_frames(tmp_path / "s1" / "camera.webm") == 20
    ledger.end = records.end_of(msgs)
    files.write_summary(ledger.summary(info))
    summary = json.loads(files.summary_path.read_text())
    assert summary["exactly_once"] and summary["received"] == 20
    assert summary["media"]["decoded_frames"] == 20


def test_h264_goes_to_matroska(tmp_path: Path) -> None:
    msgs = records.video("s1", h264_chunks(15), codec="h264")
    files = TypeFiles(tmp_path, "s1", "camera", "video")
    write_all(files, Ledger("s1", "camera"), msgs)
    info = files.write_media()
    assert info is not None and info["file"] == "camera.mkv" and info["decoded_frames"] == 15


def test_audio_goes_to_ogg(tmp_path: Path) -> None:
    msgs = records.audio("s1", records.opus_chunks(25))
    files = TypeFiles(tmp_path, "s1", "microphone", "audio")
    write_all(files, Ledger("s1", "microphone"), msgs)
    info = files.write_media()
    assert info is not None and info["file"] == "microphone.ogg"
    assert info["decoded_frames"] == len(msgs)


def test_a_chunk_stored_twice_is_muxed_once_in_seq_order(tmp_path: Path) -> None:
    # A crash between a chunk's data and its row: on redelivery the data is written again.
    msgs = records.video("s1", records.vp8_chunks(12))
    files = TypeFiles(tmp_path, "s1", "camera", "video")
    for m in [*msgs[:6], msgs[4], msgs[5], *msgs[6:]]:
        files.write_data(m)
    files.sync_data()
    info = files.write_media()
    assert info is not None and info["chunks"] == 12 and info["decoded_frames"] == 12


def test_undecodable_chunks_are_an_error_in_the_summary_not_a_crash(tmp_path: Path) -> None:
    msgs = [
        records.record(
            "s1",
            "camera",
            "video",
            i,
            b"\x00garbage",
            {"codec": "vp8", "key": True, "timestamp_us": i},
        )
        for i in range(3)
    ]
    files = TypeFiles(tmp_path, "s1", "camera", "video")
    write_all(files, Ledger("s1", "camera"), msgs)
    info = files.write_media()
    assert info is not None and info["error"] and info["file"] is None
    assert not list((tmp_path / "s1").glob(".*tmp*"))


def test_text_and_points(tmp_path: Path) -> None:
    texts = ["hello", "wörld ✓", 'quote " and, comma']
    files = TypeFiles(tmp_path, "s1", "chat", "text")
    write_all(files, Ledger("s1", "chat"), records.chat("s1", texts))
    lines = [json.loads(x) for x in (tmp_path / "s1" / "chat.jsonl").read_text().splitlines()]
    assert [x["text"] for x in lines] == texts and [x["seq"] for x in lines] == [0, 1, 2]
    assert files.write_media() is None
    cloud = records.points("s1", 2, count=500)
    files = TypeFiles(tmp_path, "s1", "points", "points")
    write_all(files, Ledger("s1", "points"), cloud)
    arrays = sorted((tmp_path / "s1" / "points").glob("*.npy"))
    assert [a.name for a in arrays] == ["000000000.npy", "000000001.npy"]
    got = np.load(arrays[1])
    assert got.shape == (500, 3) and got.dtype == np.dtype("<f4")
    assert got.tobytes() == cloud[1].payload


def test_torn_tails_are_cut_on_reopen(tmp_path: Path) -> None:
    msgs = records.video("s1", records.vp8_chunks(5))
    files = TypeFiles(tmp_path, "s1", "camera", "video")
    write_all(files, Ledger("s1", "camera"), msgs)
    files.close()
    whole_csv = files.csv_path.read_bytes()
    whole_chunks = files.chunk_path.read_bytes()
    with open(files.csv_path, "ab") as f:
        f.write(b"camera,5,12,1:5")  # a crash mid-row
    with open(files.chunk_path, "ab") as f:
        f.write(whole_chunks[:40])  # and mid-chunk
    again = TypeFiles(tmp_path, "s1", "camera", "video")
    rows, dups = again.load()
    assert [r.seq for r in rows] == [0, 1, 2, 3, 4] and dups == []
    assert files.csv_path.read_bytes() == whole_csv
    assert files.chunk_path.read_bytes() == whole_chunks
