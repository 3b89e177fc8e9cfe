"""The NoGAN trainer on CPU with a tiny model: which parameters each step updates, phase transitions and the
stop rule, exact resume, the NaN stop, and the files an end-to-end run leaves behind."""

from __future__ import annotations

import itertools
import json
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from accelerate.state import AcceleratorState, GradientState

from dist_dejpeg.config import ConfigError, load_config
from dist_dejpeg.data.shards import prepare_samples
from dist_dejpeg.models.generator_file import load_generator, read_metadata
from dist_dejpeg.models.names import shard_fingerprint
from dist_dejpeg.metrics.registry import VALIDATED as METRICS
from dist_dejpeg.train import checkpoint as ckpt
from dist_dejpeg.train import build as build_mod
from dist_dejpeg.train import compile as compile_mod
from dist_dejpeg.train import final as final_mod
from dist_dejpeg.train import trainer as trainer_mod
from dist_dejpeg.train.steps import critic_step, generator_step
from dist_dejpeg.train.trainer import Trainer, TrainingStopped, train


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shards")
    prepare_samples(out, tile=64, train_step=64, shard_size=32)
    return out


@pytest.fixture(autouse=True)
def fresh_accelerator_state():
    """Accelerate keeps process-wide state; each test builds its own Accelerator."""
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def tiny(run_dir: Path, shards: Path, *overrides: str):
    base = [
        f"data.root={shards}", "data.backend=torch", "data.crop=32", "data.batch_size=2", "data.num_workers=0", "data.val_crop=32",
        "data.val_max_images=4", "data.val_batch_size=4", "data.shuffle_buffer=8",
        "model.encoder=mobilenetv3_small_050", "model.pretrained=false", "model.decoder_width=16",
        "critic.width=8", "critic.n_blocks=2", "loss.lpips_net=alex", "loss.metric_net=alex",
        "loss.lpips_pretrained=false", f"train.run_dir={run_dir}", "train.mixed_precision=no", "train.cpu=true",
        "train.progress=false", "train.log_every=1", "train.val_every=0", "train.ckpt_every=0",
        "train.phases.gen.steps=3", "train.phases.critic.steps=2", "train.phases.gan.steps=4",
        "train.phases.gen.w_lpips=0.1",
    ]
    return load_config(None, base + list(overrides))


