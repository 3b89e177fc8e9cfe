"""Folder restores with decode and encode in a thread pool (issue 24): the same outputs byte for byte, the same
results in the same order, and a bad file's clear error, as the sequential loop; and the pool really overlaps
the next file's decode with the current restore."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from dist_dejpeg.config import ModelConfig
from dist_dejpeg.models.unet import build_generator
from dist_dejpeg.restore import files
from dist_dejpeg.restore.files import restore_files
from dist_dejpeg.restore.restorer import Restorer

TINY = dict(encoder="mobilenetv3_small_050", pretrained=False, decoder_width=16)


@pytest.fixture(scope="module")
def restorer() -> Restorer:
    """A tiny generator with a randomised head (it changes the pixels), every image restored (no guard)."""
    torch.manual_seed(0)
    g = build_generator(ModelConfig(**TINY))
    nn.init.normal_(g.head.weight, std=0.02)
    return Restorer(g.eval(), device="cpu", tile=64, overlap=16, guard=False)


def _folder(root: Path) -> Path:
    """Six images of different sizes and kinds (JPEGs at two qualities, a grayscale JPEG, a PNG, an RGBA PNG)
    with an unreadable "JPEG" in the middle, one of them in a subfolder."""
    import skimage.data

    photo = skimage.data.astronaut()
    src = root / "in"
    (src / "sub").mkdir(parents=True)
    for i, (name, h, w, q) in enumerate([("a.jpg", 64, 80, 20), ("b.jpg", 96, 70, 40), ("sub/e.jpg", 72, 72, 30)]):
        Image.fromarray(photo[10 * i:10 * i + h, 50:50 + w]).save(src / name, quality=q)
    Image.fromarray(photo[:80, :60, 0]).save(src / "d_gray.jpg", quality=25)
    Image.fromarray(photo[100:164, 100:164]).save(src / "f.png")
    rgba = np.dstack([photo[:50, :70], np.full((50, 70), 200, np.uint8)])
    Image.fromarray(rgba).save(src / "g_alpha.png")
    (src / "c_broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a JPEG")
    return src


def _run(restorer, src: Path, out: Path, workers: int) -> list:
    return restore_files(restorer, [str(src)], out, progress=False, workers=workers)


def test_pool_gives_the_sequential_outputs_and_errors(tmp_path, restorer):
    src = _folder(tmp_path)
    runs = {workers: _run(restorer, src, tmp_path / f"out{workers}", workers) for workers in (0, 2, 3)}
    plain = runs[0]
    names = [Path(r.source).name for r in plain]
    assert names == ["a.jpg", "b.jpg", "c_broken.jpg", "d_gray.jpg", "f.png", "g_alpha.png", "e.jpg"]
    broken = plain[2]
    assert broken.output is None and "c_broken.jpg: not an image PIL can read" in broken.error
    written = [r for r in plain if r.output]
    assert len(written) == 6 and all(r.error is None for r in written)
    assert not (tmp_path / "out0" / "c_broken.png").exists()
    # the model changed the pixels: equal outputs are not equal inputs copied through
    a = np.asarray(Image.open(tmp_path / "out0" / "a.png"), np.int16)
    assert np.abs(a - np.asarray(Image.open(src / "a.jpg"), np.int16)).max() > 2
    fields = ("error", "quality", "quality_from", "passthrough", "note", "skipped", "megapixels")
    for workers in (2, 3):
        pooled = runs[workers]
        assert [r.source for r in pooled] == [r.source for r in plain]
        for x, y in zip(plain, pooled):
            assert {f: getattr(x, f) for f in fields} == {f: getattr(y, f) for f in fields}
            if x.output:
                rel = Path(x.output).relative_to(tmp_path / "out0")
                assert Path(y.output) == tmp_path / f"out{workers}" / rel
                assert Path(x.output).read_bytes() == Path(y.output).read_bytes(), rel
        produced = sorted(p.relative_to(tmp_path / f"out{workers}") for p in (tmp_path / f"out{workers}").rglob("*"))
        assert produced == sorted(p.relative_to(tmp_path / "out0") for p in (tmp_path / "out0").rglob("*"))


def test_pool_decodes_the_next_file_while_the_current_one_is_restored(tmp_path, monkeypatch):
    """With workers, file 2's decode starts while file 1 is being restored (the restore waits for it, on the
    calling thread); files are decoded off that thread, and a failing encode is that file's error."""
    src = tmp_path / "in"
    src.mkdir()
    for name in ("1.png", "2.png", "3.png"):
        Image.fromarray(np.full((32, 40, 3), 90, np.uint8)).save(src / name)
    started: dict[str, threading.Event] = {name: threading.Event() for name in ("1.png", "2.png", "3.png")}
    threads = []
    load_image = files.load_image

    def load(path, max_pixels, **kwargs):
        threads.append(threading.current_thread().name)
        started[Path(path).name].set()
        return load_image(path, max_pixels)

    class Waiting:
        device = "cpu"

        def __init__(self):
            self.overlapped = []

        def restore_array(self, rgb, quality=None, source="given", conformed=False):
            from dist_dejpeg.restore.guard import Decision

            self.overlapped.append(all(e.wait(10) for e in started.values()))  # every decode began meanwhile
            self.last_decision = Decision(quality, source, False, "restored")
            return 255 - rgb

    def save(rgb, path, **kwargs):  # (restore encodes, then writes the bytes itself)
        if Path(path).name == "2.png":
            raise OSError(28, "No space left on device")
        return b""

    monkeypatch.setattr(files, "load_image", load)
    monkeypatch.setattr(files, "save_image", save)
    waiting = Waiting()
    results = restore_files(waiting, [str(src)], tmp_path / "out", progress=False, workers=2)
    assert waiting.overlapped[0] and all(name.startswith("restore-io") for name in threads)
    assert [r.error for r in results] == [None, "OSError: [Errno 28] No space left on device", None]
    assert [bool(r.output) for r in results] == [True, False, True]


