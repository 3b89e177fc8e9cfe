"""Which output restore may replace or skip, and the names it gives: an output carries the source it was restored
from (its SHA-256, which file, its name), so that another photo's output in the folder is neither replaced nor counted
as done; an empty file is nothing to lose; names that would clash (again, or in case only) are told apart; two
folders or more always go below their names."""

from __future__ import annotations

import errno
import hashlib
import itertools
import unicodedata
from pathlib import Path

import pytest
from PIL import Image

from dist_dejpeg.jpeg.formats import restore_mark
from dist_dejpeg.restore.files import restore_files
from dist_dejpeg.restore.images import save_image
from dist_dejpeg.restore.inputs import collect_inputs, output_names, ownership, replaceable, root_labels

from test_faults_restore import Identity, _photo


@pytest.fixture
def restorer() -> Identity:
    return Identity()


def _jpeg(path: Path, shift: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(_photo()[:, shift:shift + 60]).save(path, quality=40)
    return path


@pytest.mark.parametrize("fmt", ["png", "jpg", "webp", "tiff"])
def test_every_output_format_carries_its_sources_identity(tmp_path, restorer, fmt):
    source = _jpeg(tmp_path / "in" / "IMG_0001.jpg")
    [result] = restore_files(restorer, [str(source)], tmp_path / "o", fmt=fmt, progress=False)
    mark, wrote = restore_mark(result.output)
    assert mark and wrote is not None, result
    assert wrote["sha256"] == hashlib.sha256(source.read_bytes()).hexdigest() and wrote["name"] == "IMG_0001.jpg"
    assert ownership(Path(result.output), source)[0] == "same"


def test_another_photos_output_is_neither_replaced_nor_skipped_and_a_rescan_is_restored_again(tmp_path, restorer):
    """restore sA -o o, then restore sB -o o --skip-existing said "skipped 1 existing" for sB/IMG_0001.jpg (o held
    sA's photo), and without --skip-existing replaced sA's output silently; a re-scanned photo (same file, new
    bytes) was skipped with its old output."""
    a, b = _jpeg(tmp_path / "sA" / "IMG_0001.jpg"), _jpeg(tmp_path / "sB" / "IMG_0001.jpg", shift=30)
    _jpeg(tmp_path / "sB" / "IMG_0003.jpg", shift=10)
    out = tmp_path / "o"
    restore_files(restorer, [str(a.parent)], out, progress=False)
    first = (out / "IMG_0001.png").read_bytes()
    for skip in (True, False):
        results = {Path(r.source).name: r for r in restore_files(restorer, [str(b.parent)], out, progress=False,
                                                                 skip_existing=skip)}
        assert not results["IMG_0001.jpg"].skipped and "another photo, IMG_0001.jpg" in results["IMG_0001.jpg"].error
        assert results["IMG_0003.jpg"].error is None
        assert (out / "IMG_0001.png").read_bytes() == first  # sA's, left alone
    twin = tmp_path / "copy" / "IMG_0001.jpg"  # the same photo elsewhere: its output is this one's too
    twin.parent.mkdir()
    twin.write_bytes(a.read_bytes())
    [same] = restore_files(restorer, [str(twin)], out, progress=False, skip_existing=True)
    assert same.skipped and same.error is None
    _jpeg(a, shift=20)  # re-scanned: the same file, new bytes
    [again] = restore_files(restorer, [str(a)], out, progress=False, skip_existing=True)
    assert not again.skipped and again.error is None and (out / "IMG_0001.png").read_bytes() != first
    [done] = restore_files(restorer, [str(a)], out, progress=False, skip_existing=True)
    assert done.skipped


def test_an_older_versions_output_without_a_source_is_still_taken_as_this_inputs(tmp_path):
    source = _jpeg(tmp_path / "a.jpg")
    old = tmp_path / "a.png"
    save_image(_photo()[:, :60], old)  # the mark alone, as restore wrote before the source was named
    assert restore_mark(old) == (True, None) and ownership(old, source)[0] == "older" and replaceable(old, source)


def test_an_empty_output_is_replaced(tmp_path, restorer):
    """A 0-byte file where the output goes (a crash, a full disk, touch) failed the rerun: "exists and restore cannot
    tell it wrote it"; it holds nothing to lose."""
    source = _jpeg(tmp_path / "in" / "a.jpg")
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "a.png").touch()
    assert replaceable(tmp_path / "o" / "a.png", source)
    [result] = restore_files(restorer, [str(source.parent)], tmp_path / "o", progress=False, skip_existing=True)
    assert result.error is None and not result.skipped and restore_mark(result.output)[0]


