"""``dist-dejpeg bench quality`` (time to quality): the numbers it derives from a run's curve, on synthetic
points, and one tiny run through the command (one seed, 8 gen steps, a checkpoint every 4)."""

from __future__ import annotations

import json
import sys

import pytest

from dist_dejpeg.bench import quality
from dist_dejpeg.cli import main


def points(*pairs) -> list[dict]:
    """(minutes, gain) -> curve points, 100 steps apart, batch 4."""
    return [{"step": 100 * i, "images": 400 * i, "train_seconds": 60.0 * m, "gain": g}
            for i, (m, g) in enumerate(pairs, 1)]


CURVE = points((1.0, 0.1), (2.0, 0.35), (3.0, 0.3), (4.0, 0.6))


def test_first_reached_is_the_first_point_at_or_above_the_target():
    assert quality.first_reached(CURVE, 0.3)["train_seconds"] == 120.0  # not the later 0.3 at 3 min
    assert quality.first_reached(list(reversed(CURVE)), 0.35)["step"] == 200  # by training time, not list order
    assert quality.first_reached(CURVE, 0.6)["images"] == 1600
    assert quality.first_reached(CURVE, 1.0) is None  # not reached


def test_budget_takes_the_last_point_at_or_before_it():
    assert quality.at_budget(CURVE, 2.0) == (CURVE[1], "")  # exactly at the budget
    assert quality.at_budget(CURVE, 2.9) == (CURVE[1], "")
    assert quality.at_budget(CURVE, 4.0) == (CURVE[3], "")
    assert quality.at_budget(CURVE, 5.0) == (None, quality.SHORTER)
    assert quality.at_budget(CURVE, 0.5) == (None, quality.TOO_EARLY)


def test_over_seeds_mean_spread_and_the_seeds_that_have_a_value():
    s = quality.over_seeds([1.0, None, 3.0])
    assert (s["mean"], s["spread"], s["seeds"], s["of"]) == (2.0, 2.0, 2, 3)
    assert quality.over_seeds([0.5])["spread"] == 0.0
    assert quality.over_seeds([None, None])["mean"] is None


def test_summary_and_table_over_two_seeds():
    final = lambda g, passes: {"10": {"raw": g, "guard": 0.0 if passes else g, "passed_through": passes}}  # noqa: E731
    runs = [{"seed": 0, "points": CURVE, "final": final(0.6, False), "colour_shift_q10": 0.5},
            {"seed": 1, "points": points((1.5, 0.4), (2.5, 0.45)), "final": final(-0.2, True), "colour_shift_q10": 1.5}]
    s = quality.summarize(runs, targets=(0.3, 0.5), budgets=(2.0,), qualities=(10,))
    assert s["targets"]["0.3"]["minutes"]["values"] == [2.0, 1.5]
    assert s["targets"]["0.3"]["minutes"]["mean"] == pytest.approx(1.75)
    assert s["targets"]["0.3"]["images"]["values"] == [800, 400]
    assert s["targets"]["0.5"]["minutes"]["values"] == [4.0, None] and s["targets"]["0.5"]["minutes"]["seeds"] == 1
    assert s["budgets"]["2.0"]["gain"]["values"] == [0.35, 0.4] and s["budgets"]["2.0"]["at_minutes"] == [2.0, 1.5]
    assert s["final"]["10"]["guard"]["values"] == [0.6, 0.0] and s["final"]["10"]["passed_through"] == 1
    raw = s["final"]["10"]["raw"]
    assert raw["mean"] == pytest.approx(0.2) and raw["spread"] == pytest.approx(0.8)
    assert s["colour_shift_q10"]["mean"] == 1.0 and s["train_minutes"]["values"] == [4.0, 2.5]
    rows = {r[0]: r for r in quality.table_rows(s, (0, 1))}
    assert rows["minutes to q10 gain +0.3 dB"][1:3] == ["1.75 ± 0.25", "s0: 2.00, s1: 1.50"]
    assert rows["minutes to q10 gain +0.5 dB"][1:3] == ["4.00 ± 0.00 (1/2 seeds)", "s0: 4.00, s1: not reached"]
    assert rows["q10 gain after 2 min"][2] == "s0: +0.350 (at 2.00 min), s1: +0.400 (at 1.50 min)"
    guard = rows["final gain q10, guard"]
    assert guard[1] == "+0.300 ± 0.300" and "in 1 of 2 runs" in guard[3]
    s = quality.summarize(runs, targets=(1.0,), budgets=(3.0,), qualities=(10,))
    rows = {r[0]: r for r in quality.table_rows(s, (0, 1))}
    assert rows["minutes to q10 gain +1 dB"][1] == "not reached"
    assert rows["q10 gain after 3 min"][2] == f"s0: +0.300 (at 3.00 min), s1: {quality.SHORTER}"