def test_cuda_restorer_gets_the_pool_by_default(tmp_path, monkeypatch):
    """The default: decode/encode threads for a restorer on a GPU, one per core this process may use (2 to
    MAX_IO_THREADS), none (the calling thread) on a CPU."""
    src = tmp_path / "in"
    src.mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(src / "x.png")
    seen = []
    load_image = files.load_image
    monkeypatch.setattr(files, "load_image",
                        lambda *a, **k: (seen.append(threading.current_thread().name), load_image(*a, **k))[1])

    class Copy:
        def __init__(self, device):
            self.device = device

        def restore_array(self, rgb, quality=None, source="given", conformed=False):
            from dist_dejpeg.restore.guard import Decision

            self.last_decision = Decision(quality, source, False, "copied")
            return rgb.copy()

    for device in ("cpu", "cuda:0", "cuda (onnxruntime)"):
        (result,) = restore_files(Copy(device), [str(src)], tmp_path / device.replace(" ", "_"), progress=False)
        assert result.output and result.error is None
    assert seen[0] == threading.current_thread().name and all(s.startswith("restore-io") for s in seen[1:])
    assert len(seen) == 3

    pools = []
    pool = files.ThreadPoolExecutor
    monkeypatch.setattr(files, "ThreadPoolExecutor", lambda n, **kw: (pools.append(n), pool(n, **kw))[1])
    for cores in (1, 2, 6, 32):  # (a SLURM job's share of the node: its affinity)
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid, c=cores: set(range(c)), raising=False)
        (result,) = restore_files(Copy("cuda:0"), [str(src)], tmp_path / f"cores{cores}", progress=False)
        assert result.output and result.error is None
    assert pools == [2, 2, 6, files.MAX_IO_THREADS]


def test_one_image_into_a_named_file(tmp_path, restorer, capsys):
    """-o photo.jpg with one input: that file, in its suffix's format, the same pixels as the folder's output; more
    than one input for a file name is an error before any work; an existing folder with such a name stays a folder."""
    from dist_dejpeg.restore.files import OutputError, names_a_file

    src = _folder(tmp_path)
    folder = restore_files(restorer, [str(src / "a.jpg")], tmp_path / "folder", progress=False)
    one = restore_files(restorer, [str(src / "a.jpg")], tmp_path / "new" / "clean.webp", progress=False)
    assert [r.output for r in one] == [str(tmp_path / "new" / "clean.webp")] and not one[0].error
    with Image.open(tmp_path / "new" / "clean.webp") as got, Image.open(folder[0].output) as png:
        assert got.format == "WEBP"
        np.testing.assert_array_equal(np.asarray(got), np.asarray(png))  # webp lossless
    with pytest.raises(OutputError, match="names one file, and 2 images were given"):
        restore_files(restorer, [str(src / "a.jpg"), str(src / "b.jpg")], tmp_path / "two.png", progress=False)
    assert not (tmp_path / "two.png").exists()
    (tmp_path / "dir.png").mkdir()
    assert names_a_file(tmp_path / "x.PNG") and not names_a_file(tmp_path / "dir.png")
    assert not names_a_file(tmp_path / "out") and not names_a_file(tmp_path / "x.txt")
    kept = restore_files(restorer, [str(src / "a.jpg")], tmp_path / "dir.png", progress=False)
    assert Path(kept[0].output) == tmp_path / "dir.png" / "a.png"
    from dist_dejpeg.cli import main  # the command says so before it loads a model

    for extra, said in ((["--format", "jpg"], "--format is for an output folder"),
                        (["-i", str(src / "b.jpg")], "names one image file, and 2 images were given")):
        with pytest.raises(SystemExit) as stop:
            main(["restore", "--model", str(tmp_path / "none"), str(src / "a.jpg"), "-o", str(tmp_path / "y.png"),
                  *extra])
        assert stop.value.code == 2 and said in capsys.readouterr().err
    assert not (tmp_path / "y.png").exists()


