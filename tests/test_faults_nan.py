"""Fault 1 of the fault matrix: nothing non-finite is saved or restored. An `inf` pixel in one batch leaves no
running statistic or weight changed (immediate and deferred checks, grad_accum > 1, the critic step), the stop
saves the last good state and a resume from it finishes finite; a diverging run stops with every file it
wrote finite; a generator file is never written with a NaN; restore passes through where the model's
validated gain is NaN or its output is not finite."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate.state import AcceleratorState, GradientState
from safetensors.torch import load_file
from torch import nn

from dist_dejpeg.config import ModelConfig
from dist_dejpeg.data import build_train_loader
from dist_dejpeg.models.generator_file import NonFiniteWeights, load_generator, save_generator
from dist_dejpeg.models.unet import build_generator
from dist_dejpeg.restore.restorer import Restorer
from dist_dejpeg.train import build as build_mod
from dist_dejpeg.train import checkpoint as ckpt
from dist_dejpeg.train.faults import NonFiniteState, save_last_good
from dist_dejpeg.train.steps import NonFiniteLoss, critic_step, generator_step
from dist_dejpeg.train.trainer import Trainer, TrainingStopped, train

from test_trainer import fresh_accelerator_state, shards, tiny  # noqa: F401 - fixtures (autouse state reset)

TINY = dict(encoder="mobilenetv3_small_050", pretrained=False, decoder_width=16)




class InfAt:
    """A loader that yields its batches with one `inf` pixel in batch number ``index`` (counted from 0)."""

    def __init__(self, inner, index: int, key: str = "jpeg"):
        self.inner, self.index, self.key = inner, index, key

    def __iter__(self):
        for i, batch in enumerate(self.inner):
            if i == self.index:
                image = batch[self.key].clone()
                image[0, 0, 0, 0] = float("inf")
                batch = dict(batch, **{self.key: image})
            yield batch

    def state_dict(self):
        return self.inner.state_dict()


def _tensors(value, name: str):
    if isinstance(value, torch.Tensor):
        yield name, value
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from _tensors(v, f"{name}.{k}")
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            yield from _tensors(v, f"{name}.{i}")


def nonfinite_files(run_dir: Path) -> tuple[list[str], int]:
    """Every non-finite floating tensor in every safetensors / torch file under ``run_dir`` (checkpoint folders
    and the generator file), and how many files were read."""
    bad, files = [], 0
    for path in sorted(run_dir.rglob("*")):
        if path.suffix == ".safetensors":
            items = load_file(str(path)).items()
        elif path.suffix in (".bin", ".pt"):
            items = _tensors(torch.load(path, map_location="cpu", weights_only=True), "")
        else:
            continue
        files += 1
        bad += [f"{path.relative_to(run_dir)}:{k}" for k, v in items
                if v.is_floating_point() and not torch.isfinite(v).all()]
    return bad, files


def state(module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def changed(before: dict, after: dict) -> set[str]:
    return {k for k in before if not torch.equal(before[k], after[k])}


def spy_steps(t: Trainer) -> list[tuple[dict, dict]]:
    """(generator state before, after) for each train_step the trainer makes."""
    seen, real = [], t.train_step

    def spy(phase, turn, batches):
        before = state(t.gen_raw)
        try:
            return real(phase, turn, batches)
        finally:
            seen.append((before, state(t.gen_raw)))

    t.train_step = spy
    return seen


def test_inf_batch_stops_with_the_last_good_state_and_resume_finishes_finite(tmp_path, shards):  # noqa: F811
    over = ("train.order=[gen]", "train.phases.gen.steps=3")
    cfg = tiny(tmp_path / "run", shards, *over)
    t = Trainer(cfg, train_loader=InfAt(build_train_loader(cfg, 0, 1, torch.device("cpu")), index=2))
    seen = spy_steps(t)
    with pytest.raises(TrainingStopped, match=r"batch's jpeg.*at step 2 .*the state before that step is saved"):
        t.fit()
    assert len(seen) == 3
    assert not changed(*seen[2]), "the inf step changed the generator (running statistics or weights)"
    assert any("running_mean" in k for k in changed(*seen[1])), "a good step updates the running statistics"
    bad, files = nonfinite_files(tmp_path / "run")
    assert files >= 2 and not bad, bad[:5]
    latest = ckpt.latest_checkpoint(tmp_path / "run")
    assert latest.name == f"step-{2:08d}"
    saved = load_file(str(latest / "model.safetensors"))
    buffers = load_file(str(latest / "buffers_0.safetensors"))
    last_good = seen[1][1]  # the generator after step 2, the last good one
    assert not changed({k: saved[k] for k in last_good}, last_good)
    persistent = {k: last_good[k] for k, _ in t.gen_raw.named_buffers() if k in last_good}
    assert persistent and not changed({k: buffers[f"generator.{k}"] for k in persistent}, persistent)

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    results = train(tiny(tmp_path / "run", shards, *over), resume=str(latest))
    assert all(np.isfinite(v) for r in results.values() for group in r.values() for v in group.values())
    bad, _ = nonfinite_files(tmp_path / "run")
    assert not bad and (tmp_path / "run" / "generator.safetensors").is_file(), bad[:5]


def test_the_stop_is_said_once_on_the_console_and_kept_in_train_log(tmp_path, shards, caplog):  # noqa: F811
    """The trainer logged "training stopped: ..." and the command printed it: twice in a terminal. The message is
    the exception's (the command prints it, once per node); train.log keeps it as an ERROR line."""
    cfg = tiny(tmp_path / "run", shards, "train.order=[gen]", "train.phases.gen.steps=2")
    t = Trainer(cfg, train_loader=InfAt(build_train_loader(cfg, 0, 1, torch.device("cpu")), index=1))
    caplog.set_level(logging.INFO)
    with pytest.raises(TrainingStopped, match="^training stopped: ") as stopped:
        t.fit()
    assert not [r.getMessage() for r in caplog.records if "training stopped" in r.getMessage()]
    log_lines = [line for line in (tmp_path / "run" / "train.log").read_text().splitlines() if "stopped" in line]
    assert len(log_lines) == 1 and log_lines[0].endswith(f" ERROR dist_dejpeg: {stopped.value}"), log_lines