def params(module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def changed(before: dict, after: dict) -> set[str]:
    return {k for k in before if not torch.equal(before[k], after[k])}


def test_each_step_updates_only_its_model(tmp_path, shards):
    t = Trainer(tiny(tmp_path / "run", shards))
    batches = iter(t.loader)
    g0, c0 = params(t.gen_raw), params(t.critic_raw)

    t.generator.train()
    logs = generator_step(t.accelerator, t.generator, t.g_opt, batches, grad_accum=1, w_pixel=1.0, w_lpips=0.1,
                          lpips=t.lpips)
    assert {"gen/l1", "gen/lpips", "gen/total"} <= set(logs)
    g1, c1 = params(t.gen_raw), params(t.critic_raw)
    assert any("head" in k for k in changed(g0, g1)), "the zero-initialised head must move"
    assert not changed(c0, c1)

    t.generator.eval()  # the critic phase freezes the generator
    t.critic.train()
    critic_step(t.accelerator, t.critic, t.c_opt, batches, generator_raw=t.gen_raw, grad_accum=1)
    g2, c2 = params(t.gen_raw), params(t.critic_raw)
    assert not changed(g1, g2)
    assert changed(c1, c2)

    # gan generator step: gradients flow through the critic, but the critic does not change or keep grads
    t.generator.train()
    generator_step(t.accelerator, t.generator, t.g_opt, batches, grad_accum=1, w_pixel=1.0, w_lpips=0.0,
                   w_adv=1.0, critic_raw=t.critic_raw)
    g3, c3 = params(t.gen_raw), params(t.critic_raw)
    trained = {k for k in changed(c2, c3) if "parametrizations" not in k or k.endswith("original")}
    assert not trained, trained
    assert changed(g2, g3)
    assert all(p.grad is None for p in t.critic_raw.parameters())
    assert all(p.requires_grad for p in t.critic_raw.parameters())


class _Gen(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, x, quality=None):
        return (x + self.conv(x)).clamp(0, 1)


class _Critic(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 1, 3, padding=1)

    def forward(self, x, paired=False):
        return self.conv(x)


def test_grad_accum_updates_as_one_big_batch():
    """grad_accum micro-batches of B/grad_accum update each model as one batch of B does (Accelerate divides each
    micro-step's loss; clipping sees the summed gradient once), every loss term (L1, LPIPS, adversarial) included."""
    from accelerate import Accelerator

    from dist_dejpeg.models.lpips import LPIPS

    torch.manual_seed(0)
    lpips = LPIPS("alex", pretrained=False)
    g = torch.Generator().manual_seed(1)
    clean = torch.rand(4, 3, 32, 32, generator=g)
    batch = {"clean": clean, "jpeg": (clean + 0.1 * torch.randn(clean.shape, generator=g)).clamp(0, 1),
             "quality": torch.tensor([10, 20, 30, 40])}

    def updates(accum: int, max_grad_norm: float) -> list[torch.Tensor]:
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
        acc = Accelerator(cpu=True, gradient_accumulation_steps=accum)
        torch.manual_seed(0)
        gen, critic = _Gen(), _Critic()
        gen, g_opt, critic, c_opt = acc.prepare(gen, torch.optim.SGD(gen.parameters(), lr=1.0), critic,
                                                torch.optim.SGD(critic.parameters(), lr=1.0))
        n = 4 // accum
        parts = [{k: v[i:i + n] for k, v in batch.items()} for i in range(0, 4, n)]
        before = [gen.conv.weight.detach().clone(), critic.conv.weight.detach().clone()]
        generator_step(acc, gen, g_opt, iter(parts), grad_accum=accum, w_pixel=1.0, w_lpips=0.5, w_adv=0.3,
                       lpips=lpips, critic_raw=critic, max_grad_norm=max_grad_norm)
        critic_step(acc, critic, c_opt, iter(parts), generator_raw=gen, grad_accum=accum,
                    max_grad_norm=max_grad_norm)
        return [gen.conv.weight.detach() - before[0], critic.conv.weight.detach() - before[1]]

    for max_grad_norm in (0.0, 0.01):  # off, and on: every update clipped
        one = updates(1, max_grad_norm)
        assert all(d.abs().max() > 1e-4 for d in one)
        for accum in (2, 4):
            for big, acc_d in zip(one, updates(accum, max_grad_norm)):
                assert (acc_d - big).abs().max() < 2e-5 * big.abs().max(), (max_grad_norm, accum)


def test_validation_measures_the_output_as_restore_writes_it():
    """Validation rounds the restored crops to 8 bits, as restore and evaluate write them: a correction under half
    a level writes the JPEG's own pixels, so its metrics are the JPEG's and its gain is zero (the float output's
    PSNR differed, and the guard trusts that gain)."""
    from accelerate import Accelerator

    from dist_dejpeg.train.validation import validate

    class SubLevel(torch.nn.Module):
        def forward(self, x, quality=None):
            return x + 0.4 / 255

    g = torch.Generator().manual_seed(0)
    clean = torch.randint(20, 236, (6, 3, 24, 24), generator=g, dtype=torch.uint8)
    jpeg = (clean.int() + torch.randint(-6, 7, clean.shape, generator=g)).to(torch.uint8)
    no_lpips = lambda a, b: torch.zeros(a.shape[0])  # noqa: E731
    out = validate(Accelerator(cpu=True), SubLevel(), {30: (jpeg, clean)}, no_lpips, 4)["q30"]
    for name in ("psnr", "ssim", "psnr_y", "shift_r"):
        assert out["restored"][name] == pytest.approx(out["jpeg"][name], abs=1e-9), name
    assert out["gain"]["psnr"] == 0.0 and out["gain"]["count"] == 6


def test_gen_only_run_builds_no_critic(tmp_path, shards):
    cfg = tiny(tmp_path / "run", shards, "train.order=[gen]")
    t = Trainer(cfg)
    assert t.critic is None and t.c_opt is None


def test_end_to_end_writes_metrics_checkpoint_and_events(tmp_path, shards):
    cfg = tiny(tmp_path / "run", shards, "train.val_every=2")
    results = train(cfg)
    run = tmp_path / "run"
    metrics = json.loads((run / "metrics.json").read_text())
    for q in ("q10", "q20", "q40"):
        for group in ("jpeg", "restored"):
            assert set(metrics[q][group]) == set(METRICS)  # psnr, ssim, lpips, Y/Cb/Cr PSNR, colour shifts
            assert all(v == v for v in metrics[q][group].values())  # not NaN
    assert metrics["q10"] == results["q10"]
    assert "RANDOM" in metrics["meta"]["lpips"] and "random init" in metrics["meta"]["encoder"]
    assert metrics["meta"]["global_step"] == 3 + 2 + 4
    assert ckpt.latest_checkpoint(run).name == f"step-{9:08d}"
    from dist_dejpeg.run.files import FILE_MODE  # readable as the umask allows (safetensors 0.8 writes 0600)

    assert {f.name: oct(f.stat().st_mode & 0o777) for f in ckpt.latest_checkpoint(run).iterdir()} == {
        f.name: oct(FILE_MODE) for f in ckpt.latest_checkpoint(run).iterdir()}
    assert list((run / "tb").glob("events.out.tfevents.*"))
    assert (run / "config.yaml").read_text().startswith("data:")
    for q in ("q10", "q20", "q40"):  # the gain over the crops and its lower bound, which restore's guard trusts
        gain = metrics[q]["gain"]
        assert gain["psnr"] == pytest.approx(metrics[q]["restored"]["psnr"] - metrics[q]["jpeg"]["psnr"], abs=1e-6)
        assert gain["psnr_low"] < gain["psnr"]
    meta = read_metadata(run / "generator.safetensors")
    lows = {q[1:]: metrics[q]["gain"]["psnr_low"] for q in ("q10", "q20", "q40")}
    assert json.loads(meta["val_psnr_gain_low"]) == lows
    assert json.loads(meta["val_jpeg_psnr"]) == {q[1:]: metrics[q]["jpeg"]["psnr"] for q in ("q10", "q20", "q40")}
    # what it trained on, by which evaluate tells seen images from unseen ones
    assert json.loads(meta["train_shards"]) == {p.name: shard_fingerprint(p) for p in Path(shards).glob("train-*.tar")}
    sources = json.loads((Path(shards) / "manifest.json").read_text())["sources"]  # and the photos they were cut from
    assert sorted(json.loads(meta["train_sources"]).values()) == sorted(n for n, s in sources.items()
                                                                       if s["split"] == "train")
    import dist_dejpeg  # and the code that trained it: the version and, in a checkout, the commit

    assert meta["code"] == dist_dejpeg.code_version()
    assert meta["code"].startswith(f"dist_dejpeg {dist_dejpeg.version()}")
    # and from its start, whatever becomes of the run: each session's line in sessions.jsonl, one in train.log
    from dist_dejpeg.train.sessions import SESSION_KEYS

    (session,) = [json.loads(line) for line in (run / "sessions.jsonl").read_text().splitlines()]
    assert tuple(session) == SESSION_KEYS
    assert (session["code"], session["commit"]) == (meta["code"], dist_dejpeg.source_commit())
    assert (session["start_step"], session["resumed_from"], session["processes"]) == (0, None, 1)
    assert (session["mixed_precision"], session["device"]) == ("no", "cpu")
    import PIL
    import timm

    assert session["versions"]["torch"] == torch.__version__ and session["versions"]["timm"] == timm.__version__
    assert session["versions"]["Pillow"] == PIL.__version__ and session["versions"]["libjpeg"]
    assert f"session: {meta['code']}, torch {torch.__version__}" in (run / "train.log").read_text()
    generator = load_generator(run / "generator.safetensors")
    x = torch.rand(1, 3, 40, 24)
    assert generator(x).shape == x.shape


def test_resume_mid_phase_is_bit_identical(tmp_path, shards, monkeypatch):
    over = ("train.order=[gen,critic]", "train.phases.gen.steps=6", "train.ckpt_every=4", "train.keep_last=5",
            "data.num_workers=1")
    # the trainer's clock ticks one second per read: each step (start and end read) adds exactly 1.0 train_seconds,
    # whatever validation or saving takes
    monkeypatch.setattr(trainer_mod, "time", SimpleNamespace(perf_counter=itertools.count().__next__))
    full_dir, resumed_dir = tmp_path / "full", tmp_path / "resumed"
    train(tiny(full_dir, shards, *over))
    mid = ckpt.checkpoint_dir(full_dir) / f"step-{4:08d}"
    assert mid.is_dir()
    state = json.loads((mid / "trainer_state.json").read_text())
    assert (state["phase_index"], state["phase_step"]) == (0, 4)
    # train_seconds: in every checkpoint, growing with the steps (gen 6 then critic 2), and in metrics.json's meta
    seconds = [json.loads((c / "trainer_state.json").read_text())["train_seconds"]
               for c in ckpt.list_checkpoints(full_dir)]
    assert seconds == [4.0, 6.0, 8.0]
    assert json.loads((full_dir / "metrics.json").read_text())["meta"]["train_seconds"] == 8.0

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    train(tiny(resumed_dir, shards, *over), resume=str(mid))
    full = ckpt.latest_checkpoint(full_dir)
    again = ckpt.latest_checkpoint(resumed_dir)
    assert full.name == again.name
    from safetensors.torch import load_file

    for name in ("model.safetensors", "model_1.safetensors", "ema_generator.safetensors"):  # the EMA's too
        a, b = load_file(str(full / name)), load_file(str(again / name))
        assert a.keys() == b.keys()
        diff = [k for k in a if not torch.equal(a[k], b[k])]
        assert not diff, f"{name}: {diff[:5]}"
    assert (json.loads((full_dir / "metrics.json").read_text())["q10"]
            == json.loads((resumed_dir / "metrics.json").read_text())["q10"])
    # the resumed run goes on from the checkpoint's 4 s: 4 more steps make 8, as the uninterrupted run
    assert json.loads((resumed_dir / "metrics.json").read_text())["meta"]["train_seconds"] == 8.0


def test_resume_gives_the_same_next_loss(tmp_path, shards):
    over = ("train.order=[gen]", "train.phases.gen.steps=3")
    t = Trainer(tiny(tmp_path / "a", shards, *over))
    batches = iter(t.loader)
    step = dict(grad_accum=1, w_pixel=1.0, w_lpips=0.1)
    generator_step(t.accelerator, t.generator, t.g_opt, batches, lpips=t.lpips, **step)
    path = t.save()
    expected = generator_step(t.accelerator, t.generator, t.g_opt, batches, lpips=t.lpips, **step)

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    t2 = Trainer(tiny(tmp_path / "b", shards, *over))
    t2.resume(path)
    got = generator_step(t2.accelerator, t2.generator, t2.g_opt, iter(t2.loader), lpips=t2.lpips, **step)
    assert got["gen/total"].item() == expected["gen/total"].item()


CONSTANT = ("train.order=[gen]", "train.phases.gen.schedule=constant", "train.phases.gen.warmup=0")


@pytest.fixture(scope="module")
def gen_run(tmp_path_factory, shards) -> Path:
    """A finished 3-step gen-only run at a constant lr (read-only: tests copy it)."""
    run = tmp_path_factory.mktemp("gen_run") / "run"
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    train(tiny(run, shards, *CONSTANT))
    return run


def test_a_finished_run_given_more_steps_continues_its_last_phase(tmp_path, shards, gen_run, caplog):
    # constant lr: a run of 3 steps extended to 5 is the uninterrupted 5-step run, bit for bit
    shutil.copytree(gen_run, tmp_path / "short")
    assert ckpt.latest_checkpoint(tmp_path / "short").name == f"step-{3:08d}"
    with caplog.at_level("INFO", logger="dist_dejpeg"):
        train(tiny(tmp_path / "short", shards, *CONSTANT, "train.phases.gen.steps=5"))  # auto_resume: the same folder
    assert "train.phases.gen.steps 3 -> 5: phase 'gen' ended at step 3" in caplog.text, caplog.text
    assert json.loads((tmp_path / "short" / "metrics.json").read_text())["meta"]["global_step"] == 5
    # the resumed session appended its own line to the first session's: where it started, from which checkpoint
    lines = [json.loads(line) for line in (tmp_path / "short" / "sessions.jsonl").read_text().splitlines()]
    assert [(s["start_step"], s["resumed_from"]) for s in lines] == [
        (0, None), (3, str(tmp_path / "short" / "checkpoints" / f"step-{3:08d}"))]
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    train(tiny(tmp_path / "long", shards, *CONSTANT, "train.phases.gen.steps=5"))
    from safetensors.torch import load_file

    a = load_file(str(tmp_path / "short" / "generator.safetensors"))
    b = load_file(str(tmp_path / "long" / "generator.safetensors"))
    assert a.keys() == b.keys() and not [k for k in a if not torch.equal(a[k], b[k])]


def test_a_gan_phase_given_more_steps_continues_from_its_last_step_not_the_best_it_kept(tmp_path, shards,
                                                                                        monkeypatch, caplog):
    """The gan phase's end puts its best generator back (here its step 2's) and saves; given more steps, the phase
    reopened from that checkpoint trained on from the best generator with the last step's critic and moments, so
    4 + 2 steps were not the 6-step run. It continues from the last step's generator (last_generator.safetensors),
    and the critic (trained against its outputs) and the kept generator are the 6-step run's, bit for bit."""
    from safetensors.torch import load_file

    from dist_dejpeg.run.layout import LAST_GENERATOR
    from dist_dejpeg.train import trainer as trainer_mod

    over = ("train.phases.gan.schedule=constant", "train.phases.gan.warmup=0", "train.phases.gan.val_every=2",
            "train.phases.gan.critic_iters=1", "train.phases.gan.gen_iters=1", "train.phases.gan.select_on=psnr")
    # PSNR: the first gan validation (its step 2) stays the best (two calls a validation: the history's, the rule's)
    scores = iter([30.0, 30.0] + [20.0, 20.0] * 10)
    monkeypatch.setattr(trainer_mod, "mean_restored", lambda results, metric: next(scores))
    train(tiny(tmp_path / "short", shards, *over))
    end = ckpt.latest_checkpoint(tmp_path / "short")
    assert (end / LAST_GENERATOR).is_file()  # the end-of-phase checkpoint: the best put back, the last kept beside
    scores = iter([30.0, 30.0] + [20.0, 20.0] * 10)
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    with caplog.at_level("INFO", logger="dist_dejpeg"):
        train(tiny(tmp_path / "short", shards, *over, "train.phases.gan.steps=6"))
    assert "continues from its last step's generator" in caplog.text
    scores = iter([30.0, 30.0] + [20.0, 20.0] * 10)
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    train(tiny(tmp_path / "long", shards, *over, "train.phases.gan.steps=6"))
    a, b = (ckpt.latest_checkpoint(tmp_path / run) for run in ("short", "long"))
    assert a.name == b.name
    for name in ("model.safetensors", "model_1.safetensors", LAST_GENERATOR):
        x, y = load_file(str(a / name)), load_file(str(b / name))
        assert x.keys() == y.keys() and not [k for k in x if not torch.equal(x[k], y[k])], name


def test_a_finished_run_given_fewer_steps_keeps_the_steps_it_trained(tmp_path, shards, gen_run, caplog):
    """The first command again, after a run was given more steps: it validates again, and the run folder's
    config and progress keep the length trained (they said "gen 2 done", step 3/2)."""
    shutil.copytree(gen_run, tmp_path / "run")
    with caplog.at_level("INFO", logger="dist_dejpeg"):
        train(tiny(tmp_path / "run", shards, *CONSTANT, "train.phases.gen.steps=2"))
    assert "train.phases.gen.steps 3 -> 2: phase 'gen' is finished, so it keeps 3 steps" in caplog.text, caplog.text
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    progress = json.loads((tmp_path / "run" / "progress.json").read_text())
    assert saved["train"]["phases"]["gen"]["steps"] == 3 and progress["total_steps"] == progress["global_step"] == 3


def test_a_finished_phase_with_later_phases_cannot_grow(tmp_path, shards):
    over = ("train.order=[gen,critic]", "train.phases.gen.steps=2", "train.phases.critic.steps=1")
    train(tiny(tmp_path / "run", shards, *over))
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    before = sorted(p.name for p in ckpt.checkpoint_dir(tmp_path / "run").iterdir())
    with pytest.raises(ConfigError, match=r"train.phases.gen.steps 2 -> 4, but phase 'gen' is finished and phase "
                                          r"'critic' has trained since.*train.phases.gen.steps=2"):
        train(tiny(tmp_path / "run", shards, *over, "train.phases.gen.steps=4"))
    assert sorted(p.name for p in ckpt.checkpoint_dir(tmp_path / "run").iterdir()) == before  # nothing lost


def test_a_new_run_starts_from_a_trained_generator(tmp_path, shards, gen_run):
    source = gen_run / "generator.safetensors"
    # model.pretrained=true would need ImageNet's file (offline here: an error); the source's weights replace it
    # and its lineage (random init) is what the run records
    cfg = tiny(tmp_path / "b", shards, "train.order=[gen]", "train.phases.gen.steps=0", "model.pretrained=true",
               f"model.init_from={gen_run}")
    train(cfg)
    from safetensors.torch import load_file

    a, b = load_file(str(source)), load_file(str(tmp_path / "b" / "generator.safetensors"))
    assert a.keys() == b.keys() and not [k for k in a if not torch.equal(a[k], b[k])]
    assert "random init" in json.loads((tmp_path / "b" / "metrics.json").read_text())["meta"]["encoder"]
    for override, match in ((f"model.init_from={source}", r"model.decoder_width 16 \(here 32\)"),
                            (f"model.init_from={tmp_path / 'none'}", r"'model.init_from'.*no such file")):
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
        with pytest.raises(ConfigError, match=match):
            train(tiny(tmp_path / "c", shards, "train.order=[gen]", "model.decoder_width=32", override))


def test_init_from_logs_the_checkpoint_it_loaded(tmp_path, monkeypatch, caplog):
    """model.init_from=RUN (a live run, checkpoints only) logged model.init_from resolved again after the load: the
    source run's next checkpoint, saved meanwhile, was named though the generator came from the one before."""
    import dataclasses

    from safetensors.torch import save_file

    import dist_dejpeg.train.build as build
    from dist_dejpeg.config import Config, ModelConfig, to_dict
    from dist_dejpeg.models.unet import build_generator

    model_cfg = ModelConfig(encoder="mobilenetv3_small_050", pretrained=False, encoder_depth=3, decoder_width=16)
    loaded = tmp_path / "source" / "checkpoints" / "step-00000004"
    loaded.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in build_generator(model_cfg).state_dict().items()},
              str(loaded / "model.safetensors"))
    (loaded / "config.yaml").write_text(yaml.safe_dump(to_dict(Config(model=model_cfg))))
    (loaded / "trainer_state.json").write_text(json.dumps({"global_step": 4}))
    real_load = build.load_model

    def load_then_the_source_saves(*args, **kwargs):
        out = real_load(*args, **kwargs)
        shutil.copytree(loaded, loaded.parent / "step-00000008")  # the live source run's next checkpoint
        return out

    monkeypatch.setattr(build, "load_model", load_then_the_source_saves)
    with caplog.at_level("INFO", logger="dist_dejpeg"):
        build._init_from(dataclasses.replace(model_cfg, init_from=str(tmp_path / "source")))
    said = [r.getMessage() for r in caplog.records if "model.init_from" in r.getMessage()]
    assert said == [f"model.init_from: the generator starts from {loaded}"], said


