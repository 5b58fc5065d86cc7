"""Sources, ring buffer, windowing and gate: formats, rates, channels, blocks, bad input."""

from __future__ import annotations

import io
import threading
import time

import numpy as np
import pytest

from edge_retrieval.device.ringbuffer import AudioHistory, RingBuffer
from edge_retrieval.device.sources import FileSource, StdinSource
from edge_retrieval.errors import SourceError
from edge_retrieval.pipeline.gate import EnergyGate, rms_dbfs
from edge_retrieval.pipeline.windows import ExpertWindowing, Windower, common_step
from tests.fixtures_audio import tone


def _peak_hz(x: np.ndarray, rate: int) -> float:
    spec = np.abs(np.fft.rfft(x * np.hanning(x.size)))
    return float(np.argmax(spec) * rate / x.size)


@pytest.mark.parametrize("kind", ["wav", "flac", "ogg", "wav_f32_11k"])
def test_file_source_mixes_down_and_resamples(audio_files, kind: str) -> None:
    src = FileSource(audio_files[kind], target_rate=16000, block_s=0.25)
    blocks = list(src.blocks())
    assert all(b.dtype == np.float32 and b.ndim == 1 for b in blocks)
    assert len(blocks) > 10  # decoded in blocks, not whole
    x = np.concatenate(blocks)
    assert abs(x.size - 6 * 16000) <= 64
    mid = x[int(2.5 * 16000) : int(3.5 * 16000)]
    assert _peak_hz(mid, 16000) == pytest.approx(1000, abs=3)
    assert rms_dbfs(mid) > -12  # the tone, mixed down (not summed into clipping, not lost)
    assert rms_dbfs(x[: 16000]) < -30  # the noise part


def test_file_source_native_rate_and_blocks_bounded(audio_files) -> None:
    src = FileSource(audio_files["wav"], block_s=0.5)
    assert src.sample_rate == 44100 and src.channels == 2
    sizes = [b.size for b in src.blocks()]
    assert max(sizes) <= int(0.5 * 44100)
    assert sum(sizes) == src.frames


def test_file_source_realtime_pacing_can_be_stopped(audio_files) -> None:
    src = FileSource(audio_files["flac"], block_s=0.1, realtime=True)
    assert src.live
    got = []

    def consume() -> None:
        for b in src.blocks():
            got.append(b.size)

    t = threading.Thread(target=consume)
    t.start()
    time.sleep(0.5)
    src.stop()
    t.join(timeout=5)
    assert not t.is_alive()
    # paced: far less than the 6 s file came out in about half a second
    assert 0 < sum(got) < 3 * src.in_rate


@pytest.mark.parametrize("kind, expect", [
    ("corrupt", "cannot decode"), ("empty", "empty"), ("zero", "cannot decode"), ("text", "cannot decode"),
])
def test_bad_files_raise_one_clear_source_error(bad_files, kind: str, expect: str) -> None:
    with pytest.raises(SourceError, match=expect) as ei:
        FileSource(bad_files[kind])
    assert str(bad_files[kind].name) in str(ei.value) and "\n" not in str(ei.value)


def test_missing_file(tmp_path) -> None:
    with pytest.raises(SourceError, match="does not exist"):
        FileSource(tmp_path / "nope.wav")


@pytest.mark.parametrize("fmt", ["s16le", "f32le"])
def test_stdin_source_handles_partial_frames(fmt: str) -> None:
    x = tone(440, 1.0, 8000, amp=0.5)
    st = np.stack([x, x], axis=1)
    raw = (st * 32767).astype("<i2").tobytes() if fmt == "s16le" else st.astype("<f4").tobytes()

    class Dribble(io.RawIOBase):
        """Returns odd-sized chunks, like a pipe."""

        def __init__(self, data: bytes) -> None:
            self.data, self.pos = data, 0

        def read(self, n: int = -1) -> bytes:
            n = min(n, 777)
            out = self.data[self.pos : self.pos + n]
            self.pos += len(out)
            return out

    src = StdinSource(rate=8000, fmt=fmt, channels=2, stream=Dribble(raw), block_s=0.05, target_rate=16000)
    y = np.concatenate(list(src.blocks()))
    assert abs(y.size - 16000) <= 32
    assert _peak_hz(y, 16000) == pytest.approx(440, abs=3)
    assert np.max(np.abs(y)) == pytest.approx(0.5, abs=0.02)


def test_stdin_bad_format() -> None:
    with pytest.raises(SourceError, match="format"):
        StdinSource(fmt="mp3")


def test_ring_buffer_drops_oldest_and_counts() -> None:
    rb = RingBuffer(10)
    rb.write(np.arange(6))
    rb.write(np.arange(6, 14))
    assert rb.overflow_samples == 4
    np.testing.assert_array_equal(rb.read(), np.arange(4, 14))
    rb.write(np.arange(25))
    np.testing.assert_array_equal(rb.read(3), np.arange(15, 18))
    assert len(rb) == 7


def test_audio_history_by_absolute_offset() -> None:
    h = AudioHistory(100)
    for i in range(0, 250, 30):
        h.append(np.arange(i, min(i + 30, 250), dtype=np.float32))
    np.testing.assert_array_equal(h.slice(200, 210), np.arange(200, 210))
    assert h.slice(0, 100).size == 0  # gone
    np.testing.assert_array_equal(h.slice(140, 160), np.arange(150, 160))  # only what is still held


def test_windows_on_a_common_hop_for_two_rates() -> None:
    rate = 11025
    x = np.random.default_rng(0).standard_normal(int(5.3 * rate)).astype(np.float32)
    experts = [ExpertWindowing("a", 16000, 1.0), ExpertWindowing("b", 8000, 0.5)]
    step = common_step(1.0, 0.5)
    w = Windower(experts, rate, step)
    ticks = []
    for i in range(0, x.size, 999):
        ticks += list(w.push(x[i : i + 999]))
    ticks += list(w.flush())
    assert [t.start_s for t in ticks] == pytest.approx([0.5 * k for k in range(len(ticks))])
    # windows cover the whole stream: the last one is padded past 5.3 s
    assert ticks[-1].padded and ticks[-1].start_s < 5.3 <= ticks[-1].start_s + 1.0
    assert all(t.windows["a"].shape == (16000,) and t.windows["b"].shape == (4000,) for t in ticks)
    # overlapping windows share samples: the second half of window k == the first half of k+1
    np.testing.assert_allclose(ticks[2].windows["a"][8000:], ticks[3].windows["a"][:8000])


def test_short_stream_still_gives_one_padded_window() -> None:
    w = Windower([ExpertWindowing("a", 16000, 3.0)], 16000, 3.0)
    ticks = list(w.push(np.ones(8000, np.float32))) + list(w.flush())
    assert len(ticks) == 1 and ticks[0].padded
    assert ticks[0].windows["a"][:8000].sum() == 8000 and ticks[0].windows["a"][8000:].sum() == 0


def test_overlap_out_of_range() -> None:
    with pytest.raises(ValueError, match="overlap"):
        common_step(3.0, 0.99)


def test_energy_gate_counts() -> None:
    g = EnergyGate(-60)
    assert g.open(tone(1000, 0.1, 16000, amp=0.1))
    assert not g.open(np.zeros(1600, np.float32))
    assert not g.open(tone(1000, 0.1, 16000, amp=1e-4))  # -83 dBFS
    assert (g.passed, g.gated) == (1, 2)
    assert rms_dbfs(tone(1000, 1.0, 16000, amp=1.0)) == pytest.approx(-3.01, abs=0.05)