def test_clashing_names_are_resolved_until_unique_in_any_order_and_any_case():
    """a.jpg, a.png and a.jpg.png: the third failed as a.jpg's output (one level resolved); B.jpg and b.JPG gave
    B.png and b.png, one file on a case-insensitive disk (macOS, Windows, exFAT)."""
    for rels in (["a.jpg", "a.png", "a.jpg.png"], ["B.jpg", "b.JPG"], ["x/a.jpg", "X/a.jpg", "x/b.jpg"],
                 ["a.jpg", "A.png", "a.jpg.png", "A.JPG.PNG"]):
        named = {}
        for order in itertools.permutations(rels):
            names = output_names([Path(r) for r in order])
            assert len({n.as_posix().casefold() for n in names}) == len(names), (order, names)
            named[tuple(sorted(zip(order, map(str, names))))] = names
        assert len(named) == 1, named  # whatever the order
    assert output_names([Path("a.jpg"), Path("a.png"), Path("a.jpg.png")]) == [
        Path("a.jpg.png"), Path("a.png.png"), Path("a.jpg.png.png")]
    assert output_names([Path("a.jpg"), Path("b.png")]) == [Path("a.png"), Path("b.png")]  # no clash: as before


def test_names_that_differ_only_in_unicode_normalisation_are_told_apart():
    """é.jpg in NFC and in NFD (copied from a Linux share) gave two outputs that APFS/HFS+ hold as one file: the
    second restored overwrote the first's. Now they clash as B.jpg and b.JPG do, in any case too."""
    nfc, nfd = (unicodedata.normalize(form, "café") for form in ("NFC", "NFD"))
    for rels in ([f"{nfc}.jpg", f"{nfd}.jpg"], [f"{nfc}.jpg", f"{nfd.upper()}.JPG"], [f"{nfc}/a.jpg", f"{nfd}/a.jpg"]):
        names = output_names([Path(r) for r in rels])
        keys = {unicodedata.normalize("NFC", n.as_posix()).casefold() for n in names}
        assert len(keys) == len(names), names
    assert output_names([Path(f"{nfc}.jpg"), Path(f"{nfd}.png")]) == [Path(f"{nfc}.jpg.png"), Path(f"{nfd}.png.png")]


def test_two_folders_always_go_below_their_names(tmp_path):
    """restore sA sC -o o wrote o/IMG_*.png flat until a file of one name came into both: then every output moved
    below o/sA, o/sC (all restored again, the flat ones orphaned)."""
    _jpeg(tmp_path / "sA" / "IMG_0001.jpg")
    _jpeg(tmp_path / "sC" / "IMG_0002.jpg")

    def rels(*inputs):
        return sorted(rel.as_posix() for _, rel in collect_inputs([str(tmp_path / i) for i in inputs])[0])

    assert rels("sA", "sC") == ["sA/IMG_0001.jpg", "sC/IMG_0002.jpg"]
    _jpeg(tmp_path / "sC" / "IMG_0001.jpg")
    assert rels("sA", "sC") == ["sA/IMG_0001.jpg", "sC/IMG_0001.jpg", "sC/IMG_0002.jpg"]
    assert rels("sC") == ["IMG_0001.jpg", "IMG_0002.jpg"] and rels("sC", "sC") == rels("sC")  # one folder: flat
    assert rels("sA", "sC/IMG_0002.jpg") == ["IMG_0001.jpg", "IMG_0002.jpg"]  # a file named by itself: flat
    labels = root_labels({Path("/p/x/Photos"), Path("/p/y/photos")})  # one folder on a case-insensitive disk
    assert labels == {Path("/p/x/Photos"): Path("x/Photos"), Path("/p/y/photos"): Path("y/photos")}


class Meanwhile:
    """A restorer that, on its first file, has another restore write into the same output folder (as a second
    `restore` run at the same time would, its output landing between this run's planning and its write)."""

    def __init__(self, passthrough: bool, other: Path, out: Path, fmt: str, clear: bool = False):
        self.inner, self.passthrough, self.other, self.out, self.fmt = Identity(), passthrough, other, out, fmt
        self.inner.passthrough, self.clear, self.device, self.guard, self.gains = passthrough, clear, "cpu", False, {}
        self.others: list = []

    def restore_array(self, rgb, quality=None, source="given", conformed=False):
        if not self.others:
            for old in self.out.glob("*.*") if self.clear else ():
                old.unlink()  # (gone from under this run: the other restore may write there)
            self.others = restore_files(self.inner, [str(self.other)], self.out, fmt=self.fmt, progress=False)
        out = self.inner.restore_array(rgb, quality, source, conformed)
        self.last_decision = self.inner.last_decision
        return out


@pytest.mark.parametrize("passthrough,fmt,existed", [(False, "png", False), (True, "same", False),
                                                     (False, "png", True)])
