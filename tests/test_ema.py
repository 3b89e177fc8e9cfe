"""The EMA of the generator's weights (train/ema.py): the warm-up formula by hand on a small module, parameters
averaged and buffers copied, skipped steps ignored; in the checkpoint (and its manifest) and resumed; what
validation, the image grid and the generator file use; train.ema_decay=0; a checkpoint from before the EMA.
(Bit-identical resume with the EMA on: test_trainer.py and test_preemption.py compare its file too.)"""

from __future__ import annotations

import json
import logging
import shutil

import pytest
import torch
from accelerate.state import AcceleratorState, GradientState
from safetensors.torch import load_file
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

from dist_dejpeg.models.generator_file import load_model
from dist_dejpeg.run.layout import EMA_GENERATOR, MANIFEST
from dist_dejpeg.run.manifest import write_manifest
from dist_dejpeg.train import checkpoint as ckpt
from dist_dejpeg.train import trainer as trainer_mod
from dist_dejpeg.train import final as final_mod
from dist_dejpeg.train.ema import UPDATES, GeneratorEma, warmup_decay
from dist_dejpeg.train.phases import gan_turn
from dist_dejpeg.train.trainer import Trainer

from test_trainer import fresh_accelerator_state, shards, tiny  # noqa: F401 (fixtures)


def small() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(spectral_norm(nn.Linear(3, 2)), nn.BatchNorm1d(2))


def set_params(module: nn.Module, value: float) -> None:
    with torch.no_grad():
        for p in module.parameters():
            p.fill_(value)


def test_warmup_decay_by_hand():
    assert warmup_decay(0.999, 0) == pytest.approx(0.1)  # (1 + 0) / (10 + 0)
    assert warmup_decay(0.999, 1) == pytest.approx(2 / 11)
    assert warmup_decay(0.999, 890) == pytest.approx(0.99)
    assert warmup_decay(0.999, 10**6) == 0.999
    assert warmup_decay(0.999, 0, warmup=False) == 0.999


def test_the_ema_averages_parameters_with_the_warmup_and_copies_buffers():
    live = small()
    set_params(live, 1.0)
    ema = GeneratorEma(live, 0.999)
    set_params(live, 2.0)
    live.train()(torch.rand(4, 3))  # a forward: new power-iteration vectors and running statistics
    ema.update(live)  # t=0: decay 0.1 -> 0.1 * 1 + 0.9 * 2
    params = dict(ema.ema.module.named_parameters())
    assert set(params) == {"0.bias", "0.parametrizations.weight.original", "1.weight", "1.bias"}
    for p in params.values():
        assert torch.allclose(p, torch.full_like(p, 0.1 * 1 + 0.9 * 2))
    set_params(live, 5.0)
    ema.update(live)  # t=1: decay 2/11
    for p in ema.ema.module.parameters():
        assert torch.allclose(p, torch.full_like(p, 2 / 11 * 1.9 + 9 / 11 * 5.0))
    assert ema.updates == 2 and ema.state_dict()[UPDATES].item() == 2
    # buffers: copied, never averaged (u and v stay unit vectors); copied again when the EMA is used
    live(torch.rand(4, 3))
    used = ema.model(live)
    for (name, mine), (_, theirs) in zip(used.named_buffers(), live.named_buffers()):
        assert torch.equal(mine, theirs), name
    assert torch.linalg.vector_norm(dict(used.named_buffers())["0.parametrizations.weight.0._u"]) == pytest.approx(1)
    assert not any(p.requires_grad for p in used.parameters())


class Skipping:
    """An optimizer that says whether its step was skipped, as Accelerate's (host) or the deferred checks' (device)."""

    def __init__(self, host: bool = False, found_inf: torch.Tensor | None = None):
        self.step_was_skipped = host
        if found_inf is not None:
            self.found_inf = found_inf


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


@pytest.mark.parametrize("device", DEVICES)
def test_a_skipped_step_leaves_the_ema_alone(device):
    live = small().to(device)
    ema = GeneratorEma(live, 0.9, warmup=False)
    before = {k: v.clone() for k, v in ema.ema.module.named_parameters()}
    set_params(live, 3.0)
    ema.update(live, Skipping(host=True))
    ema.update(live, Skipping(found_inf=torch.tensor(1.0, device=device)))  # the device flag: no host read
    after = dict(ema.ema.module.named_parameters())
    assert all(torch.equal(before[k], after[k]) for k in before)
    ema.update(live, Skipping(found_inf=torch.tensor(0.0, device=device)))  # applied: 0.9 * old + 0.1 * 3
    for k, p in ema.ema.module.named_parameters():
        assert torch.allclose(p, 0.9 * before[k] + 0.1 * 3.0)


