"""Which output restore may replace or skip, and the names it gives: an output carries the source it was restored
from (its SHA-256, which file, its name), so that another photo's output in the folder is neither replaced nor counted
as done; an empty file is nothing to lose; names that would clash (again, or in case only) are told apart; two
folders or more always go below their names."""

from __future__ import annotations

import hashlib
import itertools
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
