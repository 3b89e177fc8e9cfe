"""The `dist-dejpeg` command as a user runs it (issue 22): the console script's --version, errors with the
subcommand's usage, status --json errors as JSON; restore's Real-ESRGAN aliases, output names (sub-folders of
folders and globs, --suffix, colliding names kept apart), output formats with their metadata, and
--skip-existing reported as skipped. What needs no console script runs in-process (cli.main)."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageCms, JpegImagePlugin

import dist_dejpeg
from dist_dejpeg.cli import COMMANDS, build_parser, main
from dist_dejpeg.jpeg.quality import estimate_from_tables
from dist_dejpeg.restore.files import restore_files
from dist_dejpeg.restore.inputs import output_names
from dist_dejpeg.restore.images import output_complete

from test_evaluate import model_file  # noqa: F401 - the module-scoped tiny generator file
from test_faults_restore import GPS, GPS_IFD, Identity, _photo
from test_trainer import fresh_accelerator_state  # noqa: F401 - autouse: in-process runs reset Accelerate's state

ROOT = Path(__file__).resolve().parents[1]
SRGB = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()


def console_script() -> str:
    found = shutil.which("dist-dejpeg") or str(Path(sys.executable).parent / "dist-dejpeg")
    if not Path(found).exists():
        pytest.skip("the dist-dejpeg console script is not installed (pip install -e .)")
    return found


def run_shell(script: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{Path(console_script()).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    return subprocess.run(["bash", "-c", script], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def camera_jpeg(path: Path, rgb: np.ndarray, quality: int = 30, gps: bool = True) -> Path:
    """A JPEG with a camera's EXIF (IFD0; the GPS sub-IFD when ``gps``) and an sRGB profile."""
    exif = Image.Exif()
    exif[0x010F], exif[0x0110] = "Canon", "EOS 5D"
    if gps:
        exif[GPS_IFD] = GPS
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgb).save(path, format="JPEG", quality=quality, exif=exif, icc_profile=SRGB)
    return path


def is_libjpeg_444(path: Path, quality: int) -> bool:
    with Image.open(path) as im:
        est = estimate_from_tables(im.quantization)
        return im.format == "JPEG" and est.exact and est.quality == quality and JpegImagePlugin.get_sampling(im) == 0


def test_console_script_version_errors_and_status_json(tmp_path):
    """Three commands users type first, none importing torch: one shell, three starts."""
    done = run_shell("dist-dejpeg --version; dist-dejpeg restore in -o out --model m --bogus; echo rc=$?; "
                     "dist-dejpeg status nowhere --json; echo rc=$?; python -m dist_dejpeg --version", tmp_path)
    out = done.stdout.splitlines()
    import tomllib

    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert dist_dejpeg.__version__ == declared  # the fallback agrees with the package metadata's source
    assert out[0] == f"dist-dejpeg {dist_dejpeg.version()}" and dist_dejpeg.version() == declared, out
    assert out[1] == "rc=2" and out[3] == "rc=2", out
    assert out[4] == out[0], out  # python -m dist_dejpeg: the same command
    # the subcommand's usage and error, not the top level's
    assert "usage: dist-dejpeg restore" in done.stderr and "dist-dejpeg restore: error: unrecognized arguments: --bogus" \
        in done.stderr, done.stderr
    assert "{prepare,train" not in done.stderr and "COMMAND ..." not in done.stderr
    error = json.loads(out[2])
    assert list(error) == ["run_dir", "error"] and "nowhere" in error["error"], out[2]


def test_console_script_restore_aliases_names_jpeg_metadata_and_skip_existing(tmp_path, model_file):  # noqa: F811
    """`restore GLOB -i FOLDER -o OUT --format jpg --suffix restored`, then the same with Real-ESRGAN's names
    (--input, --output, --ext) and --skip-existing --quiet: every input gets its own output, sub-folders kept
    for the folder and the glob, each below its name, the JPEG outputs keep EXIF and ICC; the second run skips them all and says so,
    on one line."""
    rgb = _photo(40, 56)
    camera_jpeg(tmp_path / "in" / "camera.jpg", rgb)
    for name in ("good.jpg", "good.JPEG"):
        Image.fromarray(rgb).save(tmp_path / "in" / name, format="JPEG", quality=25)
    Image.fromarray(rgb).save(tmp_path / "in" / "good.png")
    for where in ("sub folder/inner1.jpg", "other/outer.jpg"):
        (tmp_path / "glob" / where).parent.mkdir(parents=True)
        Image.fromarray(rgb).save(tmp_path / "glob" / where, quality=25)
    model = str(model_file)
    done = run_shell(f"dist-dejpeg restore 'glob/**/inner*.jpg' -i in -o out --format jpg --suffix restored "
                     f"--model '{model}' --tile 0 --no-guard --quiet; echo rc=$?; "
                     f"dist-dejpeg restore 'glob/**/inner*.jpg' --input in --output out --ext jpg --suffix restored "
                     f"--model '{model}' --tile 0 --skip-existing --quiet; echo rc=$?", tmp_path)
    first, second = done.stdout.split("rc=0\n")[:2]
    expected = {"in/camera_restored.jpg", "in/good.jpg_restored.jpg", "in/good.JPEG_restored.jpg",
                "in/good.png_restored.jpg", "glob/sub folder/inner1_restored.jpg"}  # (two folders: each below its name)
    written = {str(p.relative_to(tmp_path / "out")) for p in (tmp_path / "out").rglob("*") if p.is_file()} - {
        "restore-record.jsonl"}  # (restore's record of each file)
    assert written == expected, (written, done.stdout, done.stderr)
    assert first.strip().startswith("restored 5 image(s)") and first.strip().endswith("0 failed"), done.stderr
    assert all(is_libjpeg_444(tmp_path / "out" / name, 95) for name in expected)
    with Image.open(tmp_path / "out" / "in" / "camera_restored.jpg") as out:
        exif = out.getexif()
        assert out.info.get("icc_profile") == SRGB and exif[0x010F] == "Canon" and exif.get_ifd(GPS_IFD) == GPS
    lines = second.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("restored 0 image(s)") and "skipped 5 existing" in lines[0], second