def test_deferred_inf_skips_the_whole_accumulated_update(tmp_path, shards, monkeypatch):  # noqa: F811
    """The CUDA fast path on the CPU, two micro-steps per update, the inf in the second micro-batch of update
    2: the update is skipped as a whole (its first micro-step's running statistics put back too), on the
    device, and the run stops at the host check with the state after the good updates that followed."""
    monkeypatch.setattr(build_mod, "DEFERRED_CHECK_DEVICES", ("cuda", "cpu"))
    cfg = tiny(tmp_path / "run", shards, "train.order=[gen]", "train.phases.gen.steps=3", "train.sync_every=4",
               "train.grad_accum=2", "train.log_every=100")
    t = Trainer(cfg, train_loader=InfAt(build_train_loader(cfg, 0, 1, torch.device("cpu")), index=3))
    assert t.flags is not None
    seen = spy_steps(t)
    with pytest.raises(TrainingStopped, match=r"1 non-finite loss\(es\) between global steps 1 and 3"):
        t.fit()
    assert len(seen) == 3
    assert not changed(*seen[1]), "the update with the inf micro-batch changed the generator"
    for good in (seen[0], seen[2]):
        diff = changed(*good)
        assert any("running_var" in k for k in diff) and any("weight" in k for k in diff)
    bad, files = nonfinite_files(tmp_path / "run")
    assert files >= 2 and not bad, bad[:5]


def test_inf_in_the_critic_step_or_through_the_critic_changes_neither_model(tmp_path, shards):  # noqa: F811
    t = Trainer(tiny(tmp_path / "run", shards, "train.grad_accum=2"))
    t.generator.train()
    t.critic.train()  # as in the gan phase: the other model's forward runs in train mode too
    good = iter(t.loader)
    g0, c0 = state(t.gen_raw), state(t.critic_raw)
    critic_step(t.accelerator, t.critic, t.c_opt, good, generator_raw=t.gen_raw, grad_accum=2)
    g1, c1 = state(t.gen_raw), state(t.critic_raw)
    assert any("running_mean" in k for k in changed(g0, g1)), "the generator's statistics move in a critic step"
    assert any(k.endswith("_u") for k in changed(c0, c1)), "spectral norm's power iteration moves"

    inf = iter(InfAt(t.loader, index=1, key="clean"))
    with pytest.raises(NonFiniteLoss, match="batch's clean"):
        critic_step(t.accelerator, t.critic, t.c_opt, inf, generator_raw=t.gen_raw, grad_accum=2)
    with pytest.raises(NonFiniteLoss, match="batch's jpeg"):
        generator_step(t.accelerator, t.generator, t.g_opt, iter(InfAt(t.loader, index=0)), grad_accum=2,
                       w_pixel=1.0, w_lpips=0.0, w_adv=1.0, critic_raw=t.critic_raw)
    assert not changed(g1, state(t.gen_raw)) and not changed(c1, state(t.critic_raw))


