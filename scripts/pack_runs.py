"""Pack a sweep's runs to move them to another machine and go on there with ``scripts/sweep.py
--resume``: every file of each run except its checkpoints, plus the one checkpoint ``--resume``
goes on from (``sweep.newest_checkpoint``), in one ``.tar.gz`` whose paths are relative to the
current directory (unpack with ``tar xzf`` in the same place on the other machine).

    python scripts/pack_runs.py runs/anchor_study/babyai5 --out babyai5.tgz [--max_mib 15]

``--max_mib`` splits the archive into parts of at most that size (``babyai5.0.tgz``, ...; a run
never straddles two parts), for transfers that limit the size of a file.
"""
from __future__ import annotations

import argparse
import os
import sys
import tarfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from sweep import newest_checkpoint  # noqa: E402


def run_dirs(root: str) -> list[str]:
    """Folders under ``root`` holding a ``checkpoints/`` folder or a ``metrics.json`` (a run)."""
    found = []
    for path, dirs, files in os.walk(root):
        if "checkpoints" in dirs or "metrics.json" in files:
            found.append(path)
            dirs[:] = [d for d in dirs if d != "checkpoints"]
    return sorted(found)


def run_files(run: str) -> list[str]:
    """The run's files to move: all but its checkpoints, and its newest checkpoint."""
    files = []
    for path, dirs, names in os.walk(run):
        if os.path.basename(path) == "checkpoints" and os.path.dirname(path) == run:
            continue
        files += [os.path.join(path, n) for n in names]
    newest = newest_checkpoint(run)
    return sorted(files + ([newest] if newest else []))


def pack(root: str, out: str, max_mib: float | None = None) -> list[str]:
    """Write the archive(s); returns their paths."""
    limit = None if max_mib is None else max_mib * 2**20
    parts, groups, size = [], [[]], 0
    for run in run_dirs(root):
        files = run_files(run)
        run_size = sum(os.path.getsize(f) for f in files)
        if limit is not None and groups[-1] and size + run_size > limit:
            groups.append([])
            size = 0
        groups[-1] += files
        size += run_size
    stem = out[:-len(".tgz")] if out.endswith(".tgz") else out
    for i, files in enumerate(groups):
        path = out if len(groups) == 1 else f"{stem}.{i}.tgz"
        with tarfile.open(path, "w:gz") as tar:
            for f in files:
                tar.add(f)
        parts.append(path)
    return parts


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("root", help="a sweep's --out folder (or any folder of runs)")
    ap.add_argument("--out", required=True, help="the .tgz to write")
    ap.add_argument("--max_mib", type=float, default=None, help="split into parts of at most this size")
    args = ap.parse_args(argv)
    if not os.path.isdir(args.root):
        sys.exit(f"pack_runs: root={args.root!r} is not a folder")
    for path in pack(args.root, args.out, args.max_mib):
        print(f"{path}: {os.path.getsize(path) / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