def test_restore_aliases_mean_the_native_options(tmp_path, monkeypatch, capsys):
    """-i with positionals, --ext auto (= same), --fp32, --tile-pad P (= --overlap 2P), the hidden --quality:
    the restorer and restore_files get what the native names give; contradictions are usage errors (exit 2)."""
    import dist_dejpeg.restore.restorer as restorer_module

    made = []

    class Fake(Identity):
        def __init__(self, model, **kwargs):
            made.append(kwargs)

    seen = []
    monkeypatch.setattr(restorer_module, "Restorer", Fake)
    monkeypatch.setattr(Fake, "restore_array", lambda self, rgb, quality=None, source="given", conformed=False: (
        seen.append((quality, source)), Identity.restore_array(self, rgb, quality, source))[1])
    src = tmp_path / "a"
    src.mkdir()
    Image.fromarray(_photo(24, 24)).save(src / "x.jpg", quality=40)
    Image.fromarray(_photo(24, 32)).save(tmp_path / "y.png")
    assert main(["restore", str(tmp_path / "y.png"), "-i", str(src), "--output", str(tmp_path / "out"), "--ext",
                 "auto", "--fp32", "--tile-pad", "16", "--quality", "30", "--model", "m", "--quiet"]) == 0
    assert made[-1]["precision"] == "fp32" and made[-1]["overlap"] == 32
    assert seen == [(30, "given"), (30, "given")]
    assert sorted(p.name for p in (tmp_path / "out").glob("*.*g")) == ["x.jpg", "y.png"]  # auto: their own formats
    capsys.readouterr()
    for bad in (["--tile-pad", "16", "--overlap", "64"], ["--format", "png", "--output-quality", "80"],
                ["--input-quality", "0"], ["--tile", "64", "--tile-pad", "16"]):  # (its overlap 32, never typed)
        with pytest.raises(SystemExit) as caught:
            main(["restore", str(src), "-o", str(tmp_path / "o2"), "--model", "m", *bad])
        assert caught.value.code == 2, bad
        assert "usage: dist-dejpeg restore" in capsys.readouterr().err, bad
    for bad in (["--suffix", "a/b"], ["--suffix=../up"]):  # a ValueError traceback from pathlib, exit 1
        with pytest.raises(SystemExit) as caught:
            main(["restore", str(src), "-o", str(tmp_path / "o3"), "--model", "m", *bad])
        assert caught.value.code == 2 and "cannot hold a /" in capsys.readouterr().err, bad
    # one output file: --output-quality is its suffix's (it was refused as "--format png is lossless")
    for name, quality, code in (("one.jpg", 80, 0), ("one.webp", 70, 0), ("one.png", 80, 2)):
        if code:
            with pytest.raises(SystemExit) as caught:
                main(["restore", str(src / "x.jpg"), "-o", str(tmp_path / name), "--model", "m",
                      "--output-quality", str(quality)])
            assert caught.value.code == 2 and f"{tmp_path / name} is lossless" in capsys.readouterr().err
            continue
        assert main(["restore", str(src / "x.jpg"), "-o", str(tmp_path / name), "--model", "m", "--quiet",
                     "--output-quality", str(quality)]) == 0
    assert estimate_from_tables(Image.open(tmp_path / "one.jpg").quantization).quality == 80
    # -o out.png/ is a folder, written as one: the output goes inside it under the input's name
    assert main(["restore", str(src / "x.jpg"), "-o", str(tmp_path / "out.png") + "/", "--model", "m", "--quiet"]) == 0
    assert (tmp_path / "out.png").is_dir() and (tmp_path / "out.png" / "x.png").is_file()
    # -o out.xyz for one photo: a file meant in a type restore does not write, not a folder made of that name
    with pytest.raises(SystemExit) as caught:
        main(["restore", str(src / "x.jpg"), "-o", str(tmp_path / "out.xyz"), "--model", "m"])
    assert caught.value.code == 2 and "restore writes no .xyz files" in capsys.readouterr().err
    assert not (tmp_path / "out.xyz").exists()
    assert main(["restore", str(src / "x.jpg"), "-o", str(tmp_path / "out.v2") + "/", "--model", "m", "--quiet"]) == 0
    with pytest.raises(SystemExit) as caught:  # stdout is no image file: not a folder named "-"
        main(["restore", str(src / "x.jpg"), "-o", "-", "--model", "m"])
    assert caught.value.code == 2 and "not to standard output" in capsys.readouterr().err and not Path("-").exists()
    parsed = build_parser().parse_args(["evaluate", "--model", "m", "--images", "p", "-o", "e", "--quality", "10", "20"])
    assert parsed.qualities == [10, 20]  # the old name, hidden


def test_every_help_shows_defaults_and_plain_text():
    parser = build_parser()
    top = parser.format_help()
    assert "``" not in top and "`" not in top and "restore" in top and "--version" in top
    for name, command in parser.commands.items():
        text = command.format_help()
        assert "(default: None)" not in text and "(default: False)" not in text, name
        assert "(default: " in text or name in ("train", "export", "status", "bench"), name  # those: none to show
    restore = parser.commands["restore"].format_help()
    for words in ("a multiple of 32, at least 64", "(default: 512)", "(default: 64)", "1 on the CPU",
                  "4:4:4", "--tile-pad", "--input-quality", "--suffix", "--ext", "--fp32"):
        assert words in restore, words
    assert "--quality " not in restore and "--quality " not in parser.commands["evaluate"].format_help()
    assert "(default: 192)" in parser.commands["report"].format_help()


