#!/usr/bin/env python3
"""Fetch real recordings for tests, the demo and training from Debian data packages.

Each list is a CSV naming a Debian package and a file inside it. The script downloads the
package with ``apt-get download`` into a cache, unpacks it with ``dpkg-deb -x`` into a
temporary folder, decodes each listed file with soundfile, mixes it to mono at its native
rate and writes a 16-bit WAV. Outputs that already exist are skipped, and the .deb files stay
in the cache, so a rerun is fast. Needs: apt-get and dpkg-deb (Debian/Ubuntu), numpy,
soundfile; root or a writable apt cache for ``apt-get update`` when the package lists are
missing. Only Debian's package archive is contacted.
"""

from __future__ import annotations

import argparse
import csv
import io
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf

REPO = Path(__file__).resolve().parent.parent
DEFAULT_LIST = REPO / "data" / "fixture.csv"
ENV_VAR = "EDGE_RETRIEVAL_SOUNDS"
ARCHIVE_SEP = "!"  # "game/pak0.pk3!sound/dog.wav": a member of a zip archive in the package

# Packages set aside for other work: never fetched, whatever a list says.
RESERVED = frozenset(
    {
        "0ad-data",
        "tuxpaint-stamps-default",
        "tuxpaint-plugins-default",
        "gcompris-qt-data",
        "widelands-data",
        "minetest-data",
        "lincity-ng-data",
        "wesnoth-1.16-data",
        "sound-icons",
    }
)

EPILOG = f"""\
lists:
  A fixture list (columns clip_id,package,path_in_package,category,split,licence,start_s,
  end_s; data/fixture.csv) writes DEST/<category>/<clip_id>.wav, trimmed to start_s..end_s
  when given. A caption list (columns path,caption,package,licence with path =
  "package:path_in_package"; data/captions.csv) writes DEST/<package>/<path_in_package>.wav:
  the file's own path with its extension replaced by .wav ("{ARCHIVE_SEP}" between a zip
  archive and its member becomes "/"). Each package's Debian copyright file is copied to
  DEST/licences/<package>.copyright.

cache:
  .deb files are kept in CACHE/debs (default: ${ENV_VAR} or ~/.cache/edge-retrieval/sounds).
  DEST defaults to the same folder, which is where tests/test_fixture_data.py looks.

examples:
  python scripts/fetch_sounds.py                       # the test fixture
  python scripts/fetch_sounds.py --list data/captions.csv --dest /data/captions
"""


class FetchError(Exception):
    """A failure the user can act on; printed as one line."""


@dataclass(frozen=True)
class Item:
    """One file to take from a package and where its WAV goes (relative to DEST)."""

    package: str
    path: str
    out: Path
    start_s: float | None = None
    end_s: float | None = None


def default_cache() -> Path:
    env = os.environ.get(ENV_VAR)
    return Path(env) if env else Path.home() / ".cache" / "edge-retrieval" / "sounds"


def _float_or_none(value: str | None, where: str) -> float | None:
    if value is None or value.strip() == "":
        return None
    try:
        return float(value)
    except ValueError:
        raise FetchError(f"{where}: expected a number of seconds, got {value!r}") from None


def read_list(path: Path) -> list[Item]:
    """Read a fixture or caption CSV into items; the header says which kind it is."""
    try:
        with path.open(newline="", encoding="utf-8") as fh:
            rows = list(csv.DictReader(fh))
            header = set(rows[0].keys()) if rows else set()
    except OSError as exc:
        raise FetchError(f"cannot read list {str(path)!r}: {exc.strerror}") from exc
    items: list[Item] = []
    if {"clip_id", "package", "path_in_package", "category"} <= header:
        for n, row in enumerate(rows, start=2):
            where = f"{path}:{n}"
            items.append(
                Item(
                    package=row["package"],
                    path=row["path_in_package"],
                    out=Path(row["category"]) / f"{row['clip_id']}.wav",
                    start_s=_float_or_none(row.get("start_s"), where),
                    end_s=_float_or_none(row.get("end_s"), where),
                )
            )
    elif {"path", "caption", "package"} <= header:
        for n, row in enumerate(rows, start=2):
            pkg, sep, inner = row["path"].partition(":")
            if not sep or pkg != row["package"]:
                raise FetchError(
                    f"{path}:{n}: path must be 'package:path_in_package' with package "
                    f"{row['package']!r}, got {row['path']!r}"
                )
            out = Path(pkg) / Path(inner.replace(ARCHIVE_SEP, "/")).with_suffix(".wav")
            items.append(Item(package=pkg, path=inner, out=out))
    else:
        raise FetchError(
            f"{str(path)!r} is neither a fixture list (clip_id,package,path_in_package,"
            f"category,...) nor a caption list (path,caption,package,...)"
        )
    for item in items:
        if item.package in RESERVED:
            raise FetchError(f"{path}: package {item.package!r} is reserved and must not be used")
        if ".." in Path(item.path).parts or item.path.startswith("/"):
            raise FetchError(f"{path}: path {item.path!r} must be relative, inside the package")
    return items