def test_init_from_takes_another_blur_or_keep_mean_and_a_resume_does_not(tmp_path, resume_with):
    """model.init_from refused a source with another blur or keep_mean as "a generator of other shapes", though neither
    makes a tensor: a fine-tune may switch them (the run's generator is built as its config says and takes the
    source's weights). A resumed run may not: it continues the architecture it trained."""
    import dataclasses

    from dist_dejpeg.config import ModelConfig
    from dist_dejpeg.models.generator_file import save_generator
    from dist_dejpeg.models.layers import Blur
    from dist_dejpeg.models.unet import build_generator
    from dist_dejpeg.train.build import _init_from
    from dist_dejpeg.train.init_from import init_from_config

    source_cfg = ModelConfig(encoder="mobilenetv3_small_050", pretrained=False, encoder_depth=3, decoder_width=16)
    torch.manual_seed(0)
    source = build_generator(source_cfg)
    torch.nn.init.normal_(source.head.weight, std=0.05)  # (an untrained head is zero: any load would match it)
    save_generator(source, source_cfg, tmp_path / "g.safetensors")
    asked = dataclasses.replace(source_cfg, blur=False, keep_mean=True, init_from=str(tmp_path / "g.safetensors"))
    model = init_from_config(asked)
    generator = _init_from(model)
    assert generator.keep_mean and not [m for m in generator.modules() if isinstance(m, Blur)]
    mine, theirs = generator.state_dict(), source.state_dict()
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    with pytest.raises(ConfigError, match=r"other shapes: model.decoder_width 16 \(here 32\)"):
        init_from_config(dataclasses.replace(asked, decoder_width=32))

    resume = resume_with(source_cfg)
    assert resume(source_cfg)
    with pytest.raises(ConfigError, match=r"model.blur True -> False: these keys change what the trained generator "
                                          r"computes.*model.init_from="):
        resume(dataclasses.replace(source_cfg, blur=False))