def test_an_fp16_step_the_grad_scaler_skipped_leaves_the_ema_alone_with_a_fused_adamw():
    """fp16 on CUDA: the fused AdamW takes GradScaler's skip flag into its kernel, so its step is always called
    and Accelerate's step_was_skipped stays False; the EMA averaged towards the unchanged weights at every
    overflow. The scale the update backed off says it (a device flag): emulated with the CPU's GradScaler."""
    import contextlib
    from types import SimpleNamespace

    from accelerate import Accelerator

    from dist_dejpeg.train.steps import _update

    acc = Accelerator(cpu=True)
    acc.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)  # (Accelerate gives the CPU no fp16 scaler)
    live = nn.Linear(3, 2)
    model, opt = acc.prepare(live, torch.optim.AdamW(live.parameters(), lr=0.1, fused=True))
    ema = GeneratorEma(live, 0.5, warmup=False)
    batches = iter([{"x": torch.randn(4, 3)}] * 4)

    def step(overflow: bool) -> SimpleNamespace:
        hook = live.weight.register_hook(lambda g: g * float("inf")) if overflow else None
        before = live.weight.detach().clone(), ema.ema.module.weight.clone()
        _update(acc, model, opt, batches, 1, lambda b: {"l": model(b["x"]).square().mean()}, {"l": 1.0}, "gen",
                1.0, autocast=contextlib.nullcontext)
        ema.update(live, opt)
        if hook is not None:
            hook.remove()
        return SimpleNamespace(moved=not torch.equal(before[0], live.weight),
                               averaged=not torch.equal(before[1], ema.ema.module.weight))

    taken = step(False)  # (the EMA now lags the live weights: averaging towards them would move it)
    assert taken.moved and taken.averaged and acc.scaler.get_scale() == 2.0**10
    overflow = step(True)
    assert opt.step_was_skipped is False  # Accelerate cannot tell: the fused step ran (as a no-op)
    assert not overflow.moved and acc.scaler.get_scale() == 2.0**9
    assert not overflow.averaged


def test_the_update_reads_nothing_back_and_copies_no_buffer():
    """Issue 24, no host syncs in the step: with the deferred checks' device flag as the skip signal, the EMA update
    makes no host read (no .item(), which on a GPU waits for it) and no per-buffer copy; a few multi-tensor ops."""
    from torch.profiler import profile

    live = small()
    ema = GeneratorEma(live, 0.9, warmup=False)
    flag = Skipping(found_inf=torch.tensor(0.0))
    ema.update(live, flag)  # first call outside the profile
    with profile() as prof:
        ema.update(live, flag)
        ema.update(live)  # a float weight: one foreach lerp
    names = [e.name for e in prof.events()]
    assert not {"aten::item", "aten::_local_scalar_dense"} & set(names), sorted(set(names))
    assert {"aten::_foreach_mul_", "aten::_foreach_lerp_"} <= set(names), sorted(set(names))
    before = {k: v.clone() for k, v in ema.ema.module.named_buffers()}
    live.train()(torch.rand(4, 3))  # new power-iteration vectors and running statistics in the live generator
    ema.update(live, flag)
    assert all(torch.equal(v, before[k]) for k, v in ema.ema.module.named_buffers())  # not copied at each step
    used = ema.model(live)  # but whenever the EMA is used
    assert all(torch.equal(mine, theirs) for mine, theirs in zip(used.buffers(), live.buffers()))


def test_ema_decay_zero_is_the_raw_generator():
    live = small()
    ema = GeneratorEma(live, 0.0)
    assert not ema.enabled and ema.model(live) is live and ema.files() == {}
    set_params(live, 2.0)
    ema.update(live)
    assert set(ema.snapshot(live)) == set(live.state_dict())


OVER = ("train.order=[gen]", "train.phases.gen.steps=4", "train.ckpt_every=2", "train.keep_last=5",
        "train.phases.gen.lr=1e-2")


@pytest.fixture(scope="module")
def ema_run(shards, tmp_path_factory):
    """One tiny gen-only run with the EMA on (the default), every validation's module recorded."""
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    seen, real = [], trainer_mod.validate  # (the final raw validation is final.py's)

    def recording(accelerator, generator, *args, **kwargs):
        seen.append(generator)
        return real(accelerator, generator, *args, **kwargs)

    trainer_mod.validate = final_mod.validate = recording
    try:
        run = tmp_path_factory.mktemp("ema") / "run"
        t = Trainer(tiny(run, shards, *OVER))
        t.fit()
    finally:
        trainer_mod.validate = final_mod.validate = real
    return run, t, seen