def test_bad_flags_config_and_missing_matplotlib_exit_2(tmp_path, capsys, monkeypatch):
    for flags in (["--every", "0"], ["--qualities", "101"], ["--budgets", "-1"], ["--targets", "nan"]):
        with pytest.raises(SystemExit) as exit_:
            main(["bench", "quality", *flags])
        assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "a JPEG quality is a whole number in 1..100, not '101'" in err and "a number above 0, not 'nan'" in err
    argv = ["bench", "quality", "train.grad_accum=0", "--work", str(tmp_path / "w"), "--results", str(tmp_path / "r")]
    assert main(argv) == 2
    assert "train.grad_accum" in capsys.readouterr().err and not (tmp_path / "w").exists()  # nothing trained
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib: ImportError
    assert main(argv) == 2
    assert "pip install matplotlib" in capsys.readouterr().err


def test_a_seed_given_twice_is_refused_before_training(tmp_path, capsys, monkeypatch):
    """--seeds 0 0 trained one run and reported it as two seeds ("seeds 0, 0", "0 of 2 runs")."""
    monkeypatch.setattr(quality, "train_once", lambda *a: pytest.fail("trained"))
    argv = ["bench", "quality", "--seeds", "0", "0", "--work", str(tmp_path / "w"), "--results", str(tmp_path / "r")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "--seeds 0 0: a seed given twice" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "w").exists()  # nothing trained


def tiny_recipe(shards, steps: int, processes: int) -> list[str]:
    """The debug recipe (bench quality's default config) shrunk to seconds: a tiny generator, gen phase only."""
    return [f"data.root={shards}", "data.crop=32", "data.batch_size=2", "data.num_workers=0", "data.val_crop=32",
            "data.val_max_images=2", "data.val_batch_size=2", "data.shuffle_buffer=8", "data.val_qualities=[10]",
            "model.encoder=mobilenetv3_small_050", "model.decoder_width=16", "train.order=[gen]",
            f"train.phases.gen.steps={steps}", "train.val_every=0", "train.cpu=true", "train.progress=false",
            f"train.processes={processes}"]


def test_bench_quality_end_to_end(tmp_path, sample_shards, monkeypatch):
    """A recipe with ``train.processes=2`` trains each seed as two gloo ranks: the curve's points, their
    images (both ranks' batches), the targets and budgets, the table and the plot; a rerun reuses the run."""
    from PIL import Image

    # the training children: one thread each, as under pytest-xdist (conftest.py); OpenMP's spinning threads on a
    # busy 2-core machine made its 8 steps take 45 s instead of 1
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    res, work = tmp_path / "res", tmp_path / "work"
    tiny = tiny_recipe(sample_shards, steps=8, processes=2)
    argv = ["bench", "quality", *tiny, "--results", str(res), "--work", str(work), "--seeds", "0", "--every", "4",
            "--qualities", "10", "--targets", "0.01", "5", "--budgets", "100"]
    assert main(argv) == 0
    report = json.loads((res / f"{quality.NAME}.json").read_text())
    pts = report["runs"][0]["points"]
    assert [p["step"] for p in pts] == [4, 8]  # the checkpoint at 4; the generator file stands for the one at 8
    seconds = [p["train_seconds"] for p in pts]
    assert 0 < seconds[0] < seconds[1]
    assert [p["images"] for p in pts] == [4 * 2 * 2, 8 * 2 * 2]  # step x batch x ranks (no accumulation)
    assert report["summary"]["targets"]["5.0"]["minutes"]["mean"] is None  # 5 dB in 8 steps: not reached
    assert report["summary"]["budgets"]["100.0"]["missing"] == [quality.SHORTER]
    assert report["held_out"] == ["chelsea", "coffee", "coins_halved"]
    md = (res / f"{quality.NAME}.md").read_text()
    assert "chelsea, coffee, coins_halved" in md and "not reached" in md and report["machine"] in md
    with Image.open(res / f"{quality.NAME}.png") as png:
        assert png.format == "PNG" and png.size[0] > 100
        png.verify()
    run_dir = work / next(p.name for p in work.iterdir() if p.name.startswith("ttq-") and p.is_dir())
    assert not (run_dir / "checkpoints").exists(), "measured checkpoints are deleted"
    # a rerun reuses the finished run and the curve it measured (its checkpoints are gone)
    assert main(argv) == 0
    assert json.loads((res / f"{quality.NAME}.json").read_text())["runs"][0]["points"] == pts
