"""The GPU check's compile cache (dist_dejpeg/bench/compile_cache.py, gpu_check --compile-cache): inductor's and
Triton's cache folders packed into one .tar.gz or parts of a size limit, unpacked again file for file, the old
archive kept until the new one is whole, and every way an archive can be broken (a missing part, a truncated or
corrupt file, a member outside the two caches) reported while the check goes on with an empty cache. That
inductor really reads the folder those variables name is seen on this CPU: a function compiled in one process is
found in the cache by the next."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from dist_dejpeg.bench.compile_cache import PARTS, cache_env, pack, parts_of, unpack

REPO = Path(__file__).resolve().parents[1]


def _cache(folder: Path) -> dict[str, bytes]:
    """A cache folder like the compilers leave: inductor's code and graphs, Triton's kernels (2.5 MB random)."""
    files = {"inductor/fxgraph/ab/entry": os.urandom(1000), "inductor/ab/cxyz.py": b"def call(args): pass\n",
             "triton/KEY1/kernel.cubin": os.urandom(2_500_000), "triton/KEY1/__grp__kernel.json": b"{}"}
    for name, data in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
    return files


def _files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


@pytest.mark.parametrize("split", [0, 1])
def test_pack_and_unpack_round_trip(tmp_path, split):
    files = _cache(tmp_path / "a")
    archive = tmp_path / "carry" / "compile.tar.gz"
    line = pack(tmp_path / "a", archive, split)
    assert "4 files packed" in line, line
    parts = parts_of(archive)
    if split:  # random bytes do not compress: 2.5 MB in parts of 1 MiB is three of them
        assert [p.name for p in parts] == [f"compile.tar.gz{PARTS}{i:02d}" for i in range(3)] and not archive.exists()
        assert all(p.stat().st_size <= 2**20 for p in parts)
    else:
        assert archive.is_file() and not parts
    line = unpack(archive, tmp_path / "b")
    assert line.startswith("4 files") and ("3 parts" if split else "one file") in line, line
    assert _files(tmp_path / "b") == files
    assert not list(archive.parent.glob("*.writing*"))


def test_packing_replaces_parts_with_one_file_and_back(tmp_path):
    _cache(tmp_path / "a")
    archive = tmp_path / "compile.tar.gz"
    pack(tmp_path / "a", archive, 1)
    (tmp_path / "a" / "triton" / "KEY1" / "kernel.cubin").unlink()  # now small: one part
    pack(tmp_path / "a", archive, 0)
    assert archive.is_file() and not parts_of(archive)
    pack(tmp_path / "a", archive, 1)
    assert not archive.exists() and len(parts_of(archive)) == 1
    assert set(_files(tmp_path / "a")) == {"inductor/fxgraph/ab/entry", "inductor/ab/cxyz.py",
                                           "triton/KEY1/__grp__kernel.json"}


def test_no_archive_yet_gives_empty_cache_folders(tmp_path):
    line = unpack(tmp_path / "none.tar.gz", tmp_path / "c")
    assert "none at" in line and sorted(p.name for p in (tmp_path / "c").iterdir()) == ["inductor", "triton"]


def _evil(archive: Path) -> None:
    with tarfile.open(archive, "w:gz") as tar:
        info = tarfile.TarInfo("elsewhere/x.py")
        info.size = 1
        tar.addfile(info, io.BytesIO(b"x"))


@pytest.mark.parametrize("case", ["missing part", "truncated", "corrupt", "not gzip", "foreign member"])
def test_broken_archive_is_reported_and_the_cache_starts_empty(tmp_path, case):
    _cache(tmp_path / "a")
    archive = tmp_path / "compile.tar.gz"
    pack(tmp_path / "a", archive, 1 if case == "missing part" else 0)
    if case == "missing part":
        parts_of(archive)[1].unlink()
    elif case == "truncated":
        archive.write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])
    elif case == "corrupt":
        data = bytearray(archive.read_bytes())
        data[len(data) // 2] ^= 0xFF
        archive.write_bytes(bytes(data))
    elif case == "not gzip":
        archive.write_text("no archive")
    else:
        _evil(archive)
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "stale").write_text("from before")
    line = unpack(archive, tmp_path / "b")
    assert line.startswith(f"{archive} not used") and "compiles from scratch" in line, line
    if case == "missing part":
        assert "part 01 is missing" in line, line
    if case == "foreign member":
        assert "elsewhere/x.py" in line, line
    assert _files(tmp_path / "b") == {} and sorted(p.name for p in (tmp_path / "b").iterdir()) == ["inductor", "triton"]
    assert not (tmp_path / "elsewhere").exists()


COMPILE = """
import torch, torch._dynamo
from torch._dynamo.utils import counters
# a matrix product: inductor calls an extern kernel, so its FX graph is cached without a C++ compile (~30 s here)
f = torch.compile(lambda x: x @ x, backend="inductor")
print(float(f(torch.ones(8, 8)).sum()))
print("hits", counters["inductor"]["fxgraph_cache_hit"], "misses", counters["inductor"]["fxgraph_cache_miss"])
"""


@pytest.mark.slow
def test_inductor_reads_the_cache_the_variables_name(tmp_path):
    """Compiled in one process into a folder, packed, unpacked elsewhere: a second process finds its graph there."""
    env = {**os.environ, **cache_env(tmp_path / "first"), "TMPDIR": str(tmp_path)}
    env.pop("PYTHONPATH", None)
    first = subprocess.run([sys.executable, "-c", COMPILE], env=env, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr
    assert "hits 0 misses 1" in first.stdout, first.stdout + first.stderr
    assert any((tmp_path / "first" / "inductor").rglob("*.py")), "inductor wrote nothing into TORCHINDUCTOR_CACHE_DIR"
    pack(tmp_path / "first", tmp_path / "carry.tar.gz")
    unpack(tmp_path / "carry.tar.gz", tmp_path / "second")
    env.update(cache_env(tmp_path / "second"))
    second = subprocess.run([sys.executable, "-c", COMPILE], env=env, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr
    assert second.stdout.splitlines()[0] == first.stdout.splitlines()[0]
    assert "hits 1 misses 0" in second.stdout, second.stdout + second.stderr


def test_a_failed_pack_leaves_the_old_archive_and_no_half_files(tmp_path, monkeypatch):
    """A full disk while packing: the error is raised (the check reports it), the half-written files are removed and
    the archive of the last good pack is still there, whole."""
    files = _cache(tmp_path / "a")
    archive = tmp_path / "compile.tar.gz"
    pack(tmp_path / "a", archive, 1)
    before = {p.name: p.read_bytes() for p in parts_of(archive)}
    real = Path.write_bytes

    def full_disk(self, data):
        if ".writing" in self.name and self.name.endswith("01"):
            raise OSError(28, "No space left on device")
        return real(self, data)

    monkeypatch.setattr(Path, "write_bytes", full_disk)
    with pytest.raises(OSError, match="No space"):
        pack(tmp_path / "a", archive, 1)
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in parts_of(archive)} == before
    assert not list(tmp_path.glob("*.writing*"))
    unpack(archive, tmp_path / "b")
    assert _files(tmp_path / "b") == files


def test_triton_finds_its_kernels_after_the_cache_moved(tmp_path, monkeypatch):
    """Triton's group files name a kernel's files by absolute path and miss when one is not there: a cache written
    in one scratch folder and unpacked into another is pointed at its new place, and Triton (its own cache
    manager) finds the kernel there; the same archive unpacked without that step would miss."""
    triton_cache = pytest.importorskip("triton.runtime.cache")

    first = tmp_path / "first" / "triton"
    monkeypatch.setenv("TRITON_CACHE_DIR", str(first))
    manager = triton_cache.FileCacheManager("KEYA")
    group = {name: manager.put(data, name) for name, data in (("k.cubin", b"\x7fELF"), ("k.json", '{"name": "k"}'))}
    manager.put_group("k.json", group)
    assert manager.get_group("k.json") == group  # as Triton wrote it
    archive = tmp_path / "compile.tar.gz"
    pack(tmp_path / "first", archive)
    second = tmp_path / "second"
    line = unpack(archive, second)
    assert "1 Triton kernel groups pointed at their new place" in line, line
    monkeypatch.setenv("TRITON_CACHE_DIR", str(second / "triton"))
    found = triton_cache.FileCacheManager("KEYA").get_group("k.json")
    assert found is not None and all(Path(p).parent == second / "triton" / "KEYA" for p in found.values()), found
    assert Path(found["k.cubin"]).read_bytes() == b"\x7fELF"
    import shutil

    shutil.rmtree(tmp_path / "first")  # where the old paths pointed
    with tarfile.open(archive) as tar:
        tar.extractall(tmp_path / "third", filter="data")
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "third" / "triton"))
    assert triton_cache.FileCacheManager("KEYA").get_group("k.json") is None  # unrelocated: a miss


def test_over_the_limit_packs_without_triton_or_keeps_the_old_archive(tmp_path):
    """--compile-cache-max: 2.5 MB of Triton's (random, incompressible) over 1 MiB: packed without Triton's folder,
    and said so; inductor's own entries over it too: nothing written, the last archive kept whole."""
    files = _cache(tmp_path / "a")
    archive = tmp_path / "compile.tar.gz"
    line = pack(tmp_path / "a", archive, 1, max_mib=1)
    assert "2 files packed" in line and "is over --compile-cache-max 1 MiB" in line, line
    assert "without Triton's folder" in line, line
    assert len(parts_of(archive)) == 1
    unpack(archive, tmp_path / "b")
    assert _files(tmp_path / "b") == {k: v for k, v in files.items() if k.startswith("inductor/")}
    before = {p.name: p.read_bytes() for p in parts_of(archive)}
    (tmp_path / "a" / "inductor" / "fxgraph" / "ab" / "big").write_bytes(os.urandom(1_200_000))
    line = pack(tmp_path / "a", archive, 1, max_mib=1)
    assert line.startswith("not written") and f"{archive} left as it was" in line, line
    assert {p.name: p.read_bytes() for p in parts_of(archive)} == before
    assert not list(tmp_path.glob("*.writing*"))
    line = pack(tmp_path / "a", archive, 1, max_mib=8)  # under the limit: everything
    assert "5 files packed" in line and "Triton" not in line, line