def _validated(restored_lpips: float, restored_psnr: float = 1.0) -> dict:
    """What validate() returns, for one quality: the JPEG's and the restored crops' metrics, and the gain."""
    return {"q10": {"jpeg": dict(psnr=1.0, ssim=1.0, lpips=1.0),
                    "restored": dict(psnr=restored_psnr, ssim=1.0, lpips=restored_lpips),
                    "gain": dict(psnr=0.0, psnr_low=0.0, count=1)}}


def test_stop_rule_ends_gan_phase_and_keeps_best(tmp_path, shards, monkeypatch):
    scripted = iter([0.5, 0.4, 0.45, 0.41, 0.9, 0.9, 0.9])
    seen_steps = []

    def fake_validate(accelerator, generator, val_set, lpips, batch_size, cudagraphs=False, also=()):
        value = next(scripted)
        return _validated(value)

    monkeypatch.setattr(trainer_mod, "validate", fake_validate)
    monkeypatch.setattr(final_mod, "validate", fake_validate)  # the final validation's (train/final.py)
    cfg = tiny(tmp_path / "run", shards, "train.order=[gan]", "train.phases.gan.steps=20",
               "train.phases.gan.val_every=1", "train.phases.gan.patience=2", "train.phases.gan.critic_iters=0",
               "train.phases.gan.gen_iters=1", "train.phases.gan.lr=1e-2", "train.phases.gan.select_on=lpips")
    t = Trainer(cfg)
    real_validate_in_phase = t._validate_in_phase

    def spy(name, phase, stop):
        out = real_validate_in_phase(name, phase, stop)
        seen_steps.append(t.state.phase_step)
        if t.state.phase_step == 2:  # the best so far (0.4): remember those weights
            spy.best = params(t.gen_raw)
        return out

    t._validate_in_phase = spy
    final = t.fit()
    # values 0.5 (step 1), 0.4 (step 2, best), 0.45, 0.41 -> two checks without improvement -> stop at step 4
    assert t.state.stopped_early == {"gan": 4}
    assert seen_steps[:3] == [1, 2, 3] and t.state.global_step == 4
    assert not changed(spy.best, params(t.gen_raw)), "the best generator (step 2) must be kept"
    # the kept generator is not the one validated last (step 4): the final validation measures it again
    assert final["q10"]["restored"]["lpips"] == 0.9


def test_a_resumed_gan_phase_on_another_validation_set_starts_its_stop_rule_over(tmp_path, shards, monkeypatch,
                                                                                  caplog):
    """Shards prepared again (or data.val_* changed) between sessions: the best so far was measured on other crops,
    so it no longer decides what is kept: the rule starts over (with the same validation: unchanged)."""
    gan = ("train.order=[gan]", "train.phases.gan.val_every=1", "train.phases.gan.critic_iters=0",
           "train.phases.gan.gen_iters=1", "train.phases.gan.select_on=lpips", "train.phases.gan.schedule=constant")
    monkeypatch.setattr(trainer_mod, "validate", lambda *a, **k: _validated(next(scripted)))
    scripted = itertools.chain([0.1], itertools.repeat(0.5))  # step 1 best (then the final validations)
    train(tiny(tmp_path / "run", shards, *gan, "train.phases.gan.steps=2"))
    shutil.copytree(tmp_path / "run", tmp_path / "same")
    for run, other, best_step in (("same", (), 1), ("run", ("data.val_max_images=1",), 3)):
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
        scripted = itertools.chain([0.3], itertools.repeat(0.35))  # step 3 best, but worse than 0.1 (old crops)
        caplog.clear()
        with caplog.at_level("INFO", logger="dist_dejpeg"):
            train(tiny(tmp_path / run, shards, *gan, "train.phases.gan.steps=4", *other))
        changed = "the validation set changed since the checkpoint" in caplog.text
        assert changed == bool(other), caplog.text
        state = json.loads((ckpt.latest_checkpoint(tmp_path / run) / "trainer_state.json").read_text())
        assert state["stop"]["best_step"] == best_step and state["val_set"], (run, state["stop"])


def test_a_random_backbone_lpips_does_not_pick_the_kept_generator(tmp_path, shards, monkeypatch):
    """loss.lpips_pretrained=false (configs/debug.yaml): the gan phase keeps the best generator by validation PSNR
    and stops on it (select_on auto), not by the random LPIPS, which here favours step 2."""
    scripted = iter([(0.5, 20.0), (0.1, 19.0), (0.45, 22.0), (0.41, 21.0), (0.3, 21.5), (0.9, 0.0), (0.9, 0.0)])
    monkeypatch.setattr(trainer_mod, "validate", lambda *a, **k: _validated(*next(scripted)))
    cfg = tiny(tmp_path / "run", shards, "train.order=[gan]", "train.phases.gan.steps=20",
               "train.phases.gan.val_every=1", "train.phases.gan.patience=2", "train.phases.gan.critic_iters=0",
               "train.phases.gan.gen_iters=1", "train.phases.gan.lr=1e-2")
    t = Trainer(cfg)
    real_validate_in_phase, kept = t._validate_in_phase, {}

    def spy(name, phase, stop):
        out = real_validate_in_phase(name, phase, stop)
        kept[t.state.phase_step] = params(t.gen_raw)
        return out

    t._validate_in_phase = spy
    t.fit()
    # PSNR 20, 19, 22 (step 3, best), 21, 21.5: two checks without improvement -> stop at step 5, step 3 kept
    assert t.state.stopped_early == {"gan": 5}
    assert not changed(kept[3], params(t.gen_raw)) and changed(kept[2], params(t.gen_raw))
    assert t.state.stop["metric"] == "psnr" and (t.state.stop["best"], t.state.stop["best_step"]) == (22.0, 3)
    assert [h[2] for h in t.state.history] == [0.5, 0.1, 0.45, 0.41, 0.3]  # the history stays LPIPS
    progress = json.loads((tmp_path / "run" / "progress.json").read_text())
    assert progress["best"] == {"metric": "psnr", "value": 22.0, "step": 3, "phase": "gan"}