def test_a_restore_at_once_into_the_folder_never_replaces_the_others_output(tmp_path, passthrough, fmt, existed):
    """Two restores into one folder at once (photos and photos2, one file name, other pictures) each checked their
    outputs before restoring and then replaced what was there when they wrote: out held some of each, both runs
    said "restored" for every file (a review reproduced it at main). Now an output written meanwhile by the other
    run is kept byte for byte and this file's result is an error naming its photo; a target this run owned at
    planning (existed) is checked again before its rename."""
    from dist_dejpeg.run.files import read_jsonl

    mine, other = _jpeg(tmp_path / "photos" / "IMG_0001.jpg"), _jpeg(tmp_path / "photos2" / "IMG_0001.jpg", shift=30)
    _jpeg(tmp_path / "photos" / "IMG_0002.jpg", shift=10)
    out, name = tmp_path / "out", "IMG_0001.jpg" if fmt == "same" else "IMG_0001.png"
    if existed:  # this run's own earlier outputs: replacing them is allowed
        assert all(r.error is None for r in restore_files(Identity(), [str(mine.parent)], out, progress=False))
    restorer = Meanwhile(passthrough, other, out, fmt, clear=existed)
    results = {Path(r.source).name: r for r in restore_files(restorer, [str(mine.parent)], out, fmt=fmt,
                                                             progress=False, record=tmp_path / "rec.jsonl")}
    [theirs] = restorer.others
    assert theirs.error is None and theirs.output == str(out / name)
    written = (out / name).read_bytes()
    assert written == (other.read_bytes() if passthrough else written) and written != mine.read_bytes()
    assert restore_mark(written)[0] != passthrough and ownership(out / name, other)[0] in ("same", "copy")
    error = results["IMG_0001.jpg"].error
    assert error is not None and results["IMG_0001.jpg"].output is None, results
    assert f"output {out / name}" in error and "meanwhile" in error and "not replaced" in error, error
    assert ("another photo, IMG_0001.jpg" in error) != passthrough, error  # (a pass-through copy has no mark)
    assert results["IMG_0002.jpg"].error is None and ownership(out / Path(results["IMG_0002.jpg"].output).name,
                                                               mine.parent / "IMG_0002.jpg")[0] in ("same", "copy")
    statuses = {Path(line["source"]).name: line["status"] for line in read_jsonl(tmp_path / "rec.jsonl")}
    assert statuses["IMG_0001.jpg"] == "failed", statuses
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # (no temp file left)


def test_a_restore_at_once_of_the_same_photo_replaces_it_and_a_rerun_replaces_its_own(tmp_path):
    """The same photo restored by two runs at once (its twin in another folder: one output) is no conflict: the
    later write replaces the earlier; a plain rerun replaces its own outputs and --skip-existing skips them."""
    mine = _jpeg(tmp_path / "photos" / "IMG_0001.jpg")
    twin = tmp_path / "twin" / "IMG_0001.jpg"
    twin.parent.mkdir()
    twin.write_bytes(mine.read_bytes())
    out = tmp_path / "out"
    restorer = Meanwhile(False, twin, out, "png")
    [result] = restore_files(restorer, [str(mine)], out, progress=False)
    assert result.error is None and restorer.others[0].error is None and result.output == str(out / "IMG_0001.png")
    assert ownership(out / "IMG_0001.png", mine)[0] == "same"
    [again] = restore_files(Identity(), [str(mine)], out, progress=False)
    assert again.error is None and not again.skipped
    [skipped] = restore_files(Identity(), [str(mine)], out, progress=False, skip_existing=True)
    assert skipped.skipped and skipped.error is None


@pytest.mark.parametrize("no_link", [None, errno.EPERM, errno.ENOTSUP, errno.EINVAL])
def test_a_guarded_write_links_into_place_and_vets_a_file_there(tmp_path, monkeypatch, no_link):
    """atomic_write_bytes(vet=...): where nothing is at the path the temp file is linked into place (no-clobber),
    vet not called; where a file is (or hard links fail: some FUSE/SMB mounts), vet decides before the rename."""
    import os

    from dist_dejpeg.run import files as run_files

    def no_links(*a):
        err = OSError(no_link, "no links")
        err.winerror = 1  # (EINVAL: Windows' ERROR_INVALID_FUNCTION on FAT32/exFAT, SMB)
        raise err

    if no_link is not None:
        monkeypatch.setattr(run_files.os, "link", no_links)
    vetted = []

    def vet(path):
        vetted.append(path)
        if path.exists() and path.read_bytes() == b"keep":
            raise ValueError("kept")

    target = tmp_path / "a.png"
    run_files.atomic_write_bytes(target, b"new", vet=vet)
    assert target.read_bytes() == b"new" and vetted == ([] if no_link is None else [target])
    run_files.atomic_write_bytes(target, b"newer", vet=vet)
    assert target.read_bytes() == b"newer" and vetted[-1] == target
    target.write_bytes(b"keep")
    with pytest.raises(ValueError):
        run_files.atomic_write_bytes(target, b"lost", vet=vet)
    assert target.read_bytes() == b"keep" and os.listdir(tmp_path) == ["a.png"]


def test_a_link_made_though_it_said_einval_is_published_not_vetted(tmp_path, monkeypatch):
    """os.link raising EINVAL after making the link (a flaky share): the file at the path is ours, not vetted."""
    import os

    from dist_dejpeg.run import files as run_files

    real = os.link

    def link(src, dst, *a, **k):
        real(src, dst)
        raise OSError(errno.EINVAL, "Incorrect function")

    monkeypatch.setattr(run_files.os, "link", link)
    target = tmp_path / "a.png"
    run_files.atomic_write_bytes(target, b"new", vet=lambda path: pytest.fail("vetted our own file"))
    assert target.read_bytes() == b"new" and os.listdir(tmp_path) == ["a.png"]