def test_help_shows_zero_defaults_and_exit_codes_and_counts_below_one_are_usage_errors(tmp_path, capsys):
    """A default of 0 was hidden (0 == False); train and restore say their exit codes; -o works for prepare and
    export as for the other commands; a batch of 0 tiles or a pixel limit of 0 was taken (every image then failed)."""
    parser = build_parser()
    prepare, evaluate = (parser.commands[name].format_help() for name in ("prepare", "evaluate"))
    assert "and the training tiles' shuffle (default: 0)" in " ".join(prepare.split())
    assert "-o OUT, --out OUT" in prepare
    assert "(0: all) (default: 0)" in " ".join(evaluate.split())
    for name, words in (("train", "75 a stop"), ("restore", "1 some failed")):
        assert "exit codes: 0 " in parser.commands[name].format_help() and words in parser.commands[name].format_help()
    assert parser.parse_args(["prepare", "samples", "-o", "d"]).out == "d"
    assert parser.parse_args(["export", "--model", "m", "-o", "m.onnx"]).onnx == "m.onnx"
    for bad in (["--batch-size", "0"], ["--batch-size", "-2"], ["--max-pixels", "0"]):
        with pytest.raises(SystemExit) as caught:
            main(["restore", "x.jpg", "-o", str(tmp_path / "out"), "--model", "m", *bad])
        assert caught.value.code == 2 and "a whole number >= 1" in capsys.readouterr().err, bad


def test_resume_followed_by_overrides_resumes_with_them(tmp_path, monkeypatch, capsys):
    """`train --resume key=value`: argparse gave the override to --resume as its folder; it was dropped from the
    config (--dry-run showed the file's value) and the run failed on "no such folder". Now it is an override."""
    import dist_dejpeg.train.trainer as trainer

    config = ROOT / "configs" / "debug.yaml"
    # (--dry-run also says what the start would refuse: here, that the empty run folder has nothing to resume)
    assert main(["train", "--config", str(config), "--resume", "data.batch_size=3", "data.crop=96",
                 f"train.run_dir={tmp_path / 'empty'}", "--dry-run"]) == 2
    printed = capsys.readouterr()
    assert "batch_size: 3" in printed.out and "crop: 96" in printed.out
    assert printed.err.startswith("error: ") and "resume" in printed.err, printed.err
    seen, done = [], {"q10": {"jpeg": {"psnr": 25.0}, "restored": {"psnr": 26.0}, "gain": {"psnr": 1.0, "psnr_low": 0.5}}}
    monkeypatch.setattr(trainer, "train", lambda cfg, resume=None: seen.append((cfg.train.run_dir, resume)) or done)
    main(["train", "--config", str(config), "--resume", f"train.run_dir={tmp_path}", "train.processes=1"])
    assert seen == [(str(tmp_path), "latest")]


def test_a_lost_peer_is_said_as_one_not_as_a_traceback(tmp_path, monkeypatch, capsys):
    """gloo's error when another rank died (or hung past train.dist_timeout_s) is the symptom: a rank of a run of
    several processes that saw it says so in one line naming where the cause is and where the run resumes; other
    errors, and the same text in a process alone (no peer to lose), still raise."""
    import dist_dejpeg.train.trainer as trainer

    gloo = ("[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:545] Read error [10.0.0.2]:4481: "
            "Connection reset by peer. This is typically caused by a remote worker hanging")
    errors = iter([RuntimeError(gloo), RuntimeError(gloo), RuntimeError("CUDA error: an illegal memory access"),
                   RuntimeError(gloo)])

    def fail(cfg, resume=None):
        raise next(errors)

    monkeypatch.setattr(trainer, "train", fail)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    args = ["train", "--config", str(ROOT / "configs" / "debug.yaml"), f"train.run_dir={tmp_path}",
            "train.processes=1", "train.dist_timeout_s=60"]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: rank 1 lost another process of this run (Read error [10.0.0.2]:4481: Connection "
                          "reset by peer."), err
    assert "(60 s)" in err and "logs/train-*.log" in err and "Traceback" not in err and "pair.cc" not in err, err
    assert "It had no checkpoint yet: the same command starts it again." in err, err
    (tmp_path / "checkpoints" / "step-00000040").mkdir(parents=True)
    (tmp_path / "checkpoints" / "step-00000040" / "trainer_state.json").write_text("{}")
    assert main(args) == 1
    assert "The newest checkpoint, step-00000040, is kept: the same command resumes from it." in capsys.readouterr().err
    with pytest.raises(RuntimeError, match="illegal memory access"):
        main(args)
    monkeypatch.setenv("WORLD_SIZE", "1")
    with pytest.raises(RuntimeError, match="Connection reset by peer"):  # one process: not a peer's
        main(args)
    # a file it could not write (not a full disk): one line with the file, what to check, where it resumes
    monkeypatch.setattr(trainer, "train", lambda cfg, resume=None: (_ for _ in ()).throw(
        PermissionError(1, "Operation not permitted", str(tmp_path / "checkpoints" / ".tmp-step-00000100"))))
    assert main(args) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: training stopped on a file error: PermissionError: [Errno 1] Operation not "
                          "permitted: ") and ".tmp-step-00000100" in err and "Traceback" not in err, err
    assert "the same command resumes from it" in err, err


