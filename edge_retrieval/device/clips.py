"""Detection clips: the audio around an event as FLAC in a size-capped folder (oldest deleted).

The daemon keeps ``history_s`` seconds of recent source audio (an ``AudioHistory``) and, once
``post_s`` seconds have passed after an event's end, writes ``[start - pre_s, end + post_s]``
(capped to ``max_clip_s``) as ``<event_id>.flac``; the event's final update names the file.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

from ..errors import ConfigError

log = logging.getLogger(__name__)


class ClipWriter:
    """Writes clips into ``directory``, keeping the folder under ``max_mb`` megabytes."""

    def __init__(
        self,
        directory: str | Path,
        max_mb: float = 500.0,
        pre_s: float = 2.0,
        post_s: float = 2.0,
        max_clip_s: float = 30.0,
    ) -> None:
        if max_mb <= 0 or pre_s < 0 or post_s < 0 or max_clip_s <= 0:
            raise ConfigError(
                f"clips: max_mb {max_mb!r} and max_clip_s {max_clip_s!r} must be > 0, pre_s/post_s >= 0"
            )
        self.dir = Path(directory).expanduser()
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"clips.dir {str(self.dir)!r} cannot be created: {exc.strerror}") from exc
        self.max_bytes = int(max_mb * 1e6)
        self.pre_s, self.post_s, self.max_clip_s = pre_s, post_s, max_clip_s
        self.written = 0
        self.deleted = 0
        self.failed = 0

    @property
    def history_s(self) -> float:
        """Seconds of audio the daemon must keep for a clip (plus its queue lag)."""
        return self.pre_s + self.max_clip_s + self.post_s

    def span(self, start_s: float, end_s: float) -> tuple[float, float]:
        a = max(0.0, start_s - self.pre_s)
        b = min(end_s + self.post_s, a + self.max_clip_s)
        return a, b

    def write(self, event_id: str, samples: np.ndarray, rate: int) -> str | None:
        """Write one clip; returns its file name (relative to ``dir``), None if it failed."""
        import soundfile as sf

        if samples.size == 0:
            return None
        name = f"{event_id}.flac"
        tmp = self.dir / f".{name}.part"
        try:
            sf.write(str(tmp), np.clip(samples, -1.0, 1.0), rate, format="FLAC", subtype="PCM_16")
            os.replace(tmp, self.dir / name)
        except (OSError, RuntimeError) as exc:  # disk full, permissions: a status, not a crash
            self.failed += 1
            log.warning("cannot write clip %s: %s", name, exc)
            tmp.unlink(missing_ok=True)
            return None
        self.written += 1
        self._enforce_cap()
        return name

    def _enforce_cap(self) -> None:
        files = []
        for p in self.dir.glob("*.flac"):
            try:
                st = p.stat()
            except OSError:
                continue
            files.append((st.st_mtime, p.name, st.st_size, p))
        files.sort()
        total = sum(f[2] for f in files)
        while files and total > self.max_bytes:
            _, _, size, p = files.pop(0)
            try:
                p.unlink()
                self.deleted += 1
                total -= size
            except OSError as exc:
                log.warning("cannot delete old clip %s: %s", p, exc)
                break