def test_diverging_run_stops_with_every_file_finite(tmp_path, shards):  # noqa: F811
    """Weights multiplied by 1e30 after each update: the next forward overflows, the run stops, and every
    checkpoint (the periodic ones and the stop's) holds finite tensors only."""
    cfg = tiny(tmp_path / "run", shards, "train.order=[gen]", "train.phases.gen.steps=6", "train.ckpt_every=1",
               "train.keep_last=10")
    t = Trainer(cfg)
    real = t.g_opt.step

    def diverging_step(*args, **kwargs):
        out = real(*args, **kwargs)
        with torch.no_grad():
            for p in t.gen_raw.parameters():
                p.mul_(1e30)
        return out

    t.g_opt.step = diverging_step
    with pytest.raises(TrainingStopped, match="non-finite gen loss"):
        t.fit()
    bad, files = nonfinite_files(tmp_path / "run")
    assert files >= 2 and not bad, bad[:5]
    assert not (tmp_path / "run" / "generator.safetensors").exists()

    # weights that an update made infinite (the forward has not failed yet): that state is never saved
    with torch.no_grad():
        next(t.gen_raw.parameters()).mul_(float("inf"))
    with pytest.raises(NonFiniteState, match=r"not finite \(1 non-finite tensor"):
        t.save()
    message = save_last_good(t.save, NonFiniteLoss("gen", {"total": torch.tensor(float("nan"))}), t.run_dir)
    assert message.startswith("nothing is saved") and ckpt.latest_checkpoint(t.run_dir).name in message
    assert not nonfinite_files(tmp_path / "run")[0]
    # the checkpoint's other generators (a resume continues from them) were written unchecked: the gan phase's
    # last step's (kept beside the best it puts back) and the EMA's
    with torch.no_grad():
        next(t.gen_raw.parameters()).zero_()  # the models finite again
    t.last_generator = {k: v.clone() for k, v in t.gen_raw.state_dict().items()}
    next(iter(t.last_generator.values())).fill_(float("nan"))
    with pytest.raises(NonFiniteState, match=r"last_generator\.safetensors\."):
        t.save()
    t.last_generator = None
    if t.ema.ema is not None:
        with torch.no_grad():
            next(t.ema.ema.module.parameters()).fill_(float("inf"))
        with pytest.raises(NonFiniteState, match=r"ema_generator\.safetensors\."):
            t.save()
    assert not nonfinite_files(tmp_path / "run")[0]


def test_save_generator_refuses_nonfinite_tensors(tmp_path):
    generator = build_generator(ModelConfig(**TINY))
    with torch.no_grad():
        generator.head.weight[0, 0, 0, 0] = float("nan")
    path = tmp_path / "generator.safetensors"
    with pytest.raises(NonFiniteWeights, match=r"head\.weight"):
        save_generator(generator, ModelConfig(**TINY), path)
    assert list(tmp_path.iterdir()) == []


class Broken(nn.Module):
    def forward(self, x):
        return x * float("nan")


def test_restore_passes_through_on_a_nan_gain_or_a_nonfinite_output(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 256, (64, 48, 3), dtype=np.uint8)
    path = tmp_path / "generator.safetensors"
    save_generator(build_generator(ModelConfig(**TINY)), ModelConfig(**TINY), path,
                   extra={"val_psnr_gain": json.dumps({10: float("nan"), 40: 0.5})})
    restorer = Restorer(path, device="cpu", tile=0)
    assert np.array_equal(restorer.restore(rgb, quality=10), rgb)
    assert restorer.last_decision.passthrough and "NaN" in restorer.last_decision.reason
    assert not restorer.decide(40).passthrough

    broken = Restorer(Broken(), device="cpu", tile=0)
    out = broken.restore(rgb, quality=10)
    assert np.array_equal(out, rgb)
    assert broken.last_decision.passthrough and "non-finite" in broken.last_decision.reason
    x = torch.rand(2, 3, 32, 32)
    assert torch.equal(broken.restore_tensor(x, quality=10), x)
    assert load_generator(path) is not None