def test_a_data_loader_worker_killed_by_sigkill_is_said_with_the_oom_killer_as_its_likely_cause(tmp_path, monkeypatch,
                                                                                                   capsys):
    """A DataLoader worker the OOM killer ended: the run crashed with torch's "DataLoader worker (pid N) is killed
    by signal: Killed." and a traceback, nothing about memory. Now one line (exit 1) with the likely cause and what
    to check or lower; progress.json's crash reason is the same line (train/monitor.py: crash_said)."""
    import dist_dejpeg.train.trainer as trainer
    from dist_dejpeg.run.verdict import crash_said

    killed = RuntimeError("DataLoader worker (pid 4242) is killed by signal: Killed. ")
    monkeypatch.setattr(trainer, "train", lambda cfg, resume=None: (_ for _ in ()).throw(killed))
    assert main(["train", "--config", str(ROOT / "configs" / "debug.yaml"), f"train.run_dir={tmp_path}",
                 "train.processes=1"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: RuntimeError: DataLoader worker (pid 4242) is killed by signal: Killed; a "
                          "process killed by SIGKILL is most often the out-of-memory killer"), err
    assert "(sacct, dmesg)" in err and "data.num_workers / data.shuffle_buffer" in err and "Traceback" not in err
    assert crash_said(RuntimeError("DataLoader worker (pid 7) is killed by signal: Segmentation fault.")) is None


def test_a_missing_module_of_the_full_install_is_said_and_others_raise(monkeypatch, capsys):
    """The restore-only install (no PyTorch, no yaml) running evaluate: one line naming the module and the install
    that has it, exit 2. A missing module of this package (a bug) or of an optional extra still raises."""
    from dist_dejpeg import cli_use

    for name, said in (("yaml", True), ("dist_dejpeg.run.statuz", False), ("mlflow", False)):
        def status(args, name=name):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)

        monkeypatch.setattr(cli_use, "status_command", status)
        monkeypatch.setitem(COMMANDS, "status", (*COMMANDS["status"][:2], status))
        if said:
            assert main(["status", "x"]) == 2
            assert capsys.readouterr().err.startswith("error: status needs yaml, which this environment lacks")
        else:
            with pytest.raises(ModuleNotFoundError):
                main(["status", "x"])


def test_dry_run_says_what_the_start_would_refuse(tmp_path, capsys, sample_shards):
    """--dry-run exited 0 for a config the start then refused 2-8 s later (a misspelt encoder, a run folder whose
    checkpoint the config cannot continue): it now checks resuming and building the model (no weights read)."""
    config = str(ROOT / "configs" / "debug.yaml")
    assert main(["train", "--config", config, f"train.run_dir={tmp_path / 'new'}", "--dry-run"]) == 0
    assert main(["train", "--config", config, f"train.run_dir={tmp_path / 'new'}", "model.encoder=mobilenetv3_large_10",
                 "--dry-run"]) == 2
    assert "timm has no model 'mobilenetv3_large_10' (close: mobilenetv3_large_100" in capsys.readouterr().err
    step = tmp_path / "run" / "checkpoints" / "step-00000010"
    step.mkdir(parents=True)
    (step / "trainer_state.json").write_text('{"phase_names": ["gen"], "global_step": 10}')
    assert main(["train", "--config", config, f"train.run_dir={tmp_path / 'run'}", "--dry-run"]) == 2
    assert "the checkpoint's phases ['gen'] differ from train.order" in capsys.readouterr().err
    # the shards: tiles smaller than the crop refused; none found here said (a login node without the data)
    assert main(["train", "--config", config, f"train.run_dir={tmp_path / 'new'}", f"data.root={sample_shards}",
                 "data.crop=128", "data.auto_prepare=none", "--dry-run"]) == 2
    assert "config key 'data.crop': 128 px, but the tiles in" in capsys.readouterr().err
    assert main(["train", "--config", config, f"train.run_dir={tmp_path / 'new'}", f"data.root={tmp_path / 'none'}",
                 "data.auto_prepare=none", "--dry-run"]) == 0
    assert capsys.readouterr().err.startswith("warning: no shards match")
    # what building the Accelerator refuses: fp16 on the CPU, DeepSpeed in one process with no launcher (exit 0 here,
    # exit 2 at the start: a review)
    new = f"train.run_dir={tmp_path / 'new'}"
    assert main(["train", "--config", config, new, "train.cpu=true", "train.mixed_precision=fp16", "--dry-run"]) == 2
    assert "fp16 needs a GPU; use bf16 or no on CPU" in capsys.readouterr().err
    assert main(["train", "--config", config, new, "train.processes=1", "train.deepspeed_stage=2", "--dry-run"]) == 2
    assert "DeepSpeed needs a launcher, even for one process" in capsys.readouterr().err


def test_dry_run_and_the_launcher_check_model_init_from(tmp_path, capsys):
    """`train --dry-run model.init_from=...` exited 0 for a source of other shapes or none at all, which the start
    refused after its start-up (under train.processes=2, once both ranks had started): both check its config now
    (no weights read). A model.attention_stride the encoder has no skip at is said (where the attention sits)."""
    from dist_dejpeg.config import load_config
    from dist_dejpeg.models.generator_file import save_generator
    from dist_dejpeg.models.unet import build_generator

    config = str(ROOT / "configs" / "debug.yaml")
    small = ["model.encoder=mobilenetv3_small_050", "model.decoder_width=16"]
    model = load_config(config, small).model
    save_generator(build_generator(model), model, tmp_path / "g.safetensors")
    run = ["train", "--config", config, *small, f"train.run_dir={tmp_path / 'run'}", "train.processes=1"]
    source = f"model.init_from={tmp_path / 'g.safetensors'}"
    assert main([*run, source, "model.blur=false", "--dry-run"]) == 0  # (blur makes no tensor: a fine-tune may switch)
    assert "error" not in capsys.readouterr().err
    assert main([*run, source, "model.decoder_width=32", "--dry-run"]) == 2
    assert "is a generator of other shapes: model.decoder_width 16 (here 32)" in capsys.readouterr().err
    assert main([*run, f"model.init_from={tmp_path / 'none'}", "--dry-run"]) == 2
    assert f"config key 'model.init_from': {tmp_path / 'none'}: no such file" in capsys.readouterr().err
    # the launcher of train.processes=2: said before it starts a rank, nothing made
    assert main([*run, f"model.init_from={tmp_path / 'none'}", "train.processes=2", "train.cpu=true"]) == 2
    assert "no such file or folder" in capsys.readouterr().err and not (tmp_path / "run").exists()
    assert main([*run, "model.attention_stride=32", "--dry-run"]) == 0  # (skips at 2, 4, 8: a stride-16 U-Net)
    assert ("warning: model.attention_stride=32 is not one of the encoder's skip strides [2, 4, 8]"
            in capsys.readouterr().err)


