"""The README's main job: `dist-dejpeg train --config configs/debug.yaml` trains all three phases on the
bundled sample photographs on a CPU and its restored output beats the JPEG input at q=10.

This is the slowest test (1-2.5 minutes on 2 cores, beside the other tests or not; a shorter gen phase than the
recipe's); it runs in CI because it is the promise the README makes to a newcomer. The margin is a real one: a generator stuck at
identity ties the JPEG input exactly."""

import json
from pathlib import Path

import pytest
from accelerate.state import AcceleratorState, GradientState

from dist_dejpeg.cli import main

CONFIG = Path(__file__).parents[1] / "configs" / "debug.yaml"
MARGIN_DB = 0.2
GEN_STEPS = 150  # x 8 images (2 ranks): 1,200 images; the full recipe passed +0.3 dB at q10 after 1,280
CRITIC_STEPS, GAN_STEPS = 20, 30  # half the recipe's: each phase runs, the gan phase validates once before its end


@pytest.mark.slow
def test_debug_recipe_beats_jpeg_at_q10(tmp_path):
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    run = tmp_path / "run"
    # the README's command (two ranks, train.processes) with shorter phases (GEN_STEPS of the recipe's 2300,
    # the same one-cycle schedule compressed) and validation at q10 and q20 only (what is asserted; q20 also lets the guard judge the q20 photos below): every phase, the sample preparation and the
    # outputs as a newcomer gets them, in less than half the time; the full recipe's numbers come from
    # `dist-dejpeg bench quality` (benchmarks/results/quality.md), not from a test
    rc = main(["train", "--config", str(CONFIG), f"train.run_dir={run}", f"data.root={tmp_path / 'samples'}",
               "train.progress=false", "data.val_qualities=[10,20]", f"train.phases.gen.steps={GEN_STEPS}",
               f"train.phases.critic.steps={CRITIC_STEPS}", f"train.phases.gan.steps={GAN_STEPS}"])
    assert rc == 0
    assert (tmp_path / "samples" / "manifest.json").is_file(), "the sample shards are prepared when missing"
    metrics = json.loads((run / "metrics.json").read_text())
    q10 = metrics["q10"]
    gain = q10["restored"]["psnr"] - q10["jpeg"]["psnr"]
    assert gain > MARGIN_DB, f"restored beats JPEG at q10 by only {gain:.3f} dB"
    assert q10["restored"]["ssim"] > q10["jpeg"]["ssim"]
    assert metrics["meta"]["global_step"] == sum(metrics["meta"]["steps"].values()) or metrics["meta"]["stopped_early"]
    assert "random init" in metrics["meta"]["encoder"], "a random-init run must say so"
    # its LPIPS backbone is random: the gan phase keeps its best generator by validation PSNR (select_on auto)
    best = json.loads((run / "progress.json").read_text())["best"]
    assert best["metric"] == "psnr" and best["phase"] == "gan"
    from dist_dejpeg.models.generator_file import read_metadata

    # the generator file names the step of the generator it holds: the gan phase's best validation's
    assert int(read_metadata(run / "generator.safetensors")["global_step"]) == GEN_STEPS + CRITIC_STEPS + best["step"]
    check_restore_does_no_harm_on_a_folder_of_real_jpegs(run, tmp_path)


def _psnr(a, b) -> float:
    import numpy as np

    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float(10 * np.log10(255.0 ** 2 / mse)) if mse else float("inf")


def check_restore_does_no_harm_on_a_folder_of_real_jpegs(model: Path, tmp_path: Path) -> None:
    """Issue 22's promise, with the model the recipe just trained, on a photo it never saw (skimage's rocket):
    a camera-style JPEG at high quality (Photoshop-like tables, Pillow's "maximum"), a q20 photo re-saved at
    q90 (double compressed) and a plain q20 one. The first two are passed through or gain, the third is
    restored and gains; no output is further from the clean photo than its input."""
    import numpy as np
    import skimage.data
    from PIL import Image

    clean = skimage.data.rocket()
    folder, out = tmp_path / "photos", tmp_path / "restored"
    folder.mkdir()
    Image.fromarray(clean).save(folder / "camera.jpg", quality="maximum")
    Image.fromarray(clean).save(folder / "q20.jpg", quality=20)
    with Image.open(folder / "q20.jpg") as first:
        first.convert("RGB").save(folder / "double.jpg", quality=90)
    assert main(["restore", str(folder), "-o", str(out), "--model", str(model), "--quiet"]) == 0
    for name in ("camera", "double", "q20"):
        with Image.open(folder / f"{name}.jpg") as jpeg, Image.open(out / f"{name}.png") as restored:
            before, after = np.asarray(jpeg.convert("RGB")), np.asarray(restored.convert("RGB"))
        gain = _psnr(after, clean) - _psnr(before, clean)
        assert gain >= -0.005, f"{name}: restore lost {gain:.3f} dB against the clean photo"
        if name == "q20":
            assert not np.array_equal(before, after) and gain > 0, f"q20 not restored with a gain ({gain:.3f} dB)"