def test_final_validation_reuses_the_last_one_when_nothing_changed(tmp_path, shards, monkeypatch):
    scripted = iter([0.5, 0.4, 0.3, 0.9])
    calls = []

    def fake_validate(accelerator, generator, val_set, lpips, batch_size, cudagraphs=False, also=()):
        calls.append(batch_size)
        value = next(scripted)
        return _validated(value)

    monkeypatch.setattr(trainer_mod, "validate", fake_validate)
    monkeypatch.setattr(final_mod, "validate", fake_validate)  # the raw generator's, for the meta
    cfg = tiny(tmp_path / "run", shards, "train.order=[gan]", "train.phases.gan.steps=3",
               "train.phases.gan.val_every=1", "train.phases.gan.patience=2", "train.phases.gan.critic_iters=0",
               "train.phases.gan.gen_iters=1", "train.phases.gan.select_on=lpips")
    seen = []

    def finish(trainer):  # the EMA's forwards in the final validation
        seen.append(_count_crops(trainer.ema.model(trainer.gen_raw)))
        return final_mod.finish_run(trainer)

    monkeypatch.setattr(trainer_mod, "finish_run", finish)
    t = Trainer(cfg)
    final = t.fit()
    # validated after steps 1, 2, 3; the last one (0.3) is the best and is kept: the final result is that one;
    # then the raw (non-EMA) generator once, for metrics.json's meta (0.9)
    assert len(calls) == 4 and final["q10"]["restored"]["lpips"] == 0.3
    # one forward of the EMA for the conformed gains and the grid (was one each)
    assert seen == [[sum(jpeg.shape[0] for jpeg, _ in t.val_set.values())]], seen
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["q10"]["restored"]["lpips"] == 0.3
    assert metrics["meta"]["ema"]["raw"]["q10"]["restored"]["lpips"] == 0.9


class NaNAfter:
    """A loader that yields good batches and then one with a NaN."""

    def __init__(self, inner, good: int):
        self.inner, self.good = inner, good

    def __iter__(self):
        for i, batch in enumerate(self.inner):
            if i == self.good:
                batch = dict(batch, clean=torch.full_like(batch["clean"], float("nan")))
            yield batch

    def state_dict(self):
        return self.inner.state_dict()


def test_nan_loss_stops_with_checkpoint_and_message(tmp_path, shards):
    cfg = tiny(tmp_path / "run", shards, "train.order=[gen]", "train.phases.gen.steps=10")
    from dist_dejpeg.data import build_train_loader

    loader = NaNAfter(build_train_loader(cfg, 0, 1, torch.device("cpu")), good=3)
    t = Trainer(cfg, train_loader=loader)
    with pytest.raises(TrainingStopped, match=r"phase 'gen' at step 3"):
        t.fit()
    latest = ckpt.latest_checkpoint(tmp_path / "run")
    assert latest is not None and latest.name == f"step-{3:08d}"
    from safetensors.torch import load_file

    weights = load_file(str(latest / "model.safetensors"))
    assert all(torch.isfinite(v).all() for v in weights.values() if v.is_floating_point())


# ops that make the host wait for a GPU: a tensor read into Python (.item(), float(), bool()) or a result whose
# size depends on the data (nonzero: boolean indexing, masked_select)
HOST_READS = {"aten::item", "aten::_local_scalar_dense", "aten::is_nonzero", "aten::nonzero", "aten::masked_select",
              "aten::unique", "aten::_unique2"}


def inside_fused_adamw(event) -> bool:
    """Whether a profiled op runs inside the fused AdamW kernel: its CPU kernel reads its step and found_inf
    scalars in C++ (aten::item), where the CUDA kernel reads them on the device."""
    parent = event.cpu_parent
    while parent is not None:
        if parent.name == "aten::_fused_adamw_":
            return True
        parent = parent.cpu_parent
    return False


def test_the_step_reads_nothing_back_between_host_checks(tmp_path, shards, monkeypatch):
    """Issue 24, no host syncs in the step, checked on the CPU: with the deferred checks (the CUDA fast path) the
    gen, critic and gan updates, EMA, chroma-weighted pixel loss, blind-quality mask and LPIPS included, run no op
    that reads a tensor back to the host (on a GPU each would wait for the queued work). The GPU test under CUDA's
    sync debug mode (test_the_step_never_waits_for_the_gpu_on_cuda) also catches blocking copies."""
    from torch.profiler import profile

    from dist_dejpeg.bench.train import Synthetic

    monkeypatch.setattr(build_mod, "DEFERRED_CHECK_DEVICES", ("cuda", "cpu"))
    cfg = tiny(tmp_path / "run", shards, "train.sync_every=1000", "loss.chroma_weight=2", "train.fused_adamw=true",
               "model.quality_conditioning=true", "model.quality_blind_prob=0.5", "train.ema_decay=0.999")
    t = Trainer(cfg, train_loader=Synthetic(cfg, torch.device("cpu")), val_set={})
    try:
        assert t.flags is not None and t.ema.enabled
        batches = iter(t.loader)
        kinds = {p.kind: p for p in cfg.train.phases.values()}
        turns = [(kinds["gen"], "gen"), (kinds["critic"], "critic"), (kinds["gan"], "gen"), (kinds["gan"], "critic")]
        for phase, turn in turns:  # first calls: lazy initialisation
            t.train_step(phase, turn, batches)
        for phase, turn in turns:
            with profile() as prof:
                t.train_step(phase, turn, batches)
            reads = sorted({e.name for e in prof.events() if e.name in HOST_READS and not inside_fused_adamw(e)})
            assert not reads, f"{phase.kind}/{turn}: {reads}"
    finally:
        t.close()


def test_deferred_checks_skip_nonfinite_updates_then_stop(tmp_path, shards, monkeypatch):
    """The CUDA fast path, run on the CPU: no host read inside a step; the NaN step's update is skipped on the
    device (fused AdamW's found_inf), and the run stops with a checkpoint at the next host check."""
    monkeypatch.setattr(build_mod, "DEFERRED_CHECK_DEVICES", ("cuda", "cpu"))
    cfg = tiny(tmp_path / "run", shards, "train.order=[gen]", "train.phases.gen.steps=10", "train.sync_every=4",
               "train.log_every=100")
    from dist_dejpeg.data import build_train_loader

    loader = NaNAfter(build_train_loader(cfg, 0, 1, torch.device("cpu")), good=1)  # step 2 gets the NaN
    t = Trainer(cfg, train_loader=loader)
    assert t.fused and t.flags is not None and t.sync_every == 4
    seen = []
    real_step = t.train_step

    def spy(phase, turn, batches):  # parameters before and after each update
        before = params(t.gen_raw)
        out = real_step(phase, turn, batches)
        seen.append(changed(before, params(t.gen_raw)))
        return out

    t.train_step = spy
    with pytest.raises(TrainingStopped, match=r"1 non-finite loss\(es\) between global steps 1 and 4.*no update"):
        t.fit()
    trainable = {k for k, v in t.gen_raw.named_parameters()}
    assert len(seen) == 4
    assert not (seen[1] & trainable), "the NaN step must not update any parameter"
    assert seen[0] & trainable and seen[2] & trainable, "good steps around it update"
    latest = ckpt.latest_checkpoint(tmp_path / "run")
    assert latest is not None and latest.name == f"step-{4:08d}"
    assert all(torch.isfinite(v).all() for v in params(t.gen_raw).values() if v.is_floating_point())


def test_data_wait_fraction_is_logged(tmp_path, shards):
    cfg = tiny(tmp_path / "run", shards, "train.order=[gen]", "train.phases.gen.steps=4", "train.log_every=2")
    t = Trainer(cfg)
    logged = {}
    t.monitor.scalars = lambda values, step: logged.update({(k, step): v for k, v in values.items()})
    t.fit()
    fracs = [v for (k, _), v in logged.items() if k == "train/data_wait_frac"]
    assert len(fracs) == 2 and all(0.0 <= f <= 1.0 for f in fracs)


def test_log_window_means_over_steps_images_per_second_and_data_wait():
    """The window the loop logs every train.log_every steps: device sums, read once, then a fresh window."""
    import time
    from types import SimpleNamespace

    from dist_dejpeg.train.window import LogWindow, TimedBatches, sum_over_ranks

    def slow():
        while True:
            time.sleep(0.01)
            yield {}

    batches = TimedBatches(slow())
    window = LogWindow(SimpleNamespace(num_processes=1), images_per_step=8, batches=batches)
    for value in (1.0, 3.0):
        next(batches)
        window.add({"gen/l1": torch.tensor(value), "gen/total": torch.tensor(2 * value)})
    scalars, seconds_per_step = window.read(lr=1e-3)
    assert scalars["train/gen/l1"] == 2.0 and scalars["train/gen/total"] == 4.0 and scalars["train/lr"] == 1e-3
    assert seconds_per_step >= 0.01 and scalars["train/images_per_s"] == pytest.approx(8 / seconds_per_step)
    assert 0.5 < scalars["train/data_wait_frac"] <= 1.0  # nearly all of it was spent in next()
    window.reset()
    window.add({"gen/l1": torch.tensor(5.0)})
    scalars, _ = window.read(lr=0.0)
    assert scalars["train/gen/l1"] == 5.0 and scalars["train/data_wait_frac"] < 0.5  # no batch waited for
    assert sum_over_ranks(SimpleNamespace(num_processes=1), {"bad_jpeg": 2}) == {"bad_jpeg": 2}


