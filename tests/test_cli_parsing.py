"""How ``dist-dejpeg`` reads its command line (cli.py, cli_args.py): parser-level checks, milliseconds each but the
bench help's (its modules imported once). The work the commands do is tested in test_cli.py and the commands' own
tests."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dist_dejpeg.cli import build_parser, main


@pytest.mark.parametrize("line, expected", [
    ("prepare folder --tile 128 srcA --out X", {"dataset": "folder", "source": "srcA", "tile": 128, "out": "X"}),
    ("prepare folder --tile 64 --out X4 -- .", {"source": ".", "out": "X4"}),
    ("prepare --out X -- folder srcA", {"dataset": "folder", "source": "srcA"}),
    ("restore j0.jpg -o out1 j1.jpg --model g.safetensors", {"inputs": ["j0.jpg", "j1.jpg"], "out": "out1"}),
    ("restore -o o --model m -- -a.jpg b.jpg", {"inputs": ["-a.jpg", "b.jpg"]}),  # (a name like an option)
    # a positional before an option, and one like an option after --: "unrecognized arguments: -- -b.jpg"
    ("restore a.jpg --model g -o outd -- -b.jpg", {"inputs": ["a.jpg", "-b.jpg"], "out": "outd", "model": "g"}),
    ("compare e1 --json -- -e2", {"evaluations": ["e1", "-e2"], "json": True}),
    ("train a=1 --dry-run -- -b=2 --", {"overrides": ["a=1", "-b=2", "--"], "dry_run": True}),
    ("prepare folder --out X -- -photos", {"dataset": "folder", "source": "-photos", "out": "X"}),
    ("status runA --json runB", {"run_dirs": ["runA", "runB"], "json": True}),
    ("status runA --json --", {"run_dirs": ["runA"], "json": True}),
    ("status -- --json", {"run_dirs": ["--json"], "json": False}),
    ("compare ev1 -o c.md ev2", {"evaluations": ["ev1", "ev2"], "out": "c.md"}),
    ("compare ev1 --metrics psnr -- ev2", {"evaluations": ["ev1", "ev2"], "metrics": ["psnr"]}),
    ("train --config c.yaml a=1 --dry-run b=2", {"overrides": ["a=1", "b=2"], "dry_run": True}),
    ("train --resume a=1 b=2", {"resume": "a=1", "overrides": ["b=2"]}),  # (cli._train_command moves a=1 back)
    ("bench scaling --steps 1 data.crop=64", {"which": "scaling", "overrides": ["data.crop=64"]}),
])
def test_positionals_may_come_after_options(line, expected):
    """argparse (3.11) closed a command's positionals at its first option: `restore a.jpg -o out b.jpg` was refused
    ("unrecognized arguments: b.jpg"), `prepare folder --tile 128 src` too; words after `--` are positionals."""
    args, extra = build_parser().parse_known_args(line.split())
    assert extra == [] and args.command == line.split()[0], (line, extra)
    assert {key: getattr(args, key) for key in expected} == expected, line


def test_a_word_after_double_dash_is_named_as_typed_in_errors(capsys):
    """The words after `--` that start with "-" stand in as other words during the parse: argparse's own messages
    showed the stand-in (`prepare -o o -- -x`: "invalid choice: '\\x003'"); a type= conversion saw it too."""
    with pytest.raises(SystemExit):
        build_parser().parse_args("prepare -o o -- -x".split())
    err = capsys.readouterr().err
    assert "invalid choice: '-x'" in err and "\\x00" not in err, err
    seen = []
    parser = build_parser()
    run_dirs = next(a for a in parser.commands["status"]._actions if a.dest == "run_dirs")
    run_dirs.type = lambda word: seen.append(word) or word
    parser.parse_args("status -- -r1".split())
    assert seen == ["-r1"], seen


def test_options_are_never_abbreviated(tmp_path, capsys):
    """`--forma jpg` skipped restore's check that -o photo.png's suffix is its format (argparse took the prefix for
    --format; the check looks for the words typed) and `--overl 32 --tile-pad 8` silently used overlap 16: an
    option is named in full, in every command and benchmark."""
    for words in (["-o", str(tmp_path / "o5.png"), "--forma", "jpg"], ["-o", str(tmp_path / "o"), "--overl", "32",
                                                                       "--tile-pad", "8"]):
        with pytest.raises(SystemExit) as caught:
            main(["restore", "j0.jpg", "--model", "g.safetensors", *words])
        assert caught.value.code == 2 and f"unrecognized arguments: {words[2]} " in capsys.readouterr().err, words
    for line in ("bench data --tile 288", "status runA --js", "--vers"):  # (--tiles, --json, --version)
        with pytest.raises(SystemExit) as caught:
            build_parser().parse_args(line.split())
        assert caught.value.code == 2, line
    assert not list(tmp_path.iterdir())


def test_compare_writes_only_text_files(tmp_path, capsys):
    """`compare ev1 ev2 -o g2.safetensors` (or photo.jpg) replaced that file with Markdown: -o takes .md, .markdown,
    .txt or .json, as its help says; a folder is refused by compare itself, naming it."""
    model = tmp_path / "g2.safetensors"
    model.write_bytes(b"weights")
    for bad in (model, tmp_path / "photo.jpg", tmp_path / "compare"):
        with pytest.raises(SystemExit) as caught:
            main(["compare", "ev1", "ev2", "-o", str(bad)])
        assert caught.value.code == 2 and f"not '{bad}'" in capsys.readouterr().err, bad
    assert model.read_bytes() == b"weights"
    for good in ("c.md", "c.MARKDOWN", "c.txt", "c.json", str(tmp_path)):
        assert build_parser().parse_args(["compare", "a", "b", "-o", good]).out == good
    assert ".md, .markdown, .txt" in " ".join(build_parser().commands["compare"].format_help().split())


def _evaluation(folder: Path) -> str:
    row = {"image": "p", "quality": 10, "height": 64, "width": 64, "jpeg": {"psnr": 20.0}, "restored": {"psnr": 21.0}}
    folder.mkdir()
    (folder / "metrics.json").write_text(json.dumps({"meta": {"channel": "RGB"}, "per_image": [row]}))
    return str(folder)


def test_compare_names_an_evaluation_taken_for_a_metric(tmp_path, capsys):
    """`compare ev1 --metrics psnr ev2`: --metrics took ev2, and the error said "compare needs two evaluations"."""
    ev1, ev2 = _evaluation(tmp_path / "ev1"), _evaluation(tmp_path / "ev2")
    assert main(["compare", ev1, "--metrics", "psnr", ev2]) == 2
    err = capsys.readouterr().err
    assert f"unknown metric(s) {ev2}: choose from psnr" in err and "give the evaluations before --metrics" in err, err
    assert main(["compare", ev1, "--metrics", "psnr", "--", ev2]) == 0


def test_a_failed_write_names_the_file_not_its_temp(tmp_path):
    """`compare ... -o /proc/c.md` said "/proc/.c.md.tmp4014": the hidden temp file atomic_write_bytes opens."""
    from dist_dejpeg.run.files import atomic_write_bytes

    (tmp_path / "file").write_text("")
    with pytest.raises(OSError) as caught:
        atomic_write_bytes(tmp_path / "file" / "c.md", b"x")  # (its folder is a file: any user, root too)
    assert caught.value.filename == str(tmp_path / "file" / "c.md"), caught.value


def test_bench_help_shows_real_defaults_only():
    """Benchmarks' help said "(default: None)" for required flags, "(default: False)" for switches, and
    `bench quality --every` "(default: the run's steps // 15) (default: None)"."""
    for name, parser in build_parser().commands["bench"].benchmarks.items():
        text = " ".join(parser.format_help().split())
        assert "(default: None)" not in text and "(default: False)" not in text, name
    quality = " ".join(build_parser().commands["bench"].benchmarks["quality"].format_help().split())
    assert "every N global steps (default: the run's steps // 15) --targets" in quality, quality


def test_tile_pad_is_refused_below_zero(capsys):
    """`restore --tile-pad -4` said "overlap ... got -8", a number never typed."""
    with pytest.raises(SystemExit) as caught:
        build_parser().parse_args(["restore", "a.jpg", "-o", "o", "--model", "m", "--tile-pad", "-4"])
    assert caught.value.code == 2 and "--tile-pad/--tile_pad: a whole number >= 0, not '-4'" in capsys.readouterr().err


def test_a_run_given_twice_is_shown_once(tmp_path, capsys):
    """`status runA runA` (or runA by two names) printed it twice."""
    run = tmp_path / "runA"
    assert main(["status", str(run), str(tmp_path / "x" / ".." / "runA")]) == 2
    assert capsys.readouterr().err.count("no such folder") == 1
