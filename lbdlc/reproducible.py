"""`lbdlc build --check-reproducible`: build twice, compare every artifact byte for byte.

Invariant 4 (DESIGN.md): the same spec, seed, options and tool versions give byte-identical
artifacts. The two builds go to two temporary directories with the same name (in two
different parents), so that nothing that records the output folder's name can differ for
that reason; every file of the two directories is compared, the manifest included.
"""
from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .driver import BuildOptions, BuildResult, build, sha256_file


@dataclass
class ArtifactCheck:
    name: str  # path relative to the output directory
    same: bool
    sha256: tuple[str | None, str | None]
    bytes: tuple[int | None, int | None]


def _files(root: Path) -> dict[str, Path]:
    return {p.relative_to(root).as_posix(): p for p in sorted(root.rglob("*")) if p.is_file()}


def compare_dirs(a: Path, b: Path) -> list[ArtifactCheck]:
    fa, fb = _files(a), _files(b)
    out = []
    for name in sorted(set(fa) | set(fb)):
        pa, pb = fa.get(name), fb.get(name)
        same = pa is not None and pb is not None and pa.read_bytes() == pb.read_bytes()
        out.append(ArtifactCheck(
            name, same,
            (sha256_file(pa) if pa else None, sha256_file(pb) if pb else None),
            (pa.stat().st_size if pa else None, pb.stat().st_size if pb else None),
        ))
    return out


def check_reproducible(spec: str | Path, options: BuildOptions = BuildOptions(), name: str = "build") -> tuple[BuildResult, list[ArtifactCheck]]:
    """Build `spec` twice with the same options; the first build's result and each file's check."""
    work = Path(tempfile.mkdtemp(prefix="lbdlc-repro-"))
    try:
        first = build(spec, work / "1" / name, options)
        build(spec, work / "2" / name, options)
        return first, compare_dirs(work / "1" / name, work / "2" / name)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def rebuild_and_compare(spec: str | Path, out_dir: Path, options: BuildOptions) -> list[ArtifactCheck]:
    """Build `spec` again into a temporary directory named like `out_dir`; compare with it."""
    work = Path(tempfile.mkdtemp(prefix="lbdlc-repro-"))
    try:
        again = work / Path(out_dir).name
        build(spec, again, options)
        return compare_dirs(Path(out_dir), again)
    finally:
        shutil.rmtree(work, ignore_errors=True)