def test_build_accelerator_returns_the_effective_config_and_leaves_its_input_alone(tmp_path, shards, monkeypatch):
    """An accelerate launcher's DeepSpeed stage becomes the run's (train.deepspeed_stage=0 takes it) in the
    returned config; the caller's config keeps what it said. A stage the trainer cannot run is a config error."""
    cfg = tiny(tmp_path / "run", shards)
    monkeypatch.setattr(build_mod, "launcher_deepspeed_stage", lambda: 2)
    monkeypatch.setattr(build_mod, "_deepspeed_accelerator", lambda cfg, cpu, timeout: cfg.train.deepspeed_stage)
    stage, effective = build_mod.build_accelerator(cfg)
    assert stage == effective.train.deepspeed_stage == 2 and cfg.train.deepspeed_stage == 0
    monkeypatch.setattr(build_mod, "launcher_deepspeed_stage", lambda: 3)
    with pytest.raises(ConfigError, match="train.deepspeed_stage.*ZeRO stage 3"):
        build_mod.build_accelerator(cfg)
    assert cfg.train.deepspeed_stage == 0


def test_image_grids_every_image_every_steps(tmp_path, shards):
    """train.image_every=N: an image grid every N global steps instead of at each validation, and the final one."""
    cfg = tiny(tmp_path / "run", shards, "train.order=[gen]", "train.phases.gen.steps=4", "train.image_every=2",
               "train.val_every=3", "train.log_every=100")
    t = Trainer(cfg)
    images = []
    t.monitor.image = lambda tag, grid, step: images.append((tag, step, tuple(grid.shape[:1])))
    t.fit()
    assert images == [("val/jpeg_restored_clean_gen", 2, (3,)), ("val/jpeg_restored_clean_gen", 4, (3,)),
                      ("val/jpeg_restored_clean_final", 4, (3,))]


@pytest.mark.parametrize("setting", ["default", "empty", "user"])
def test_compiled_kernels_are_cached_in_the_run_folder(tmp_path, shards, monkeypatch, setting):
    """When compiling starts, inductor's cache is the run folder's compile_cache (a requeued run finds its
    kernels there); with train.compile_cache='' inductor's own default; a TORCHINDUCTOR_CACHE_DIR the user set
    before the run is left alone."""
    seen = []

    def recording_backend(graph_module, example_inputs):  # what inductor would read, at the moment it compiles
        seen.append(os.environ.get("TORCHINDUCTOR_CACHE_DIR"))
        return graph_module.forward

    monkeypatch.setattr(compile_mod, "COMPILE_BACKEND", recording_backend)
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    overrides = ["train.compile_cache=''"] if setting == "empty" else []
    if setting == "user":
        monkeypatch.setattr(compile_mod, "USER_COMPILE_CACHE", str(tmp_path / "mine"))
        monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))
    cfg = tiny(tmp_path / "run", shards, "train.order=[gen]", "train.phases.gen.steps=1", "train.compile=true",
               *overrides)
    trainer = Trainer(cfg)
    if setting == "default":  # compiling is lazy: the first step compiles (the others check the setting only)
        trainer.fit()
        assert trainer.compile_watch.outcome["graphs"] > 0 and not trainer.compile_watch.outcome["fell_back"]
    else:
        seen.append(os.environ.get("TORCHINDUCTOR_CACHE_DIR"))
        trainer.close()
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    expected = {"default": str((tmp_path / "run" / "compile_cache").absolute()), "empty": default_cache_dir(),
                "user": str(tmp_path / "mine")}[setting]
    assert seen and {d or default_cache_dir() for d in seen} == {expected}  # unset: inductor takes its default


def test_compile_failure_falls_back_to_eager_with_a_warning(tmp_path, shards, monkeypatch, caplog):
    def broken_backend(graph_module, example_inputs):
        raise RuntimeError("this compiler is broken on purpose")

    monkeypatch.setattr(compile_mod, "COMPILE_BACKEND", broken_backend)
    torch._dynamo.reset()  # frames compiled by earlier tests: their cache could answer
    cfg = tiny(tmp_path / "run", shards, "train.order=[gen]", "train.phases.gen.steps=2", "train.compile=true")
    t = Trainer(cfg)
    before = params(t.gen_raw)
    with caplog.at_level("WARNING"):
        t.fit()
    assert changed(before, params(t.gen_raw)), "training went on (eagerly)"
    assert "broken on purpose" in caplog.text
    # and the run says it is not a compiled one (its speed would pass for a compiled run's)
    assert t.compile_watch.outcome["fell_back"] and t.compile_watch.outcome["graphs"] == 0
    assert "train.compile: compiling failed" in caplog.text and "this run is not a compiled one" in caplog.text
    # the GPU check's summary reads it from the run's own log (its config says compile: true)
    from dist_dejpeg.bench.gpu_summary import write_gpu_summary

    shutil.copyfile(tmp_path / "run" / "metrics.json", tmp_path / "metrics.json")  # (as the check's train step)
    summary = write_gpu_summary(tmp_path, card=None, date="d", commit="c", device="cpu", first_variant=None)
    assert summary["train_compiled"] is False and summary["gen_img_s"] is not None


def test_compile_mode_reaches_the_compiler_and_cuda_graphs_mark_each_step(tmp_path, shards, monkeypatch):
    """train.compile_mode is torch.compile's mode for every compiled model; with CUDA graphs (CUDA only) each
    training step and each validation forward starts a new replay (their outputs are not kept across one)."""
    modes = []

    def recording_backend(graph_module, example_inputs, mode=None):
        modes.append(mode)
        return graph_module.forward

    monkeypatch.setattr(compile_mod, "COMPILE_BACKEND", recording_backend)
    torch._dynamo.reset()  # frames compiled by earlier tests with other backends: their cache could answer
    layer = torch.nn.Linear(2, 2)
    compile_mod.compile_model(layer, "reduce-overhead")
    layer(torch.randn(1, 2))
    assert modes == ["reduce-overhead"]
    # the Trainer hands the config's mode to every model it compiles (run eagerly here: the marks are the point)
    compiled = []
    monkeypatch.setattr(build_mod, "compile_model", lambda model, mode="default": compiled.append(mode))
    marks = []
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: marks.append(1))
    cfg = tiny(tmp_path / "run", shards, "train.order=[gen]", "train.phases.gen.steps=2", "train.compile=true",
               "train.compile_mode=reduce-overhead", "train.val_every=100", "data.val_max_images=2",
               "data.val_qualities=[10,40]", "data.val_batch_size=4")
    t = Trainer(cfg)
    assert len(compiled) >= 2 and set(compiled) == {"reduce-overhead"}  # generator, critic, LPIPS
    assert not t.cudagraphs, "no CUDA graphs on a CPU"
    t.cudagraphs = True  # as on CUDA: the step marks
    t.fit()
    # 2 steps, the final validation (2 qualities x 1 batch: its metrics, consistent images and image grid from one
    # forward: train/final.py), the raw generator's (2)
    assert len(marks) == 2 + 2 + 2
    with pytest.raises(ConfigError, match="train.compile_mode"):
        tiny(tmp_path / "bad", shards, "train.compile_mode=fast")


def cuda_fast(tmp_path: Path, shards: Path, *overrides: str):
    """The tiny config on the GPU with the whole fast path on (bf16, channels_last, compile, fused AdamW,
    deferred host checks, nvJPEG degradation in the torch loader)."""
    return tiny(tmp_path / "run", shards, "train.cpu=false", "train.mixed_precision=bf16", "model.channels_last=true",
                "train.compile=true", "train.fused_adamw=true", "train.sync_every=3", "data.gpu_jpeg=true",
                "data.num_workers=1", *overrides)


