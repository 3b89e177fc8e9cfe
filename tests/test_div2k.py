"""DIV2K preparation on a miniature DIV2K (real photographs from scikit-image, packed as the official zips)
served by a local HTTP server on 127.0.0.1: download with resume and checksum, tiling, shards, manifest,
idempotent reruns, interrupted runs, rejected sources."""

from __future__ import annotations

import hashlib
import io
import json
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import skimage.data
from PIL import Image

from dist_dejpeg.cli import main
from dist_dejpeg.data import div2k
from dist_dejpeg.data.dali import HAVE_DALI
from dist_dejpeg.data.download import DownloadError, download
from dist_dejpeg.data.images import decode_component, decode_rgb8, image_bytes
from dist_dejpeg.data.reading import shard_keys
from dist_dejpeg.data.shards import list_shards, tile_positions, tiles

DATA = Path(skimage.data.__file__).parent
TRAIN = {"0001": "astronaut", "0002": "coffee", "0003": "motorcycle_left", "0004": "ihc"}
VAL = {"0801": "chelsea"}
TILE, STEP = 128, 96


def png_bytes(name: str) -> bytes:
    return (DATA / f"{name}.png").read_bytes()


def make_zip(path: Path, folder: str, members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as archive:
        archive.writestr(f"{folder}/", b"")
        for name, data in members.items():
            archive.writestr(f"{folder}/{name}.png", data)
    path.write_bytes(buf.getvalue())
    return buf.getvalue()


@pytest.fixture(scope="module")
def archives(tmp_path_factory) -> dict[str, bytes]:
    here = tmp_path_factory.mktemp("served")
    tiny = io.BytesIO()
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(tiny, "PNG")
    train = {k: png_bytes(v) for k, v in TRAIN.items()} | {"0005": b"not a png", "0006": tiny.getvalue()}
    return {"train": make_zip(here / "DIV2K_train_HR.zip", "DIV2K_train_HR", train),
            "val": make_zip(here / "DIV2K_valid_HR.zip", "DIV2K_valid_HR", {k: png_bytes(v) for k, v in VAL.items()})}


class Server:
    """Serves byte strings by path on 127.0.0.1, honouring `Range: bytes=N-`, recording requests."""

    def __init__(self, files: dict[str, bytes]):
        self.files, self.ranges = files, []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - http.server's naming
                data = outer.files.get(self.path)
                if data is None:
                    self.send_error(404)
                    return
                start = 0
                header = self.headers.get("Range")
                outer.ranges.append(header)
                if header:
                    start = int(header.split("=")[1].rstrip("-"))
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                self.send_header("Content-Length", str(len(data) - start))
                self.end_headers()
                self.wfile.write(data[start:])

            def log_message(self, *args):  # quiet
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()


@pytest.fixture()
def server(archives):
    srv = Server({"/DIV2K_train_HR.zip": archives["train"], "/DIV2K_valid_HR.zip": archives["val"]})
    yield srv
    srv.close()


def remote(server: Server, archives: dict) -> dict:
    return {split: div2k.RemoteFile(f"{server.url}/{div2k.ARCHIVE[split]}.zip",
                                    hashlib.sha256(archives[split]).hexdigest(), len(archives[split]))
            for split in ("train", "val")}


def test_download_resumes_a_partial_file_and_verifies(tmp_path, server, archives):
    data = archives["val"]
    dest = tmp_path / "DIV2K_valid_HR.zip"
    (tmp_path / "DIV2K_valid_HR.zip.part").write_bytes(data[:1000])
    download(f"{server.url}/DIV2K_valid_HR.zip", dest, hashlib.sha256(data).hexdigest(), len(data), progress=False)
    assert dest.read_bytes() == data
    assert server.ranges == ["bytes=1000-"]
    assert not (tmp_path / "DIV2K_valid_HR.zip.part").exists()


def test_download_rejects_a_bad_checksum_and_cleans_up(tmp_path, server, archives):
    dest = tmp_path / "x.zip"
    with pytest.raises(DownloadError, match="SHA-256"):
        download(f"{server.url}/DIV2K_valid_HR.zip", dest, "0" * 64, None, progress=False)
    assert not dest.exists() and not (tmp_path / "x.zip.part").exists()
    with pytest.raises(DownloadError, match="404"):
        download(f"{server.url}/missing.zip", dest, None, None, progress=False)


def test_prepare_div2k_from_served_zips(tmp_path, server, archives):
    out = tmp_path / "shards"
    manifest = div2k.prepare_div2k(tmp_path / "src", out, download_missing=True, tile=TILE, step=STEP,
                                   shard_size=16, workers=2, remote=remote(server, archives), progress=False)
    # downloaded, verified archives are recorded by checksum
    assert manifest["inputs"]["train"]["sha256"] == hashlib.sha256(archives["train"]).hexdigest()
    # the corrupt and the too-small source are rejected and listed, the rest tiled
    reasons = {r["source"].rsplit("/", 1)[-1]: r["reason"] for r in manifest["rejected"]}
    assert set(reasons) == {"0005.png", "0006.png"}
    assert "undecodable" in reasons["0005.png"] and "smaller" in reasons["0006.png"]
    assert set(manifest["sources"]) == set(TRAIN) | set(VAL)
    for split in ("train", "val"):
        found = list_shards(out, f"{split}-*.tar")
        assert [Path(p).name for p in found] == manifest["splits"][split]["shards"]
        keys = [k for p in found for k in shard_keys(p)]
        assert len(keys) == len(set(keys)) == manifest["splits"][split]["samples"]
        if HAVE_DALI:  # DALI index files beside every shard
            assert all(Path(p).with_suffix(".idx").is_file() for p in found)
    # lossless: a tile in a shard equals the same window of the source photograph
    rgb = decode_rgb8(png_bytes("coffee"))
    expected = list(tiles(rgb, TILE, STEP))
    import webdataset as wds

    seen = 0
    for p in list_shards(out, "train-*.tar"):
        for sample in wds.tariterators.tarfile_samples([{"url": p}]):
            if sample and sample["__key__"].startswith("0002_s"):
                index = int(sample["__key__"].split("_s")[1])
                assert np.array_equal(decode_component(*image_bytes(sample)), expected[index])
                seen += 1
    assert seen == len(expected) == manifest["sources"]["0002"]["tiles"]
    # the file's hash and its pixels' (evaluate tells the photo, or a converted copy of it, as one trained on)
    assert manifest["sources"]["0002"]["pixels_sha256"] == hashlib.sha256(rgb.tobytes()).hexdigest()
    assert manifest["sources"]["0002"]["sha256"] == hashlib.sha256(png_bytes("coffee")).hexdigest()
    # validation's tiles do not overlap (a tile flush with the edge repeated up to 83% of its neighbour, and the
    # guard's lower bound counted those crops as independent): every val tile is a disjoint window of its photo
    assert tile_positions(600, 128, 128, flush=False) == [0, 128, 256, 384] and tile_positions(600, 128, 128)[-1] == 472
    for name, info in manifest["sources"].items():
        if info["split"] == "val":
            h, w = info["height"], info["width"]
            assert info["tiles"] == (h // TILE) * (w // TILE), name
    # train is shuffled across images at prepare time; val stays in order
    first = shard_keys(list_shards(out, "train-*.tar")[0])
    assert len({k.split("_s")[0] for k in first}) > 1
    assert not (out / ".staging").exists()


def test_prepare_div2k_is_idempotent_and_finishes_interrupted_runs(tmp_path, archives):
    src = tmp_path / "src"
    src.mkdir()
    for split in ("train", "val"):
        (src / f"{div2k.ARCHIVE[split]}.zip").write_bytes(archives[split])
    out = tmp_path / "shards"
    kw = dict(tile=TILE, step=STEP, shard_size=16, workers=1, progress=False)
    first = div2k.prepare_div2k(src, out, keep_staging=True, **kw)
    shard = out / first["splits"]["train"]["shards"][1]
    stamp = shard.stat().st_mtime_ns
    # interrupted run: manifest gone, one shard gone, a half-written temp shard left behind
    (out / "manifest.json").unlink()
    (out / first["splits"]["train"]["shards"][0]).unlink()
    (out / ".train-000002.tar.tmp999").write_bytes(b"half")
    again = div2k.prepare_div2k(src, out, **kw)
    assert again["splits"] == first["splits"]
    assert shard.stat().st_mtime_ns == stamp, "a finished shard of the same plan is not rewritten"
    assert (out / first["splits"]["train"]["shards"][0]).is_file()
    assert not list(out.glob(".*.tmp*"))
    # complete: a rerun does nothing
    assert div2k.prepare_div2k(src, out, **kw) == again
    assert shard.stat().st_mtime_ns == stamp
    # the plan names the tiling: an interrupted run with another --tile of as many tiles per image (the same keys)
    # kept the shards of the old size beside the new ones
    (out / "manifest.json").unlink()
    div2k.prepare_div2k(src, out, keep_staging=True, **kw)
    plan = json.loads((out / ".staging" / "plan-train.json").read_text())
    assert (plan["tile"], plan["step"], plan["flush"]) == (TILE, STEP, True)
    assert json.loads((out / ".staging" / "plan-val.json").read_text())["flush"] is False


def test_prepare_div2k_cli_reads_extracted_folders(tmp_path, archives, capsys):
    src = tmp_path / "src"
    for split in ("train", "val"):
        with zipfile.ZipFile(io.BytesIO(archives[split])) as archive:
            archive.extractall(src)
    rc = main(["prepare", "div2k", "--root", str(src), "--out", str(tmp_path / "out"), "--tile", str(TILE),
               "--step", str(STEP), "--shard-size", "32", "--workers", "1"])
    assert rc == 0
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["inputs"]["train"]["files"] == len(TRAIN) + 2
    assert manifest["splits"]["val"]["samples"] > 0
    assert "rejected 0005.png" in capsys.readouterr().err.replace(str(src / "DIV2K_train_HR") + "/", "")


def test_prepare_div2k_without_inputs_names_what_is_missing(tmp_path, capsys):
    rc = main(["prepare", "div2k", "--root", str(tmp_path), "--out", str(tmp_path / "out")])
    assert rc == 2
    err = capsys.readouterr().err
    assert "DIV2K_train_HR.zip" in err and "--download" in err


def test_div2k_recipe_trains_on_prepared_shards(tmp_path, archives):
    """configs/div2k.yaml, shrunk to CPU size, reads the DIV2K shards through the same loader."""
    from accelerate.state import AcceleratorState, GradientState

    src = tmp_path / "src"
    src.mkdir()
    for split in ("train", "val"):
        (src / f"{div2k.ARCHIVE[split]}.zip").write_bytes(archives[split])
    div2k.prepare_div2k(src, tmp_path / "shards", tile=TILE, step=STEP, shard_size=16, workers=1, progress=False)
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    config = Path(__file__).parents[1] / "configs" / "div2k.yaml"
    rc = main(["train", "--config", str(config), f"data.root={tmp_path / 'shards'}", f"train.run_dir={tmp_path / 'run'}",
               "data.crop=64", "data.batch_size=2", "data.num_workers=0", "data.val_crop=64", "data.val_max_images=3",
               "model.pretrained=false", "model.decoder_width=16", "model.channels_last=false", "critic.width=8",
               "loss.lpips_pretrained=false", "loss.lpips_net=alex", "train.mixed_precision=no", "train.progress=false",
               "train.phases.gen.steps=2", "train.phases.critic.steps=1", "train.phases.gan.steps=2",
               "train.phases.gan.val_every=1", "train.compile=false"])  # compiling on 2 cores takes minutes
    assert rc == 0
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert set(metrics) == {"q10", "q20", "q30", "q40", "q60", "q80", "q90", "meta"}
    assert metrics["meta"]["val_images_per_quality"] == 3


def test_prepare_div2k_rerun_with_other_settings_never_leaves_a_stale_manifest(tmp_path, archives, monkeypatch):
    """A rerun with other settings removes the old manifest before it changes any shard: interrupted, the folder
    has no manifest (a rerun finishes it), never one that describes other shards; finished, no temp file is left."""
    src = tmp_path / "src"
    src.mkdir()
    for split in ("train", "val"):
        (src / f"{div2k.ARCHIVE[split]}.zip").write_bytes(archives[split])
    out = tmp_path / "shards"
    kw = dict(tile=TILE, step=STEP, workers=1, progress=False)
    div2k.prepare_div2k(src, out, shard_size=16, keep_staging=True, **kw)
    pack = div2k._pack

    def interrupted(out_, split, *args):
        if split == "val":
            raise KeyboardInterrupt
        return pack(out_, split, *args)

    monkeypatch.setattr(div2k, "_pack", interrupted)
    with pytest.raises(KeyboardInterrupt):
        div2k.prepare_div2k(src, out, shard_size=8, **kw)
    assert not (out / "manifest.json").exists()
    monkeypatch.setattr(div2k, "_pack", pack)
    (out / ".manifest.json.tmp123").write_bytes(b"half")
    manifest = div2k.prepare_div2k(src, out, shard_size=8, **kw)
    for split in ("train", "val"):
        assert [Path(p).name for p in list_shards(out, f"{split}-*.tar")] == manifest["splits"][split]["shards"]
    assert not list(out.glob(".*.tmp*"))


def test_div2k_names_are_unique_and_settings_checked_first(tmp_path):
    """Two files of one name in sub-folders of the extracted folder keep one sample-key stem each; a shard size
    below 1 is refused before anything is made."""
    from dist_dejpeg.data.shards import PrepareError

    folder = tmp_path / div2k.ARCHIVE["train"]
    for rel in ("0001.png", "a/0001.png", "0001-2.png"):
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_bytes(b"x")
    sources, _ = div2k.find_sources(tmp_path, "train")
    assert sorted(s.name for s in sources) == ["0001", "0001-2", "0001-3"]
    with pytest.raises(PrepareError, match="shard_size"):
        div2k.prepare_div2k(tmp_path, tmp_path / "out", shard_size=-1)
    assert not (tmp_path / "out").exists()
    (tmp_path / "file").write_text("x")  # the API too, not only the CLI, says what is wrong with --out
    with pytest.raises(PrepareError, match=r"--out .*file is a file, not a folder"):
        div2k.prepare_div2k(tmp_path, tmp_path / "file")
    assert main(["prepare", "div2k", "--root", str(tmp_path), "--out", str(tmp_path / "file")]) == 2


def test_prepare_div2k_offline_says_how_to_bring_the_archives_in(tmp_path, capsys, monkeypatch):
    """A cluster node without internet: one line that says where to put the zips, not a urlopen error alone."""
    import socket

    with socket.socket() as s:  # a port nothing listens on: the connection is refused, as offline
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dead = {split: div2k.RemoteFile(f"http://127.0.0.1:{port}/{div2k.ARCHIVE[split]}.zip", None, None)
            for split in ("train", "val")}
    monkeypatch.setattr(div2k, "OFFICIAL", dead)
    rc = main(["prepare", "div2k", str(tmp_path / "src"), "--out", str(tmp_path / "out"), "--download"])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    assert "cannot connect" in err and f"put DIV2K_train_HR.zip (or its extracted folder) into {tmp_path / 'src'}" in err
    assert not (tmp_path / "out").exists()  # (an empty --out was left behind)
    (tmp_path / "old").mkdir()  # a folder prepared with other settings keeps its manifest when nothing can be built
    (tmp_path / "old" / "manifest.json").write_text(json.dumps({"settings": {"tile": 96}, "splits": {}}))
    assert main(["prepare", "div2k", str(tmp_path / "src"), "--out", str(tmp_path / "old"), "--download"]) == 2
    assert (tmp_path / "old" / "manifest.json").is_file()


def test_prepare_div2k_a_cut_short_zip_is_one_line_and_a_damaged_member_is_rejected(tmp_path, archives, capsys):
    """An interrupted copy of the zip (no table of contents) is a one-line error naming it; a member whose bytes are
    damaged (CRC) is a rejected source, not a traceback from the tiling pool."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "DIV2K_valid_HR.zip").write_bytes(archives["val"])
    (src / "DIV2K_train_HR.zip").write_bytes(archives["train"][: len(archives["train"]) // 2])
    rc = main(["prepare", "div2k", str(src), "--out", str(tmp_path / "out"), "--tile", str(TILE), "--workers", "1"])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err and "DIV2K_train_HR.zip is not a whole zip archive" in err
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as archive:
        for name, photo in (("0001", "astronaut"), ("0002", "coffee")):
            archive.writestr(f"DIV2K_train_HR/{name}.png", png_bytes(photo))
    data = bytearray(buf.getvalue())
    data[200] ^= 0xFF  # inside 0001.png's stored bytes
    (src / "DIV2K_train_HR.zip").write_bytes(bytes(data))
    manifest = div2k.prepare_div2k(src, tmp_path / "out", tile=TILE, step=STEP, workers=1, progress=False)
    assert [r["source"] for r in manifest["rejected"]] == ["DIV2K_train_HR/0001.png"]
    assert "unreadable: BadZipFile" in manifest["rejected"][0]["reason"] and "0002" in manifest["sources"]