def test_packing_drops_tritons_irs_and_triton_still_finds_the_kernel(tmp_path, monkeypatch):
    """A kernel as Triton caches it (metadata, binary and four IRs, one group): packed without the IRs, it is
    still a hit for Triton's own cache manager after the move, with the metadata and the binary it loads."""
    triton_cache = pytest.importorskip("triton.runtime.cache")
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "first" / "triton"))
    manager = triton_cache.FileCacheManager("KEYB")
    made = {"k.json": '{"name": "k"}', "k.cubin": b"\x7fELF" + os.urandom(100), "k.ptx": "//" + "x" * 5000,
            "k.ttir": "module {}", "k.ttgir": "module {}", "k.llir": "; llvm"}
    manager.put_group("k.json", {name: manager.put(data, name) for name, data in made.items()})
    line = pack(tmp_path / "first", tmp_path / "compile.tar.gz")
    assert "Triton's intermediate IRs dropped" in line, line
    unpack(tmp_path / "compile.tar.gz", tmp_path / "second")
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "second" / "triton"))
    found = triton_cache.FileCacheManager("KEYB").get_group("k.json")
    assert found is not None and sorted(found) == ["k.cubin", "k.json"], found
    assert Path(found["k.cubin"]).read_bytes() == made["k.cubin"]
    assert sorted(p.name for p in (tmp_path / "second" / "triton" / "KEYB").iterdir()) == [
        "__grp__k.json", "k.cubin", "k.json"]