def test_output_names_keep_sub_folders_and_every_input_apart():
    rels = [Path(p) for p in ("good.jpg", "good.JPEG", "good.png", "sub/good.jpg", "scan.tif", "x.webp")]
    assert [str(p) for p in output_names(rels)] == ["good.jpg.png", "good.JPEG.png", "good.png.png",
                                                    "sub/good.png", "scan.png", "x.png"]
    # the rule does not depend on the order of the inputs
    assert output_names(rels[::-1]) == output_names(rels)[::-1]
    assert [str(p) for p in output_names(rels, "same", "-r")] == ["good-r.jpg", "good-r.JPEG", "good-r.png",
                                                                 "sub/good-r.jpg", "scan-r.png", "x-r.webp"]


def test_output_formats_and_their_metadata(tmp_path):
    """Each format as the help says; EXIF and ICC kept in each; TIFF compressed; alpha never dropped silently;
    a cut-short output of any format is not complete."""
    rgb = _photo(48, 64)
    plain = camera_jpeg(tmp_path / "in" / "plain.jpg", rgb, gps=False)
    Image.fromarray(rgb).save(tmp_path / "in" / "lossless.png")
    Image.fromarray(rgb).save(tmp_path / "in" / "lossless.webp", lossless=True)
    Image.fromarray(rgb).save(tmp_path / "in" / "old.bmp")
    decoded = np.asarray(Image.open(plain).convert("RGB"))
    identity = Identity()
    sizes = {}
    for fmt, quality in (("png", None), ("jpg", None), ("jpg", 80), ("webp", None), ("webp", 80), ("tiff", None)):
        out = tmp_path / f"{fmt}{quality}"
        (result,) = restore_files(identity, [str(plain)], out, fmt=fmt, output_quality=quality, progress=False)
        path = Path(result.output)
        assert result.error is None and output_complete(path), result.error
        sizes[fmt, quality] = path.stat().st_size
        with Image.open(path) as im:
            assert im.info.get("icc_profile") == SRGB and im.getexif()[0x010F] == "Canon", (fmt, quality)
            pixels = np.asarray(im.convert("RGB"))
            if fmt == "tiff":
                assert im.tag_v2[259] == 8 and im.tag_v2[317] == 2  # deflate, with the horizontal predictor
        lossless = fmt in ("png", "tiff") or (fmt == "webp" and quality is None)
        assert np.array_equal(pixels, decoded) == lossless, (fmt, quality)
        if fmt == "jpg":
            assert is_libjpeg_444(path, quality or 95)
        whole = path.read_bytes()
        path.write_bytes(whole[:len(whole) - 40])
        assert not output_complete(path), (fmt, quality)
    assert sizes["webp", 80] < sizes["webp", None] and sizes["jpg", 80] < sizes["jpg", None]
    # same: each input in its own format and suffix (anything else png)
    results = restore_files(identity, [str(tmp_path / "in")], tmp_path / "same", fmt="same", progress=False)
    formats = {Path(r.output).name: Image.open(r.output).format for r in results}
    assert formats == {"plain.jpg": "JPEG", "lossless.png": "PNG", "lossless.webp": "WEBP", "old.png": "PNG"}
    assert is_libjpeg_444(tmp_path / "same" / "plain.jpg", 95)
    # a TIFF whose EXIF has a GPS sub-IFD (which libtiff cannot write): uncompressed, nothing lost
    (result,) = restore_files(identity, [str(camera_jpeg(tmp_path / "gps.jpg", rgb))], tmp_path / "t", fmt="tiff",
                              progress=False)
    with Image.open(result.output) as im:
        assert im.getexif().get_ifd(GPS_IFD) == GPS and im.tag_v2[259] == 1
    # alpha: JPEG cannot hold it; the file fails with the reason, before any restore
    Image.fromarray(np.dstack([rgb, np.full(rgb.shape[:2], 9, np.uint8)])).save(tmp_path / "rgba.png")
    (result,) = restore_files(identity, [str(tmp_path / "rgba.png")], tmp_path / "a", fmt="jpg", progress=False)
    assert result.output is None and "alpha channel" in result.error and not (tmp_path / "a" / "rgba.jpg").exists()
    assert result.error.endswith("write it as png, webp or tiff (--format, or --format same)")
    # one output file named: the hint names the suffix (--format is refused with -o FILE)
    (result,) = restore_files(identity, [str(tmp_path / "rgba.png")], tmp_path / "one.jpg", progress=False)
    assert result.error.endswith("which .jpg cannot hold: name the output .png, .webp or .tiff"), result.error


def test_export_quiets_the_exporters_info_lines(tmp_path, capsys):
    names = ("onnxscript", "onnx_ir", "torch.onnx")
    saved = {n: logging.getLogger(n).level for n in names}
    try:
        assert main(["export", "--model", str(tmp_path / "missing"), "--onnx", str(tmp_path / "m.onnx")]) == 2
        assert all(logging.getLogger(n).getEffectiveLevel() == logging.WARNING for n in names)
    finally:
        for n, level in saved.items():
            logging.getLogger(n).setLevel(level)
    assert "error:" in capsys.readouterr().err


def test_each_result_says_where_its_quality_came_from(tmp_path):
    """restore's per-image line: the estimate's source (the restorer is told it too), the double compression's
    reason, the given quality, or why the quality is unknown."""
    import skimage.data

    rgb = np.ascontiguousarray(skimage.data.coffee()[:256, :256])
    folder = tmp_path / "in"
    folder.mkdir()
    Image.fromarray(rgb).save(folder / "q30.jpg", quality=30)
    Image.open(folder / "q30.jpg").save(folder / "resaved.jpg", quality=90)  # q30, then q90: double compressed
    Image.fromarray(rgb).save(folder / "clean.png")
    identity = Identity()
    results = {Path(r.source).name: r for r in restore_files(identity, [str(folder)], tmp_path / "out", progress=False)}
    assert (results["q30.jpg"].quality, results["q30.jpg"].quality_from) == (30, "file tables")
    double = results["resaved.jpg"]
    assert double.quality_from.startswith("pixels (double compressed): ") and "q90" in double.quality_from, double
    assert double.quality is not None and double.quality < 60, double
    assert results["clean.png"].quality is None and "not a JPEG (PNG)" in results["clean.png"].quality_from
    assert identity.last_decision.source == "pixels (double compressed)"  # resaved.jpg, the last in the folder
    (given,) = restore_files(identity, [str(folder / "resaved.jpg")], tmp_path / "o2", quality=42, progress=False)
    assert (given.quality, given.quality_from, identity.last_decision.source) == (42, "given", "given")