@pytest.mark.gpu
def test_the_step_never_waits_for_the_gpu_on_cuda(tmp_path, shards):
    """Issue 24, no host syncs in the step: between due host checks the gen, critic and gan updates (bf16, fused
    AdamW, LPIPS, EMA, the chroma-weighted pixel loss, the blind-quality mask) make no call that waits for the GPU.
    CUDA's sync debug mode raises at any such call (an .item(), a blocking copy, a tensor made from Python numbers
    on the device), naming it; batches already on the GPU, so only the step is checked."""
    from dist_dejpeg.bench.train import Synthetic

    cfg = cuda_fast(tmp_path, shards, "train.compile=false", "train.sync_every=1000", "loss.chroma_weight=2",
                    "model.quality_conditioning=true", "model.quality_blind_prob=0.5")
    t = Trainer(cfg, train_loader=Synthetic(cfg, torch.device("cuda")), val_set={})
    batches = iter(t.loader)
    kinds = {p.kind: p for p in cfg.train.phases.values()}
    turns = [(kinds["gen"], "gen"), (kinds["critic"], "critic"), (kinds["gan"], "gen"), (kinds["gan"], "critic")]
    try:
        for phase, turn in turns:  # first calls: allocations, cuDNN's algorithm search, lazy initialisation
            t.train_step(phase, turn, batches)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        for phase, turn in turns * 2:
            t.train_step(phase, turn, batches)
    finally:
        torch.cuda.set_sync_debug_mode("default")
        t.close()
    assert all(torch.isfinite(v).all() for v in params(t.gen_raw).values() if v.is_floating_point())


@pytest.mark.gpu
def test_fast_path_trains_all_phases_on_cuda(tmp_path, shards):
    t = Trainer(cuda_fast(tmp_path, shards, "train.compile=false"))
    assert t.accelerator.device.type == "cuda" and t.fused and t.flags is not None
    before = params(t.gen_raw)
    streams, fit = [], t._fit
    t._fit = lambda: streams.append(torch.cuda.current_stream()) or fit()
    results = t.fit()
    assert streams[0] != torch.cuda.default_stream(), "train.cuda_stream: the run on a stream of its own"
    assert torch.cuda.current_stream() == torch.cuda.default_stream()
    after = params(t.gen_raw)
    assert changed(before, after), "the generator trained"
    assert all(torch.isfinite(v).all() for v in after.values() if v.is_floating_point())
    for q, groups in results.items():
        assert all(torch.isfinite(torch.tensor(v)) for v in groups["restored"].values()), q
    assert (tmp_path / "run" / "generator.safetensors").is_file()


@pytest.mark.gpu
def test_deferred_checks_skip_nonfinite_updates_on_cuda(tmp_path, shards):
    cfg = cuda_fast(tmp_path, shards, "train.order=[gen]", "train.phases.gen.steps=10", "train.sync_every=4",
                    "train.compile=false")
    from dist_dejpeg.data import build_train_loader

    t = Trainer(cfg, train_loader=NaNAfter(build_train_loader(cfg, 0, 1, torch.device("cuda")), good=1))
    with pytest.raises(TrainingStopped, match=r"1 non-finite loss\(es\) between global steps 1 and 4"):
        t.fit()
    assert ckpt.latest_checkpoint(tmp_path / "run").name == f"step-{4:08d}"
    assert all(torch.isfinite(v).all() for v in params(t.gen_raw).values() if v.is_floating_point())


# the two compiled GPU tests come after the others: if the GPU check's pytest step runs out of time while they
# compile (cold, over a minute each), every other GPU test has run
@pytest.mark.gpu
@pytest.mark.timeout(300)  # compiling generator and LPIPS took over 75 s on an H100 machine
def test_compiled_generator_trains_on_cuda(tmp_path, shards):
    """torch.compile of generator and LPIPS in a gen phase (the all-phases test runs eagerly: compiling every
    mode of both models took over 100 s on an H200 machine's 16 cores)."""
    t = Trainer(cuda_fast(tmp_path, shards, "train.order=[gen]", "train.phases.gen.steps=3"))
    before = params(t.gen_raw)
    t.fit()
    after = params(t.gen_raw)
    assert changed(before, after)
    assert all(torch.isfinite(v).all() for v in after.values() if v.is_floating_point())


@pytest.mark.gpu
@pytest.mark.timeout(300)  # compiling (as the test above), and again for CUDA graphs' eval-mode validation
def test_cuda_graphs_train_and_validate_on_cuda(tmp_path, shards):
    """train.compile_mode=reduce-overhead: the gen phase trains and validates with CUDA graphs (the outputs of
    one replay are not read after the next)."""
    t = Trainer(cuda_fast(tmp_path, shards, "train.order=[gen]", "train.phases.gen.steps=4",
                          "train.compile_mode=reduce-overhead"))
    assert t.cudagraphs
    before = params(t.gen_raw)
    results = t.fit()
    after = params(t.gen_raw)
    assert changed(before, after)
    assert all(torch.isfinite(v).all() for v in after.values() if v.is_floating_point())
    for q, groups in results.items():
        assert all(torch.isfinite(torch.tensor(v)) for v in groups["restored"].values()), q


def test_checkpoint_saves_channels_last_tensors(tmp_path):
    """channels_last weights are strided: the best generator and the per-rank buffers are packed before
    safetensors sees them (an H100 run of configs/div2k.yaml failed here at its first gan checkpoint)."""
    from accelerate import Accelerator
    from safetensors.torch import load_file

    weight = torch.rand(4, 3, 3, 3).to(memory_format=torch.channels_last)
    assert not weight.is_contiguous()
    path = ckpt.save_checkpoint(Accelerator(cpu=True), tmp_path, 5, {"global_step": 5}, {}, "x: 1\n", keep_last=2,
                                buffers={"bn.running_mean": weight}, main_tensors={"best_generator.safetensors": {"w": weight}})
    assert torch.equal(load_file(str(path / "best_generator.safetensors"))["w"], weight)
    assert torch.equal(load_file(str(path / "buffers_0.safetensors"))["bn.running_mean"], weight)


def test_a_wrong_data_root_is_said_before_models_load_or_the_run_folder_is_made(tmp_path, shards, monkeypatch):
    """With data.root wrong, the run stopped only after building the models (for the div2k recipe: after ~45 s of
    retrying ImageNet's download offline) and left an empty run folder."""
    def never(*args, **kwargs):
        raise AssertionError("the models were built before the data was found")

    monkeypatch.setattr(trainer_mod, "build_parts", never)
    for glob_key in ("data.root", "data.val_glob"):
        value = tmp_path / "none" if glob_key == "data.root" else "nothing-*.tar"
        with pytest.raises(FileNotFoundError, match="no shards match"):
            Trainer(tiny(tmp_path / "run", shards, f"{glob_key}={value}"))
        assert not (tmp_path / "run").exists()
    # a folder of photos given as data.root: said, with how to prepare them
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "a.png").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=r"no shards match .*; .*photos holds photos \(a.png\), not shards: "
                                                r"prepare them first, `dist-dejpeg prepare folder"):
        Trainer(tiny(tmp_path / "run", shards, f"data.root={tmp_path / 'photos'}"))
    assert not (tmp_path / "run").exists()


def test_validation_tiles_smaller_than_the_val_crop_are_an_error_at_the_start(tmp_path, shards):
    """All 64 px val tiles skipped as smaller than a 128 px val_crop: the run trained to the end and 'succeeded' with
    NaN metrics and a generator file whose gains the guard could not use."""
    with pytest.raises(ConfigError, match=r"data.val_crop': 128 px, but the tiles .* are 64 px .*no validation tile"):
        Trainer(tiny(tmp_path / "run", shards, "data.val_crop=128"))  # (prepare's manifest.json says it first)
    with pytest.raises(ConfigError, match=r"no validation tile .*too_small \d+.*data.val_crop=128 must not exceed"):
        Trainer(tiny(tmp_path / "run2", shards, "data.val_crop=128", "data.val_glob=val-*0.tar"))  # (no manifest's)


