"""TensorBoard event files written without TensorFlow: CRC-32C, framing, round trip, TB reads."""

from __future__ import annotations

import os
import re
import socket
import struct
import time

import numpy as np
import pytest

from apart_jax.summary import (
    FILE_VERSION,
    SummaryWriter,
    crc32c,
    file_version_event,
    frame_record,
    masked_crc32c,
    read_scalars,
    scalars_event,
)

# (tag, value, step) in write order; values not representable in float32 are rounded.
WRITES = [
    ("train/loss", 2.302585093, 0),
    ("eval/clean_acc", 0.1, 1),
    ("eval/clean_acc", 0.9133333333, 2),
    ("eval/pgd20_acc", 1e-8, 2),
    ("train/loss", -7.25, 3),
    ("train/loss", 1e39, 4),  # beyond float32: +inf
]


def f32(value: float) -> float:
    """``value`` rounded to float32 (to +-inf beyond its range)."""
    with np.errstate(over="ignore"):
        return float(np.float32(value))


def expected_scalars() -> dict[str, list[tuple[int, float]]]:
    expected: dict[str, list[tuple[int, float]]] = {}
    for tag, value, step in WRITES:
        expected.setdefault(tag, []).append((step, f32(value)))
    return expected


@pytest.fixture
def event_file(tmp_path):
    with SummaryWriter(tmp_path / "tb") as writer:
        for tag, value, step in WRITES[:2]:
            writer.scalar(tag, value, step)
        writer.scalars({"eval/clean_acc": WRITES[2][1], "eval/pgd20_acc": WRITES[3][1]}, 2)
        writer.scalar("train/loss", np.float32(WRITES[4][1]), np.int64(3))
        writer.scalar("train/loss", WRITES[5][1], 4)
    return writer.path


@pytest.mark.parametrize(
    "data, crc",
    [
        (b"", 0x00000000),
        (b"a", 0xC1D04330),
        (b"123456789", 0xE3069283),
        (bytes(32), 0x8A9136AA),  # RFC 3720 B.4
        (b"\xff" * 32, 0x62A8AB43),
        (bytes(range(32)), 0x46DD794E),
        (bytes(range(31, -1, -1)), 0x113FDB5C),
    ],
)
def test_crc32c_known_vectors(data, crc):
    assert crc32c(data) == crc


def test_masked_crc_rotates_and_adds_the_tfrecord_constant():
    crc = 0xE3069283
    assert masked_crc32c(b"123456789") == ((crc >> 15 | crc << 17) + 0xA282EAD8) & 0xFFFFFFFF


def test_record_framing():
    record = frame_record(b"abc")
    assert record[:8] == struct.pack("<Q", 3)
    assert record[8:12] == struct.pack("<I", masked_crc32c(record[:8]))
    assert record[12:15] == b"abc"
    assert record[15:] == struct.pack("<I", masked_crc32c(b"abc"))


def test_file_is_named_like_tensorboards_and_opens_with_the_file_version(event_file):
    name = os.path.basename(event_file)
    pattern = rf"events\.out\.tfevents\.(\d+)\.{re.escape(socket.gethostname())}"
    seconds = int(re.fullmatch(pattern, name).group(1))
    assert abs(seconds - time.time()) < 600
    with open(event_file, "rb") as f:
        data = f.read()
    (length,) = struct.unpack("<Q", data[:8])
    assert FILE_VERSION.encode() in data[12 : 12 + length]


def test_round_trip_gives_the_float32_values(event_file, tmp_path):
    assert read_scalars(event_file) == expected_scalars()
    assert read_scalars(tmp_path / "tb") == expected_scalars()


def test_two_writers_in_one_second_write_two_files(tmp_path):
    with SummaryWriter(tmp_path) as first, SummaryWriter(tmp_path) as second:
        first.scalar("a", 1.0, 1)
        second.scalar("a", 2.0, 2)
    assert first.path != second.path
    assert read_scalars(tmp_path)["a"] in ([(1, 1.0), (2, 2.0)], [(2, 2.0), (1, 1.0)])


@pytest.mark.parametrize(
    "values, step, message",
    [
        ({"": 1.0}, 0, "non-empty strings"),
        ({"a": "0.5"}, 0, "'a' must be a number"),
        ({"a": np.zeros(2)}, 0, "'a' must be a number"),
        ({"a": 1.0}, 1.5, "step must be an integer"),
        ({"a": 1.0}, 2**63, "int64 range"),
    ],
)
def test_invalid_scalars_are_rejected_in_one_line(tmp_path, values, step, message):
    with SummaryWriter(tmp_path) as writer, pytest.raises(ValueError, match=message) as info:
        writer.scalars(values, step)
    assert "\n" not in str(info.value)


def test_writing_after_close_fails(tmp_path):
    writer = SummaryWriter(tmp_path)
    writer.close()
    writer.close()
    with pytest.raises(ValueError):
        writer.scalar("a", 1.0, 0)


@pytest.mark.parametrize(
    "corrupt, message",
    [
        (lambda d: d[:-1], "truncated record at byte"),
        (lambda d: d[: 16 + struct.unpack("<Q", d[:8])[0] + 5], "truncated record header"),
        (lambda d: d[:8] + bytes([d[8] ^ 1]) + d[9:], "length CRC mismatch .* byte 0"),
        (lambda d: d[:-5] + bytes([d[-5] ^ 1]) + d[-4:], "data CRC mismatch"),
    ],
)
def test_corruption_raises_value_error_naming_the_file(event_file, corrupt, message):
    with open(event_file, "rb") as f:
        data = f.read()
    with open(event_file, "wb") as f:
        f.write(corrupt(data))
    with pytest.raises(ValueError, match=message) as info:
        read_scalars(event_file)
    assert str(info.value).startswith(str(event_file))


def test_missing_event_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="no event files"):
        read_scalars(tmp_path)
    with pytest.raises(FileNotFoundError, match="not found"):
        read_scalars(tmp_path / "missing")


def test_tensorboard_reads_the_file(event_file, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(tmp_path / "tb"))
    accumulator.Reload()
    expected = expected_scalars()
    assert sorted(accumulator.Tags()["scalars"]) == sorted(expected)
    for tag, points in expected.items():
        events = accumulator.Scalars(tag)
        assert [(e.step, e.value) for e in events] == points
        assert all(abs(e.wall_time - time.time()) < 600 for e in events)


def test_events_match_protobufs_serialization_and_tensorboard_written_files(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.compat.proto import event_pb2, summary_pb2
    from tensorboard.summary.writer.record_writer import RecordWriter

    values = {"a": 0.25, "b/c": -3.5}
    summary = summary_pb2.Summary(
        value=[summary_pb2.Summary.Value(tag=t, simple_value=v) for t, v in values.items()]
    )
    expected = event_pb2.Event(wall_time=12.5, step=7, summary=summary).SerializeToString()
    assert scalars_event(12.5, 7, values) == expected
    opening = event_pb2.Event.FromString(file_version_event(3.0))
    assert (opening.file_version, opening.wall_time, opening.step) == (FILE_VERSION, 3.0, 0)

    path = tmp_path / "events.out.tfevents.0.tensorboard"
    with open(path, "wb") as f:
        writer = RecordWriter(f)
        writer.write(event_pb2.Event(wall_time=1.0, file_version=FILE_VERSION).SerializeToString())
        writer.write(expected)
        writer.write(event_pb2.Event(wall_time=2.0, step=-1, summary=summary).SerializeToString())
    assert read_scalars(path) == {"a": [(7, 0.25), (-1, 0.25)], "b/c": [(7, -3.5), (-1, -3.5)]}