def test_train_processes_starts_ranks_and_returns_a_failing_ranks_exit_code(tmp_path, monkeypatch, capfd,
                                                                           sample_shards):
    """``train.processes``: refused below 1 before anything starts; with 2, the command runs itself as two ranks
    (torchrun, standalone) and the ranks' own exit code (2: --resume names no checkpoint, found after the process
    group is up) comes back as the command's. Seen once before the fix, not every time: one rank aborted on its
    way out ("terminate called without an active exception") and the command said 134; now each rank leaves its
    process group on the error, and a rank's own code counts over a signal's (the next test)."""
    assert main(["train", "train.processes=0", "train.cpu=true"]) == 2
    assert "train.processes" in capfd.readouterr().err
    import signal

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    (tmp_path / "not-a-checkpoint").mkdir()
    assert main(["train", "--resume", str(tmp_path / "not-a-checkpoint"), "train.processes=2", "train.cpu=true",
                 "model.pretrained=false", "loss.lpips_pretrained=false", f"data.root={sample_shards}",
                 "data.crop=64", "data.val_crop=64", "data.val_max_images=4", "model.encoder=mobilenetv3_small_050",
                 "model.decoder_width=16", "critic.width=8", "loss.lpips_net=alex", "loss.metric_net=alex",
                 f"train.run_dir={tmp_path / 'run'}"]) == 2
    err = "".join(capfd.readouterr())  # the ranks' output, as the launcher passes it on
    assert "not a complete checkpoint" in err and "terminate called" not in err
    assert not (tmp_path / "run" / "checkpoints").exists()
    # the launcher's signal handlers do not outlive the launch (the caller's process goes on as it was)
    assert {sig: signal.getsignal(sig) for sig in handlers} == handlers and os.environ["OMP_NUM_THREADS"] == "1"


def test_a_start_that_fails_before_training_leaves_no_run_folder_it_made(tmp_path, capsys, sample_shards):
    """A misspelt encoder: a clear error, and the run folder this start made (holding only its lock) is gone; a
    folder that was there before stays, with what it held."""
    args = ["train", "train.processes=1", "train.cpu=true", "model.pretrained=false", f"data.root={sample_shards}",
            "data.crop=64", "data.val_crop=64", "model.encoder=mobilenetv3_larg_100"]
    assert main([*args, f"train.run_dir={tmp_path / 'new' / 'run'}"]) == 2
    assert "timm has no model 'mobilenetv3_larg_100'" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "notes.txt").write_text("mine")
    assert main([*args, f"train.run_dir={tmp_path / 'old'}"]) == 2
    assert sorted(p.name for p in (tmp_path / "old").iterdir()) == [".lock", "notes.txt"]


def test_the_command_says_a_ranks_own_exit_code_before_a_signal():
    """Of the ranks that failed, the one that chose its exit code (2) counts over one that died by a signal while
    the launcher stopped the others (-6, -15), whichever the launcher saw first."""
    from types import SimpleNamespace

    from dist_dejpeg.train.launch import failed_code

    def err(*codes):
        failures = {rank: SimpleNamespace(exitcode=c) for rank, c in enumerate(codes)}
        return SimpleNamespace(failures=failures, get_first_failure=lambda: (0, failures[0]))

    assert failed_code(err(-6, 2)) == 2 and failed_code(err(3, 2)) == 3 and failed_code(err(-6, -15)) == 134


def test_a_rank_killed_first_is_a_crash_not_a_stop_the_launcher_did_not_pass_on():
    """Rank 1 SIGKILLed (the OOM killer), rank 0 leaving on the lost peer when torch's launcher closed it with
    SIGTERM: rank 0's 75 made the command say "preempted, run again" (a retry loop reran the job forever). With no
    stop passed on, a 75 after the first failure is that closing SIGTERM: 137, the kill's; a forwarded stop is 75."""
    import signal

    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

    from dist_dejpeg.train.launch import failed_code

    def err(*codes):  # (rank, exitcode) in the order they failed, a second apart
        failures = {}
        for when, (rank, code) in enumerate(codes):
            failures[rank] = ProcessFailure(rank, 100 + rank, code, "/nonexistent")
            failures[rank].timestamp = 100 + when
        return ChildFailedError("train", failures)

    assert failed_code(err((1, -9), (0, 75)), None) == 137
    assert failed_code(err((1, 1), (0, 75)), None) == 1 and failed_code(err((1, 2), (0, 75)), None) == 2
    assert failed_code(err((0, 75), (1, -15)), None) == 75  # a rank stopped by a signal sent to it, first
    assert failed_code(err((1, -9), (0, 75)), signal.SIGTERM) == 75  # a forwarded stop: the rank checkpointed
    assert failed_code(err((1, -15), (0, 75)), signal.SIGTERM) == 75


def test_ctrl_c_outside_a_training_step_ends_the_command_without_a_traceback(tmp_path, capsys, monkeypatch):
    import dist_dejpeg.cli as cli

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setitem(cli.COMMANDS, "status", (*cli.COMMANDS["status"][:2], interrupted))
    assert main(["status", str(tmp_path)]) == 130
    assert capsys.readouterr().err.strip() == "status: interrupted"


