"""`dist-dejpeg bench` on this CPU at tiny sizes: each benchmark writes its JSON and Markdown naming the
machine, the ratios come from rows of the same run, and the scaling model's arithmetic."""

from __future__ import annotations

import json
import math

import pytest

from dist_dejpeg.bench import scaling
from dist_dejpeg.cli import main

TINY = ["data.batch_size=2", "data.crop=64", "model.decoder_width=16", "critic.width=8",
        "model.encoder=mobilenetv3_small_050"]


def read(folder, name):
    report = json.loads((folder / f"{name}.json").read_text())
    md = (folder / f"{name}.md").read_text()
    assert report["machine"] in md and "torch" in md
    assert report["machine_info"]["cpu_cores"] >= 1
    return report, md


def test_bench_train_ladder_writes_rows_and_ratios(tmp_path, repo_root, monkeypatch):
    monkeypatch.chdir(repo_root)
    # two rungs of the ladder (compiling on 2 cores takes minutes; the trainer tests cover compile)
    from dist_dejpeg.bench import train

    monkeypatch.setattr(train, "LADDER", [train.LADDER[0], next(r for r in train.LADDER if "fused" in r[0])])
    assert main(["bench", "train", "--config", "configs/debug.yaml", "--steps", "1", "--repeats", "2", "--warmup", "1",
                 "--results", str(tmp_path), "--scaling-model", *TINY]) == 0
    report, md = read(tmp_path, "train")
    naive, tuned = report["results"][train.LADDER[0][0]], report["results"][train.TUNED]
    assert set(tuned) == {"gen", "gen without LPIPS", "critic", "gan generator turn"}
    assert naive["gen"]["x_naive"] == 1.0
    again = report["results"][train.AGAIN]["gen"]
    assert math.isclose(report["summary"]["baseline_repeat_ratio"], naive["gen"]["ms_per_call"] / again["ms_per_call"])
    assert math.isclose(tuned["gen"]["x_naive"], naive["gen"]["ms_per_call"] / tuned["gen"]["ms_per_call"])
    assert report["gflops_per_gen_step"] > 0 and tuned["gen"]["achieved_tflops"] > 0
    # the share is a ratio of two timings (it can come out below 0 when tiny steps are noisy): check its formula
    assert math.isclose(report["summary"]["lpips_share_tuned"],
                        1 - tuned["gen without LPIPS"]["ms_per_call"] / tuned["gen"]["ms_per_call"])
    assert "+ fused AdamW" in md and "tuned gen / naive gen" in md
    model, md = read(tmp_path, "scaling_model")
    assert report["machine"] in model["from"]
    assert model["gradient_bytes"]["generator"] > model["gradient_bytes"]["critic"] > 0


def test_bench_data_and_infer(tmp_path, repo_root, monkeypatch):
    monkeypatch.chdir(repo_root)
    with pytest.raises(ValueError, match="need tiles of at least 256 px"):
        main(["bench", "data", "--tiles", "128", "--results", str(tmp_path)])
    assert main(["bench", "data", "--tiles", "128", "--crop", "64", "--formats", "png", "raw", "--batches", "2",
                 "--threads", "1", "--results", str(tmp_path)]) == 0
    report, _ = read(tmp_path, "data")
    rows = report["crops_per_s"]
    assert rows["torch loader (webdataset + PIL) [128 px raw]"] > 0
    peer = rows["BasicSR-style peer (cv2 in workers) [128 px png files]"]
    assert math.isclose(report["ratio_to_peer_same_tiles"]["torch loader (webdataset + PIL) [128 px png]"],
                        rows["torch loader (webdataset + PIL) [128 px png]"] / peer)

    from dist_dejpeg.bench import infer

    infer.run("configs/debug.yaml", TINY, tmp_path, repeats=1, sizes={"64 x 96": (64, 96)},
              modes={"whole": dict(tile=0), "tiled": dict(tile=64, overlap=16)})
    report, _ = read(tmp_path, "infer")
    assert report["results"]["cpu fp32 whole 64 x 96"]["ms_per_megapixel"] > 0
    assert report["results"]["cpu bf16 tiled 64 x 96"]["ms_per_megapixel"] > 0


def test_allreduce_model_worked_example():
    # 100 MB over 8 GPUs on NVLink (400 GB/s, 5 us per hop): 2 * 7/8 * 1e8 / 4e11 s + 14 * 5 us
    assert math.isclose(scaling.allreduce_seconds(8, 1e8), 2 * 7 / 8 * 1e8 / 400e9 + 14 * 5e-6)
    assert scaling.allreduce_seconds(1, 1e8) == 0.0
    # across nodes the InfiniBand link (45 GB/s) bounds the ring
    assert scaling.allreduce_seconds(64, 1e8) > 5 * scaling.allreduce_seconds(8, 1e8)


@pytest.mark.parametrize("step_s", [0.01, 0.1])
def test_predicted_efficiency_falls_with_gpus_and_overlap_helps(step_s):
    no = [scaling.predicted_efficiency(step_s, 5e7, n, overlap=False) for n in (1, 8, 64, 256)]
    yes = [scaling.predicted_efficiency(step_s, 5e7, n, overlap=True) for n in (1, 8, 64, 256)]
    assert no[0] == yes[0] == 1.0
    assert no == sorted(no, reverse=True) and yes == sorted(yes, reverse=True)
    assert all(o >= n for o, n in zip(yes, no))


def test_bench_scaling_launches_one_and_two_processes(tmp_path, repo_root, monkeypatch):
    monkeypatch.chdir(repo_root)
    assert main(["bench", "scaling", "--config", "configs/debug.yaml", "--steps", "1", "--results", str(tmp_path),
                 *TINY]) == 0
    report, _ = read(tmp_path, "scaling")
    gen = report["measured"]["gen"]
    assert gen["images_per_s_1"] > 0 and gen["images_per_s_2"] > 0
    assert math.isclose(gen["efficiency"], gen["images_per_s_2"] / (2 * gen["images_per_s_1"]))