def test_the_ema_is_validated_exported_and_checkpointed(ema_run):
    run, t, seen = ema_run
    ema_module = t.ema.model(t.gen_raw)
    assert seen == [ema_module, t.gen_raw]  # the final validation (the EMA), then the raw generator once
    exported = load_file(str(run / "generator.safetensors"))
    own = ema_module.state_dict()
    assert exported.keys() == own.keys() and all(torch.equal(exported[k], own[k].cpu()) for k in own)
    raw = t.gen_raw.state_dict()
    assert any(not torch.equal(exported[k], raw[k]) for k in raw), "the file holds the raw weights"
    meta = json.loads((run / "metrics.json").read_text())["meta"]["ema"]
    assert meta["decay"] == 0.999 and meta["updates"] == 4 and set(meta["raw"]) == {"q10", "q20", "q40"}
    # each checkpoint holds the EMA, listed in its manifest; the newest one holds what the run ended with
    for folder in ckpt.list_checkpoints(run):
        assert EMA_GENERATOR in json.loads((folder / MANIFEST).read_text())["files"]
    saved = load_file(str(ckpt.latest_checkpoint(run) / EMA_GENERATOR))
    assert saved.pop(UPDATES).item() == 4
    assert all(torch.equal(v, dict(t.ema.ema.module.named_parameters())[k]) for k, v in saved.items())
    # restore / evaluate / export from a checkpoint folder load the EMA's parameters too
    generator, info = load_model(ckpt.latest_checkpoint(run))
    assert info["weights"] == "ema"
    assert all(torch.equal(v, generator.state_dict()[k]) for k, v in saved.items())


def test_resume_restores_the_ema(ema_run, shards, tmp_path):
    run, _, _ = ema_run
    mid = ckpt.checkpoint_dir(run) / f"step-{2:08d}"
    t = Trainer(tiny(tmp_path / "again", shards, *OVER))
    t.resume(mid)
    saved = load_file(str(mid / EMA_GENERATOR))
    assert t.ema.updates == saved.pop(UPDATES).item() == 2
    assert all(torch.equal(v, dict(t.ema.ema.module.named_parameters())[k]) for k, v in saved.items())
    t.close()


def test_a_checkpoint_from_before_the_ema_resumes_with_the_ema_from_the_generator(ema_run, shards, tmp_path, caplog):
    run, _, _ = ema_run
    old = tmp_path / "old" / "checkpoints" / f"step-{2:08d}"
    shutil.copytree(ckpt.checkpoint_dir(run) / f"step-{2:08d}", old)
    (old / EMA_GENERATOR).unlink()
    write_manifest(old)  # as an older version wrote it: no EMA file, none listed
    t = Trainer(tiny(tmp_path / "old", shards, *OVER))
    with caplog.at_level(logging.INFO, logger="dist_dejpeg"):
        t.resume(old)
    assert "written before the EMA existed" in caplog.text
    raw = dict(t.gen_raw.named_parameters())
    assert all(torch.equal(p, raw[k]) for k, p in t.ema.ema.module.named_parameters())
    t.close()


def test_ema_decay_zero_trains_and_exports_the_raw_generator(shards, tmp_path):
    run = tmp_path / "run"
    t = Trainer(tiny(run, shards, *OVER, "train.ema_decay=0", "train.phases.gen.steps=2"))
    t.fit()
    assert not (ckpt.latest_checkpoint(run) / EMA_GENERATOR).exists()
    exported = load_file(str(run / "generator.safetensors"))
    raw = t.gen_raw.state_dict()
    assert all(torch.equal(exported[k], raw[k]) for k in raw)
    assert json.loads((run / "metrics.json").read_text())["meta"]["ema"] == {}


def test_restart_starts_the_average_afresh_from_the_live_weights():
    live = small()
    ema = GeneratorEma(live, 0.999)
    set_params(live, 2.0)
    ema.update(live)
    ema.update(live)
    assert ema.updates == 2 and any(not torch.equal(p, q) for p, q in zip(ema.ema.module.parameters(),
                                                                           live.parameters()))
    ema.restart(live)
    assert ema.updates == 0
    assert all(torch.equal(p, q) for p, q in zip(ema.ema.module.parameters(), live.parameters()))


def test_each_generator_phase_has_its_own_average(shards, tmp_path):
    """The gan phase's EMA starts from the weights the gen phase left (warm-up again), so its validation, best
    choice and the generator file follow the GAN's weights instead of a 0.999 average of the gen phase's."""
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    t = Trainer(tiny(tmp_path / "run", shards, "train.phases.gen.lr=1e-2", "train.phases.gan.lr=1e-2",
                     "train.phases.gan.steps=7"))  # 5 critic, then 2 generator updates
    starts = []
    real = t.ema.restart
    t.ema.restart = lambda generator: starts.append((t.state.phase_index, t.ema.updates)) or real(generator)
    t.fit()
    gan = t.cfg.train.phases["gan"]
    gan_gen_steps = sum(gan_turn(gan, s) == "gen" for s in range(gan.steps))
    assert starts == [(0, 0), (2, 3)]  # the gen phase (3 updates), then the gan phase
    meta = json.loads((tmp_path / "run" / "metrics.json").read_text())["meta"]["ema"]
    assert t.ema.updates == meta["updates"] == gan_gen_steps > 0