def test_status_into_a_closed_pipe_and_an_unknown_tracker_in_a_dry_run(tmp_path):
    """`status RUN | head` ended in a BrokenPipeError traceback when the reader had left; `train --dry-run
    'train.log_with=[foo]'` printed the config, the unknown tracker refused only after the ranks had started."""
    import shlex
    import subprocess
    import sys

    (tmp_path / "config.yaml").write_text("train:\n  run_dir: x\n")  # a run folder, as status reads one
    script = f"import sys, time\ntime.sleep(1)\nfrom dist_dejpeg.cli import main\nsys.exit(main(['status', {str(tmp_path)!r}]))"
    proc = subprocess.run(f"{shlex.quote(sys.executable)} -c {shlex.quote(script)} | true; echo ${{PIPESTATUS[0]}}",
                          shell=True, executable="/bin/bash", capture_output=True, text=True, timeout=120)
    assert "Traceback" not in proc.stderr and "BrokenPipe" not in proc.stderr, proc.stderr
    assert proc.stdout.strip() == "141"
    assert main(["train", "--dry-run", "train.log_with=[foo]"]) == 2


def test_train_processes_names_every_missing_weights_file_before_it_starts_ranks(tmp_path, monkeypatch, capfd,
                                                                                  sample_shards):
    """Offline with `model.pretrained=true loss.lpips_pretrained=true` under `train.processes=2`: each rank said
    only the first missing file it met, after its start-up and huggingface_hub's retries (~60 s, each block once
    per rank). Now the launcher looks the files up before it starts the ranks and names every one, with the key
    that points at it, in seconds; an MLflow server that does not answer is said there too."""
    import importlib.util
    import socket
    import time
    from types import SimpleNamespace

    from huggingface_hub import constants

    from dist_dejpeg.config import load_config
    from dist_dejpeg.models import weights
    from dist_dejpeg.train import launch

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}"  # refused at once: a host that does not answer
    monkeypatch.setattr(constants, "ENDPOINT", closed)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf"))  # (whatever this machine has cached)
    monkeypatch.setattr(weights, "lpips_backbone_weights",
                        lambda net: SimpleNamespace(url=f"{closed}/{ {'alex': 'Ale', 'vgg': 'VGG'}[net]}.pth"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    run = ["train", "train.processes=2", "train.cpu=true", f"data.root={sample_shards}", "model.pretrained=true",
           "loss.lpips_pretrained=true", "loss.lpips_net=alex", "loss.metric_net=vgg", f"train.run_dir={tmp_path / 'run'}"]
    start = time.monotonic()
    assert main(run) == 2
    err = capfd.readouterr().err
    assert time.monotonic() - start < 30 and not (tmp_path / "run").exists()
    assert err.count("error: ") == 1 and "127.0.0.1 does not answer" in err, err
    assert "encoder 'mobilenetv3_large_100'" in err and "model.encoder_weights=/path/to/model.safetensors" in err
    assert "loss.lpips_weights=/path/to/Ale.pth" in err and "loss.metric_weights=/path/to/VGG.pth" in err
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert main([*run, "model.encoder_weights=/nowhere/model.safetensors", "loss.lpips_pretrained=false"]) == 2
    assert "model.encoder_weights: file not found: /nowhere/model.safetensors" in capfd.readouterr().err
    assert main([*run, "loss.lpips_pretrained=false"]) == 2
    assert "HF_HUB_OFFLINE is set" in capfd.readouterr().err
    repo = tmp_path / "hf" / "models--timm--mobilenetv3_large_100.ra_in1k"  # cached: the ranks load them
    (repo / "snapshots" / "abc").mkdir(parents=True)
    (repo / "snapshots" / "abc" / "model.safetensors").write_bytes(b"")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc")
    (tmp_path / "torch" / "hub" / "checkpoints").mkdir(parents=True)
    for name in ("Ale.pth", "VGG.pth"):
        (tmp_path / "torch" / "hub" / "checkpoints" / name).write_bytes(b"")
    assert launch.missing_weights(load_config(None, run[1:])) == []
    monkeypatch.setenv("MLFLOW_TRACKING_URI", closed)
    if importlib.util.find_spec("mlflow"):
        assert main([*run, "model.pretrained=false", "train.log_with=[mlflow]"]) == 2
        assert f"MLFLOW_TRACKING_URI={closed} did not answer" in capfd.readouterr().err


def test_dry_run_refuses_a_crop_batch_norm_cannot_train_on_and_warns_of_a_padded_one(tmp_path, capsys):
    """A data.crop no larger than the encoder's largest stride with one crop a device failed at the first step, deep
    in the model ("Expected more than 1 value per channel when training"), and one no multiple of it was padded
    without a word: the dry run refuses the first (naming the smallest crop that works) and warns of the second."""
    config = str(ROOT / "configs" / "debug.yaml")
    run = ["train", "--config", config, "model.encoder=mobilenetv3_small_050", "model.decoder_width=16",
           "train.order=[gen]", "train.phases.gen.w_lpips=0", f"train.run_dir={tmp_path / 'run'}",
           "train.processes=1", f"data.root={tmp_path / 'none'}", "data.auto_prepare=none", "--dry-run"]
    assert main([*run, "data.crop=16", "data.batch_size=1"]) == 2  # (encoder_depth 4: stride 16)
    err = capsys.readouterr().err
    assert "config key 'data.crop': 16 px with data.batch_size=1" in err and "(data.crop=32)" in err, err
    assert main([*run, "data.crop=24", "data.batch_size=2"]) == 0
    assert "data.crop=24 is no multiple of the encoder's largest stride 16" in capsys.readouterr().err
    assert main([*run, "data.crop=32", "data.batch_size=1"]) == 0
    assert "data.crop" not in capsys.readouterr().err
    # model.sync_bn in two processes: batch norm counts the global batch's values (two), and trains
    assert main([*run, "data.crop=16", "data.batch_size=1", "model.sync_bn=true", "train.processes=2",
                 "train.cpu=true"]) == 0, capsys.readouterr().err
    assert "data.crop" not in capsys.readouterr().err


def test_dry_run_on_a_resumable_run_lists_the_changes_the_resume_accepts(tmp_path, capsys):
    """`train --dry-run` on a run folder with a checkpoint checked what the resume refuses but said nothing of what
    it accepts (the resume warns "config changed since the checkpoint: ..."): both are said now, and which
    checkpoint it continues."""
    from dist_dejpeg.config import load_config, to_yaml

    config = str(ROOT / "configs" / "debug.yaml")
    run = tmp_path / "run"
    args = [f"train.run_dir={run}", "model.encoder=mobilenetv3_small_050", "model.decoder_width=16",
            "train.processes=1", f"data.root={tmp_path / 'none'}", "data.auto_prepare=none"]
    cfg = load_config(config, args)
    step = run / "checkpoints" / "step-00000010"
    step.mkdir(parents=True)
    (step / "trainer_state.json").write_text(json.dumps({"phase_names": list(cfg.train.order), "global_step": 10,
                                                         "phase_index": 0, "phase_step": 10}))
    (step / "config.yaml").write_text(to_yaml(cfg))
    assert main(["train", "--config", config, *args, "train.phases.gen.lr=0.0005", "--dry-run"]) == 0
    err = capsys.readouterr().err
    assert f"note: train.auto_resume: continuing the run in {run} from step-00000010" in err, err
    assert "warning: resume: config changed since the checkpoint: train.phases.gen.lr 0.002 -> 0.0005" in err, err
    assert main(["train", "--config", config, *args, "--dry-run"]) == 0
    assert "config changed" not in capsys.readouterr().err


def test_dry_run_under_a_launcher_checks_its_world_size_not_train_processes(tmp_path, capsys, monkeypatch):
    """Under a launcher (torchrun, accelerate, srun: WORLD_SIZE) `train --dry-run` checked train.processes, which the
    start ignores there: it refused a resume on the checkpoint's own 2 ranks and accepted one on another count, and
    said neither; now it checks the launcher's count and says which. A resume whose train.processes alone changed (a
    launcher's run) warned "config changed since the checkpoint: train.processes 2 -> 1": the batch check says a
    real change of the count."""
    from dist_dejpeg.config import load_config, to_yaml

    config = str(ROOT / "configs" / "debug.yaml")
    run = tmp_path / "run"
    args = [f"train.run_dir={run}", "model.encoder=mobilenetv3_small_050", "model.decoder_width=16",
            f"data.root={tmp_path / 'none'}", "data.auto_prepare=none"]
    cfg = load_config(config, [*args, "train.processes=2"])
    step = run / "checkpoints" / "step-00000010"
    step.mkdir(parents=True)
    (step / "trainer_state.json").write_text(json.dumps({"phase_names": list(cfg.train.order), "global_step": 10,
                                                         "phase_index": 0, "phase_step": 10, "processes": 2}))
    (step / "config.yaml").write_text(to_yaml(cfg))  # a train.processes=2 run
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")  # torchrun --nproc-per-node 2 ... train.processes=1: its 2 ranks
    assert main(["train", "--config", config, *args, "train.processes=1", "--dry-run"]) == 0
    err = capsys.readouterr().err
    assert "note: checked for 2 process(es) (train.processes; under a launcher, its WORLD_SIZE)" in err, err
    assert "process count changes" not in err and "config changed" not in err, err
    monkeypatch.setenv("WORLD_SIZE", "1")  # one rank, whatever train.processes says
    assert main(["train", "--config", config, *args, "train.processes=2", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "note: checked for 1 process(es)" in err and "the process count changes (2 -> 1" in err, err


def test_a_path_the_redirected_streams_encoding_lacks_is_escaped_not_a_crash(tmp_path, monkeypatch):
    """Windows, stdout redirected: the ANSI code page (cp1252), strict. A run or photo named in Cyrillic crashed
    the command with UnicodeEncodeError once its work was done (exit 1); now escaped, streams given back strict."""
    import io
    import sys

    run = tmp_path / "ф_run"
    run.mkdir()
    (run / "config.yaml").write_text("train:\n  run_dir: x\n")
    out, err = (io.TextIOWrapper(io.BytesIO(), encoding="cp1252", errors="strict") for _ in range(2))
    monkeypatch.setattr(sys, "stdout", out)
    monkeypatch.setattr(sys, "stderr", err)
    assert main(["status", str(run)]) == 0
    assert main(["status", str(tmp_path / "ф_none")]) == 2  # (no such folder: said on stderr)
    out.flush()
    err.flush()
    said, errors = (stream.buffer.getvalue().decode("cp1252") for stream in (out, err))
    assert "\\u0444_run" in said and "no such folder: " in errors and "\\u0444_none" in errors
    assert out.errors == err.errors == "strict"


def test_a_closed_stderr_is_no_failure_and_puts_nothing_on_stdout(tmp_path, model_file, monkeypatch,  # noqa: F811
                                                                   capsys):
    """`restore ... 2>&-`: Python's sys.stderr is None, and restore exited 1 (its progress asked None whether it is
    a terminal); print(..., file=sys.stderr) fell back to stdout, putting warnings into what the command prints there.
    Now a closed stderr is os.devnull for every command (merged-diff review)."""
    Image.fromarray(_photo(40, 56)).save(tmp_path / "a.jpg", quality=25)
    monkeypatch.setattr(sys, "stderr", None)
    assert main(["restore", str(tmp_path / "a.jpg"), "--model", str(model_file), "-o", str(tmp_path / "out"),
                 "--tile", "0"]) == 0
    assert sys.stderr is None and (tmp_path / "out" / "a.png").is_file()
    assert main(["status", "--json", str(tmp_path / "no-run")]) == 2
    assert sys.stderr is None
    out = capsys.readouterr().out
    lines = out.splitlines()  # (status --json says its error in the JSON, as it should)
    assert "restored 1 image(s)" in out and not [line for line in lines if line.startswith(("warning:", "error:"))], out