def test_what_prepares_manifest_says_is_checked_before_training(tmp_path, shards, monkeypatch):
    """Tiles smaller than the crop, or fewer training tiles than loader slots: said at the start from prepare's
    manifest.json (the loader's error came from inside a worker, after the models were built)."""
    def never(*args, **kwargs):
        raise AssertionError("the models were built before the data was checked")

    monkeypatch.setattr(trainer_mod, "build_parts", never)
    with pytest.raises(ConfigError, match=r"'data.crop': 128 px, but the tiles in .* are 64 px"):
        Trainer(tiny(tmp_path / "a", shards, "data.crop=128"))
    manifest = json.loads((shards / "manifest.json").read_text())
    count = manifest["splits"]["train"]["samples"]
    few = tmp_path / "few"
    few.mkdir()
    for shard in shards.glob("*.tar"):
        (few / shard.name).symlink_to(shard)
    manifest["splits"]["train"]["samples"] = 3  # as if prepare had cut 3 training tiles
    (few / "manifest.json").write_text(json.dumps(manifest))
    assert count > 3
    with pytest.raises(ConfigError, match=r"holds 3 training tile\(s\), fewer than the 4 loader slots"):
        Trainer(tiny(tmp_path / "b", shards, f"data.root={few}", "data.num_workers=4"))


def test_a_critic_phase_does_not_validate_the_generator_it_leaves_unchanged(tmp_path, shards):
    t = Trainer(tiny(tmp_path / "run", shards, "train.order=[gen,critic]", "train.phases.critic.steps=3",
                     "train.val_every=1"))
    t.fit()
    assert [(name, step) for name, step, _ in t.state.history] == [("gen", 1), ("gen", 2)]


def test_a_crash_leaves_its_reason_for_status(tmp_path, shards, monkeypatch):
    from dist_dejpeg.run.status import run_status

    def broken(self, phase, turn, batches):
        raise ZeroDivisionError("division by zero")

    monkeypatch.setattr(Trainer, "train_step", broken)
    with pytest.raises(ZeroDivisionError):
        train(tiny(tmp_path / "run", shards))
    progress = json.loads((tmp_path / "run" / "progress.json").read_text())
    assert (progress["status"], progress["reason"]) == ("crashed", "ZeroDivisionError: division by zero")
    status = run_status(tmp_path / "run")
    assert status["state"] == "crashed or killed" and "ZeroDivisionError: division by zero" in status["why"], status


def test_an_encoder_the_u_net_cannot_use_is_a_config_error_naming_the_key(tmp_path, shards):
    """The CLI prints a ConfigError as one line (exit 2); a ViT's fixed input size was timm's AssertionError with a
    traceback at the first step."""
    with pytest.raises(ConfigError, match=r"config key 'model.encoder': 'vit_tiny_patch16_224' cannot encode"):
        train(tiny(tmp_path / "run", shards, "model.encoder=vit_tiny_patch16_224"))


def _count_crops(module) -> list:
    """A forward hook on ``module`` counting the crops it restores: [crops so far]."""
    seen = [0]
    module.register_forward_hook(lambda m, args, out: seen.__setitem__(0, seen[0] + args[0].shape[0]))
    return seen


def test_the_final_validation_restores_each_crop_once(tmp_path, shards):
    """The final validation ran the EMA's generator over the validation crops twice (the metrics, then the gains
    made consistent with the JPEG files) and a third time over the image grid's crops; one forward now serves
    all three, and what it writes is the same: metrics.json, the generator file's guard gains, the grid."""
    cfg = tiny(tmp_path / "run", shards, "train.order=[gen]", "data.val_max_images=2", "data.val_qualities=[10,40]",
               "data.val_batch_size=3")
    t, images = Trainer(cfg), []
    t.monitor.image = lambda tag, grid, step: images.append((tag, step, tuple(grid.shape)))
    seen = _count_crops(t.ema.model(t.gen_raw))
    results = final_mod.finish_run(t)  # (the end of a run, here of one that trained no step)
    t.lock.release()
    crops = sum(jpeg.shape[0] for jpeg, _ in t.val_set.values())
    assert crops == 4 and seen == [crops], seen  # (was 2 x 4 + 2: the metrics', the conformed gains', the grid's)
    assert images == [("val/jpeg_restored_clean_final", 0, (3, 70, 104))], images  # 2 rows: JPEG | restored | clean
    meta = read_metadata(tmp_path / "run" / "generator.safetensors")
    assert set(json.loads(meta["val_psnr_gain_conformed"])) == {"10", "40"}
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["q10"] == results["q10"]


def test_a_run_that_ends_on_an_interrupt_closes_its_log_and_trackers_and_says_so(tmp_path, shards, monkeypatch):
    """A notebook's later runs wrote into this run's train.log (a resume: each line twice) and its TensorBoard writer
    thread lived on: fit closed them only on success. progress.json stayed "running" after a second Ctrl-C."""
    import logging
    import threading

    from dist_dejpeg.train.run_log import RunLog

    calls, real = [], Trainer.train_step

    def interrupted(self, phase, turn, batches):
        calls.append(turn)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(self, phase, turn, batches)

    def writer_threads():
        return [t for t in threading.enumerate() if type(t).__name__ == "_AsyncWriterThread" and t.is_alive()]

    monkeypatch.setattr(Trainer, "train_step", interrupted)
    hook, before = threading.excepthook, set(writer_threads())  # (an earlier test's may end meanwhile)
    with pytest.raises(KeyboardInterrupt):
        train(tiny(tmp_path / "run", shards, "train.log_with=[tensorboard]"))
    assert not [h for h in logging.getLogger().handlers  # (a test's Trainer that only steps may keep its own)
                if isinstance(h, RunLog) and Path(h.baseFilename).parent == tmp_path / "run"]
    assert threading.excepthook is hook and not set(writer_threads()) - before
    progress = json.loads((tmp_path / "run" / "progress.json").read_text())
    assert progress["status"] == "crashed" and progress["reason"].startswith("KeyboardInterrupt"), progress


def test_a_second_accelerator_in_one_process_may_have_another_precision(tmp_path, shards):
    """A notebook's second run with another train.mixed_precision failed with Accelerate's "AcceleratorState has
    already been initialized and cannot be changed, restart your runtime"."""
    acc, _ = build_mod.build_accelerator(tiny(tmp_path / "a", shards))
    assert acc.mixed_precision == "no"
    acc, _ = build_mod.build_accelerator(tiny(tmp_path / "b", shards, "train.mixed_precision=bf16"))
    assert acc.mixed_precision == "bf16"


@pytest.mark.parametrize("processes", [2, 1])
def test_train_from_python_says_it_does_not_start_train_processes(tmp_path, shards, monkeypatch, caplog, processes):
    """configs/debug.yaml's train.processes=2 from a notebook trained one process without a word (half the global
    batch; the command line then refused to continue the run): only the CLI starts the ranks."""
    for name in ("WORLD_SIZE", "LOCAL_RANK", "ACCELERATE_MIXED_PRECISION"):
        monkeypatch.delenv(name, raising=False)

    def stop_here(*args, **kwargs):
        raise RuntimeError("stop here")

    monkeypatch.setattr(trainer_mod, "Trainer", stop_here)
    with caplog.at_level("WARNING", "dist_dejpeg"), pytest.raises(RuntimeError, match="stop here"):
        train(tiny(tmp_path / "run", shards, f"train.processes={processes}"))
    said = "train.processes=2 is not started by train() called from Python" in caplog.text
    assert said == (processes == 2) and ("`dist-dejpeg train` (or accelerate launch) starts 2" in caplog.text) == said


def test_a_start_from_python_that_fails_leaves_no_run_folder_and_no_held_lock(tmp_path, shards):
    """Only the CLI removed the run folder a failed start made (holding only its lock); and a half-built Trainer
    that the traceback keeps (a notebook's last error) held the lock of a folder that was there: a corrected run
    in the same process was refused as busy."""
    from dist_dejpeg.run.lock import RunLock

    with pytest.raises(ConfigError, match="model.encoder"):
        train(tiny(tmp_path / "new" / "run", shards, "model.encoder=nosuchnet"))
    assert not (tmp_path / "new").exists()
    (tmp_path / "old").mkdir()
    with pytest.raises(ConfigError, match="model.encoder") as kept:  # (its traceback kept, as a notebook does)
        train(tiny(tmp_path / "old", shards, "model.encoder=nosuchnet"))
    lock = RunLock(tmp_path / "old")
    lock.acquire()  # not busy
    lock.release()
    assert kept.value is not None