def _run(cmd: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=False)
    except FileNotFoundError as exc:
        raise FetchError(f"{cmd[0]!r} not found: this script needs Debian's apt and dpkg") from exc


def download(package: str, debs: Path) -> Path:
    """Return the cached .deb of a package, downloading it with apt-get if needed."""
    found = sorted(debs.glob(f"{package}_*.deb"))
    if found:
        return found[-1]
    debs.mkdir(parents=True, exist_ok=True)
    result = _run(["apt-get", "download", package], cwd=debs)
    if result.returncode != 0:
        # A fresh container has no package lists yet: fetch them once and retry.
        update = _run(["apt-get", "update"])
        if update.returncode == 0:
            result = _run(["apt-get", "download", package], cwd=debs)
    found = sorted(debs.glob(f"{package}_*.deb"))
    if result.returncode != 0 or not found:
        last = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise FetchError(f"apt-get download {package} failed: {last}")
    return found[-1]


def to_mono(data: bytes, name: str, start_s: float | None, end_s: float | None) -> tuple[np.ndarray, int]:
    """Decode audio bytes to mono float32 at the native rate, trimmed to [start_s, end_s)."""
    try:
        samples, rate = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, TypeError) as exc:
        raise FetchError(f"cannot decode {name!r}: {exc}") from exc
    mono = samples.mean(axis=1)
    lo = int(round((start_s or 0.0) * rate))
    hi = len(mono) if end_s is None else int(round(end_s * rate))
    mono = mono[lo:hi]
    if mono.size == 0:
        raise FetchError(f"{name!r}: trim {start_s}..{end_s} s leaves no audio")
    return mono, rate


def read_member(root: Path, path: str, zips: dict[Path, zipfile.ZipFile]) -> bytes:
    """Bytes of a file in an unpacked package, or of a member of a zip archive in it."""
    archive, sep, member = path.partition(ARCHIVE_SEP)
    target = root / archive
    if not target.is_file():
        raise FetchError(f"{path!r} is not in the package")
    if not sep:
        return target.read_bytes()
    if target not in zips:
        try:
            zips[target] = zipfile.ZipFile(target)
        except zipfile.BadZipFile as exc:
            raise FetchError(f"{archive!r} is not a zip archive") from exc
    try:
        return zips[target].read(member)
    except KeyError:
        raise FetchError(f"{member!r} is not in archive {archive!r}") from None


def write_wav(out: Path, mono: np.ndarray, rate: int) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".part")
    sf.write(tmp, np.clip(mono, -1.0, 1.0), rate, subtype="PCM_16", format="WAV")
    tmp.replace(out)


def fetch_package(package: str, items: list[Item], dest: Path, debs: Path) -> int:
    """Write the missing clips of one package and its copyright file; return clips written."""
    licence = dest / "licences" / f"{package}.copyright"
    todo = [it for it in items if not (dest / it.out).exists()]
    if not todo and licence.exists():
        return 0
    deb = download(package, debs)
    with tempfile.TemporaryDirectory(prefix=f"{package}-", dir=debs) as tmp:
        root = Path(tmp)
        result = _run(["dpkg-deb", "-x", str(deb), str(root)])
        if result.returncode != 0:
            raise FetchError(f"dpkg-deb -x {deb.name} failed: {result.stderr.strip()}")
        copyright_file = root / "usr" / "share" / "doc" / package / "copyright"
        if not copyright_file.is_file():
            raise FetchError(f"{package}: no usr/share/doc/{package}/copyright in {deb.name}")
        licence.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(copyright_file, licence)
        zips: dict[Path, zipfile.ZipFile] = {}
        try:
            for it in todo:
                try:
                    data = read_member(root, it.path, zips)
                    mono, rate = to_mono(data, it.path, it.start_s, it.end_s)
                except FetchError as exc:
                    raise FetchError(f"{package}: {exc}") from exc
                write_wav(dest / it.out, mono, rate)
        finally:
            for z in zips.values():
                z.close()
    return len(todo)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--dest", type=Path, help="where the WAVs go (default: the cache folder)")
    parser.add_argument(
        "--cache", type=Path, help=f"cache folder (default: ${ENV_VAR} or ~/.cache/edge-retrieval/sounds)"
    )
    parser.add_argument(
        "--list",
        dest="lists",
        type=Path,
        action="append",
        help="CSV list of clips; may repeat (default: data/fixture.csv)",
    )
    args = parser.parse_args(argv)
    cache = args.cache or default_cache()
    dest = args.dest or cache
    try:
        items = [it for path in (args.lists or [DEFAULT_LIST]) for it in read_list(path)]
        by_package: dict[str, list[Item]] = defaultdict(list)
        for it in items:
            by_package[it.package].append(it)
        written = 0
        for n, (package, its) in enumerate(sorted(by_package.items()), start=1):
            done = fetch_package(package, its, dest, cache / "debs")
            written += done
            print(
                f"[{n}/{len(by_package)}] {package}: {done} written, {len(its) - done} present",
                file=sys.stderr,
            )
    except FetchError as exc:
        print(f"fetch_sounds: error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"fetch_sounds: error: {exc}", file=sys.stderr)
        return 1
    print(f"{len(items)} clips in {dest} ({written} new)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