def test_pixel_limit_nested_by_threads_puts_back_what_it_found():
    """Two threads open images at once, entering and leaving pixel_limit in crossed order (A in, B in, A out,
    B out): warnings.catch_warnings put back the filters each found, so B's exit re-installed A's silencing for
    good (and PIL's limit A had raised). The last to leave now puts back what the first found."""
    import threading
    import warnings

    from PIL import Image

    from dist_dejpeg.restore.images import pixel_limit

    filters, limit = warnings.filters[:], Image.MAX_IMAGE_PIXELS
    b_in, a_out = threading.Event(), threading.Event()
    seen = []  # what thread b found inside (asserted here: an assert in a thread fails nothing)

    def a():
        with pixel_limit(200_000_000):
            b_in.wait(10)
        a_out.set()

    def b():
        with pixel_limit(300_000_000):
            b_in.set()
            a_out.wait(10)
            seen.append((Image.MAX_IMAGE_PIXELS,
                         any(f[2] is Image.DecompressionBombWarning for f in warnings.filters)))

    _run_together(a, b)
    assert seen == [(300_000_000, True)]  # (each thread's limit and the silencing hold while it is inside)
    assert warnings.filters == filters and Image.MAX_IMAGE_PIXELS == limit
    with pixel_limit(10):  # a filter added inside by someone else stays when it ends
        warnings.filterwarnings("ignore", message="kept by its owner")
    assert warnings.filters[0][1].pattern == "kept by its owner" and warnings.filters[1:] == filters
    warnings.filters.pop(0)


def test_pixel_limit_never_lowers_a_users_own_higher_limit_nor_takes_their_filter_away(monkeypatch):
    """A user who raised PIL's limit to 10^9 (their scans are that big) keeps it inside restore's pixel_limit(10),
    not lowered to the file's; and a user who ignored DecompressionBombWarning themselves keeps that filter when
    pixel_limit leaves (pixel_limit's own is the same entry, found there: not its to remove)."""
    import warnings

    from PIL import Image

    from dist_dejpeg.restore.images import pixel_limit

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10**9)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the user's own
        with pixel_limit(10):
            assert Image.MAX_IMAGE_PIXELS == 10**9
            assert any(f[2] is UserWarning and f[3] is not None and "Tiff" in f[3].pattern for f in warnings.filters)
        assert Image.MAX_IMAGE_PIXELS == 10**9
        assert warnings.filters[0][:3] == ("ignore", None, Image.DecompressionBombWarning)


def test_decode_rgb8_beside_pixel_limit_defeats_neither_and_puts_the_limit_back(monkeypatch):
    """prepare's decode_rgb8 lifted PIL's limit (a global) and put back what it had found, with no lock, beside
    restore's pixel_limit: in this order (decode in, restore's pixel_limit in, decode out), the decode put back
    PIL's default while restore was inside (its raised limit and its warning filters gone: catch_warnings put back
    the list it had found), and restore's exit put back the "no limit" it had found: PIL's limit off for good."""
    import io
    import threading
    import warnings

    from PIL import Image

    from dist_dejpeg.data.images import decode_rgb8
    from dist_dejpeg.restore.images import pixel_limit

    filters, limit = warnings.filters[:], Image.MAX_IMAGE_PIXELS
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, format="PNG")
    decode_in, restore_in, decode_out = threading.Event(), threading.Event(), threading.Event()
    opened, seen = Image.open, []

    def held_open(*args, **kwargs):  # the decode stays inside until restore's pixel_limit is
        decode_in.set()
        restore_in.wait(10)
        return opened(*args, **kwargs)

    monkeypatch.setattr(Image, "open", held_open)

    def decode():
        seen.append(decode_rgb8(buf.getvalue(), 100).shape)
        decode_out.set()

    def restore():
        decode_in.wait(10)
        with pixel_limit(300_000_000):
            restore_in.set()
            decode_out.wait(10)
            seen.append((Image.MAX_IMAGE_PIXELS is None or Image.MAX_IMAGE_PIXELS >= 300_000_000,
                         any(f[2] is Image.DecompressionBombWarning for f in warnings.filters)))

    _run_together(decode, restore)
    assert seen == [(8, 8, 3), (True, True)]  # (restore's limit and silencing held after the decode left)
    assert Image.MAX_IMAGE_PIXELS == limit and warnings.filters == filters


def test_decode_rgb8_without_max_pixels_keeps_pils_own_limit(monkeypatch):
    """(PIL's limit is lifted while decode_rgb8 opens a file: without max_pixels, the limit its user set is
    checked from the header instead, as PIL's warning, made an error, did.)"""
    import io

    from PIL import Image

    from dist_dejpeg.data.images import BadImage, decode_rgb8

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 80)
    buf = io.BytesIO()
    Image.new("RGB", (10, 10)).save(buf, format="PNG")
    with pytest.raises(BadImage, match=r"10 x 10 .* over the 8e-05 MP limit \(PIL's decompression-bomb limit\)"):
        decode_rgb8(buf.getvalue())
    assert decode_rgb8(buf.getvalue(), 100).shape == (10, 10, 3) and Image.MAX_IMAGE_PIXELS == 80


def test_a_wide_pool_decodes_at_most_loads_ahead(tmp_path, monkeypatch):
    """Many threads (a GPU's default) encode many outputs at once, but decode at most LOADS_AHEAD files beyond the
    one being restored: decoded images waiting for the model are memory (a 12 MP photo and its cells ~70 MB)."""
    src = tmp_path / "in"
    src.mkdir()
    for i in range(7):
        Image.fromarray(np.full((16, 16, 3), 10 * i, np.uint8)).save(src / f"{i}.png")
    loaded, restored = [], []
    load_image = files.load_image
    monkeypatch.setattr(files, "load_image", lambda *a, **k: (loaded.append(a[0]), load_image(*a, **k))[1])

    class Counting:
        device = "cuda:0"

        def restore_array(self, rgb, quality=None, source="given", conformed=False):
            from dist_dejpeg.restore.guard import Decision

            deadline = time.monotonic() + 5
            while len(loaded) < min(7, len(restored) + 1 + files.LOADS_AHEAD) and time.monotonic() < deadline:
                time.sleep(0.01)  # (the pool's threads start every load they were given)
            time.sleep(0.1)  # (and would have started more, were more given)
            restored.append(len(loaded))
            self.last_decision = Decision(quality, source, False, "copied")
            return rgb.copy()

    results = restore_files(Counting(), [str(src)], tmp_path / "out", progress=False, workers=6)
    assert all(r.output for r in results) and restored[0] == 1 + files.LOADS_AHEAD, restored
    assert all(n <= i + 1 + files.LOADS_AHEAD for i, n in enumerate(restored)), restored


def test_outputs_being_encoded_stay_within_a_pixel_budget(tmp_path, monkeypatch):
    """Many threads encode many outputs at once, but not more pixels than SAVE_PIXELS together (each holds its
    image, its input and its cells: a folder of 100 MP scans must not hold 8 of them, nor 2), and always one."""
    src = tmp_path / "in"
    src.mkdir()
    for i in range(8):
        Image.fromarray(np.full((16, 16, 3), 10 * i, np.uint8)).save(src / f"{i}.png")
    lock, running, most = threading.Lock(), [0], [0]

    def save(rgb, path, **kwargs):
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        time.sleep(0.05)
        with lock:
            running[0] -= 1
        return b""

    class Copy:
        device = "cuda:0"

        def restore_array(self, rgb, quality=None, source="given", conformed=False):
            from dist_dejpeg.restore.guard import Decision

            self.last_decision = Decision(quality, source, False, "copied")
            return rgb.copy()

    monkeypatch.setattr(files, "save_image", save)
    for budget, bound in ((files.SAVE_PIXELS, None), (16 * 16 + 1, 1)):
        monkeypatch.setattr(files, "SAVE_PIXELS", budget)
        most[0] = 0
        results = restore_files(Copy(), [str(src)], tmp_path / f"out{budget}", progress=False, workers=6)
        assert all(r.error is None for r in results)
        assert most[0] >= 3 if bound is None else most[0] <= bound, (budget, most[0])


def _run_together(*targets) -> None:
    """Run ``targets`` on threads of their own, all started before any is joined; each must end within 20 s."""
    import threading

    threads = [threading.Thread(target=t) for t in targets]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
        assert not t.is_alive()
