"""The NoGAN training loop under Accelerate: build, prepare once, run the phases, validate, checkpoint.

    dist-dejpeg train --config configs/debug.yaml                      # one process, CPU or one GPU; reruns resume
    accelerate launch -m dist_dejpeg.cli train --config configs/div2k.yaml

Order (as the Accelerate examples): Accelerator, seed, models, optimizers, one ``prepare`` (build.py), per-rank seed,
loaders, then the phase loop; a phase that trains one model never runs the other's forward or optimizer. Scalars are
reduced over ranks (window.py); the main process alone writes files. On CUDA nothing reads the device inside a step:
the non-finite and stop-signal flags are read at most every ``train.sync_every`` steps (steps.py, collective.py).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate.utils import set_seed
from safetensors.torch import load_file

from dist_dejpeg.config import Config, PhaseConfig, to_dict, to_yaml
from dist_dejpeg.data import build_train_loader
from dist_dejpeg.run.layout import BEST_GENERATOR, CHECKPOINT_MODEL, LAST_GENERATOR
from dist_dejpeg.run.lock import RunLock, removed_if_start_fails
from dist_dejpeg.train import checkpoint as ckpt
from dist_dejpeg.train.checkpoint import Preempted, TrainingStopped
from dist_dejpeg.train.faults import check_finite_state, non_finite_stop
from dist_dejpeg.train.build import (build_accelerator, build_parts, claim_run_dir, refresh_master_weights, set_lr,
                                     setup_logging, start_phase_optimizer, training_stream, unwrap)
from dist_dejpeg.train.collective import PacedChecks, all_ranks_or_raise
from dist_dejpeg.train.data_checks import checked_val_set, val_fingerprint
from dist_dejpeg.train.ema import GeneratorEma
from dist_dejpeg.train.final import ending, finish_run
from dist_dejpeg.train.monitor import Monitor
from dist_dejpeg.train.phases import StopRule, gan_rule, gan_turn, lr_at, trains_critic, trains_generator
from dist_dejpeg.train.resume import check_alone, choose_checkpoint, other_validation, resume_from
from dist_dejpeg.train.sessions import record_session
from dist_dejpeg.train.steps import HostChecks, NonFiniteLoss, critic_step, generator_step
from dist_dejpeg.train.validation import average_bn_stats, image_grid, mean_restored, validate
from dist_dejpeg.train.window import LogWindow, TimedBatches, sum_over_ranks

log = logging.getLogger("dist_dejpeg")


@dataclass
class TrainerState:
    phase_index: int = 0
    phase_step: int = 0  # optimizer steps done in the current phase
    global_step: int = 0  # optimizer steps done in the whole run
    stop: dict = field(default_factory=lambda: StopRule().state_dict())
    history: list = field(default_factory=list)  # (phase, step, mean restored LPIPS) per validation
    stopped_early: dict = field(default_factory=dict)  # phase name -> step where the stop rule fired
    val_set: str = ""  # data_checks.val_fingerprint of what the validation measured ("": not recorded)
    val_pending: bool = False  # a stop skipped the validation of the step it saved: the resumed phase does it first
    # wall seconds in training steps over all phases and resumes (not validation, image logging or checkpoints):
    # the x axis of time to quality (bench/quality.py)
    train_seconds: float = 0.0
    # phase -> its newest logged window (losses, images/s, data wait; rank 0's): metrics.json meta, over resumes
    last_train_log: dict = field(default_factory=dict)


class Trainer:
    def __init__(self, cfg: Config, train_loader=None, val_set=None, signals: ckpt.StopSignals | None = None):
        # self.cfg: the effective config (the precision and ZeRO stage the run really has); ``cfg`` is not changed
        self.accelerator, self.cfg = acc, cfg = build_accelerator(cfg)
        self.run_dir = Path(cfg.train.run_dir)
        setup_logging(acc, cfg.train.log_level)
        self.lock = RunLock(self.run_dir)
        claim_run_dir(acc, cfg, self.lock, write_samples=train_loader is None)
        with self.lock.released_on_error():  # (a half-built trainer that a notebook's traceback keeps)
            parts = build_parts(cfg, acc)
            self.generator, self.g_opt = parts.generator, parts.g_opt
            self.critic, self.c_opt = parts.critic, parts.c_opt
            self.lpips, self.metric_lpips, self.autocast = parts.lpips, parts.metric_lpips, parts.autocast
            self.deepspeed, self.fused, self.cudagraphs = parts.deepspeed, parts.fused, parts.cudagraphs
            self.signals = signals or ckpt.StopSignals()  # train()'s: installed for the whole run
            self.checks = PacedChecks(HostChecks(acc, self.signals, parts.sync_every), cfg.train.preempt_budget_s)
            self.sync_every, self.flags, self.compile_watch = parts.sync_every, self.checks.flags, parts.compile_watch
            self.blind_prob = cfg.model.quality_blind_prob if cfg.model.quality_conditioning else 0.0
            self.ema = GeneratorEma(self.gen_raw, cfg.train.ema_decay, cfg.train.ema_warmup)  # train/ema.py
            set_seed(cfg.train.seed + acc.process_index)  # per-rank randomness (dropout, ...)
            with all_ranks_or_raise(acc):  # one rank's shards or rank 0's trackers failing: every rank stops now
                self.loader = train_loader or build_train_loader(cfg, acc.process_index, acc.num_processes, acc.device)
                self.val_set = val_set if val_set is not None else checked_val_set(cfg, acc)
                self.monitor = Monitor(acc, cfg, self.run_dir, to_dict(cfg))
            self.state, self.val_changed = TrainerState(val_set=val_fingerprint(cfg)), False
            self.best_generator = self.last_generator = None  # ema.snapshot()s: the gan phase's best, its last step's
            self.validated: tuple[int, dict] | None = None  # (global step, results) of the newest one, if current
            self.config_yaml = to_yaml(cfg)

    def close(self) -> None:
        """Release the run folder and the trackers (fit does this itself; for callers that only step)."""
        self.monitor.close()
        self.lock.release()

    @property
    def gen_raw(self):
        return unwrap(self.accelerator, self.generator)

    @property
    def critic_raw(self):
        return unwrap(self.accelerator, self.critic) if self.critic is not None else None

    def data_skipped(self) -> dict:
        return sum_over_ranks(self.accelerator, getattr(self.loader, "skipped", lambda: {})())

    def models(self) -> dict:
        return {"generator": self.gen_raw, **({"critic": self.critic_raw} if self.critic is not None else {})}

    def save(self) -> Path:
        files = {k: v for k, v in ((BEST_GENERATOR, self.best_generator), (LAST_GENERATOR, self.last_generator))
                 if v is not None} | self.ema.files()  # (checked finite with the models: a resume continues from them)
        check_finite_state(self.accelerator, self.models(), (self.g_opt, self.c_opt), files)
        state = dict(vars(self.state), phase_names=list(self.cfg.train.order), data_skipped=self.data_skipped(),
                     processes=self.accelerator.num_processes)
        loader_state = self.loader.state_dict() if hasattr(self.loader, "state_dict") else {}
        if self.deepspeed:  # its engines' files: no model.safetensors for restore, export, init_from to read
            files[CHECKPOINT_MODEL] = self.gen_raw.state_dict()
        path = ckpt.save_checkpoint(self.accelerator, self.run_dir, self.state.global_step, state, loader_state,
                                    self.config_yaml, self.cfg.train.keep_last,
                                    buffers=ckpt.rank_buffers(self.models()), main_tensors=files or None)
        log.info("checkpoint: %s", path)
        return path

    def resume(self, path: Path) -> None:
        # the config checked against the checkpoint's, then loaded; this run's later checkpoints set aside
        trainer_state, loader_state, buffers = resume_from(self.accelerator, self.cfg, path, self.critic is not None)
        self.config_yaml = to_yaml(self.cfg)  # (a phase shortened below what it trained keeps its length)
        self.monitor.set_lengths({n: self.cfg.train.phases[n].steps for n in self.cfg.train.order})
        ckpt.load_rank_buffers(self.models(), buffers)
        known = set(vars(TrainerState()))
        now, self.state = self.state.val_set, TrainerState(**{k: v for k, v in trainer_state.items() if k in known})
        self.val_changed, self.state.val_set = other_validation(self.state.val_set, now, self.monitor.main), now
        if loader_state and hasattr(self.loader, "load_state_dict"):
            self.loader.load_state_dict(loader_state)
        if (path / BEST_GENERATOR).is_file():
            self.best_generator = load_file(str(path / BEST_GENERATOR))
        self.ema.resume(path, self.gen_raw)
        if self.state.phase_step and (path / LAST_GENERATOR).is_file():  # a gan phase given more steps (longer_phases)
            log.info("resume: the phase continues from its last step's generator, not from the best one it kept")
            self._put_back(load_file(str(path / LAST_GENERATOR)))
        order, i, st = self.cfg.train.order, self.state.phase_index, self.state  # TensorBoard forgets the steps
        self.monitor.resumed(st.global_step, i >= len(order), st.val_set)  # after the checkpoint (all done: its step)
        where = f"phase {i + 1} ({order[i]}) step {self.state.phase_step}" if i < len(order) else "every phase done"
        log.info("resumed from %s: %s", path, where)

    # -- validation -----------------------------------------------------------------------------------
    def run_validation(self, tag: str) -> dict:
        step, start = self.state.global_step, time.perf_counter()
        if self.validated is not None and self.validated[0] == step:
            # no update since (e.g. a gan phase ended on validating the generator it keeps): same weights, same numbers
            results, start = self.validated[1], None
            log.info("%s validation: the generator validated at step %d, unchanged since", tag, step)
        else:
            average_bn_stats(self.accelerator, self.models())
            results = validate(self.accelerator, self.ema.model(self.gen_raw), self.val_set, self.metric_lpips,
                               self.cfg.data.val_batch_size, cudagraphs=self.cudagraphs)
            self.validated = (step, results)
        self.monitor.validation(tag, results, step, None if start is None else time.perf_counter() - start)
        if not self.cfg.train.image_every:  # (the final validation's: final.py)
            self.log_image(tag)
        return results

    def log_image(self, tag: str) -> None:
        """Rows of JPEG | restored | clean validation crops to the trackers (main process): at each validation,
        or with ``train.image_every`` every that many global steps instead (the final validation's: final.py)."""
        if self.accelerator.is_main_process:
            grid = image_grid(self.accelerator, self.ema.model(self.gen_raw), self.val_set, cudagraphs=self.cudagraphs)
            if grid is not None:
                self.monitor.image(f"val/jpeg_restored_clean_{tag}", grid, self.state.global_step)

    # -- the phase loop -------------------------------------------------------------------------------
    def run_phase(self, name: str, phase: PhaseConfig, batches) -> None:
        cfg, acc, st = self.cfg, self.accelerator, self.state
        fresh = st.phase_step == 0
        if fresh:  # (a resumed phase got every rank's own statistics back from the checkpoint)
            average_bn_stats(acc, self.models())
            st.stop = StopRule().state_dict()
            if phase.kind == "gan":
                self.best_generator = None
            if trains_generator(phase):
                self.ema.restart(self.gen_raw)  # this phase's own average (train/ema.py)
        mult = phase.critic_lr_mult if phase.kind == "gan" else 1.0  # the critic's lr over the schedule's
        if trains_generator(phase):
            start_phase_optimizer(self.g_opt, phase, lr_at(phase, st.phase_step), reset=fresh)
        if trains_critic(phase):
            start_phase_optimizer(self.c_opt, phase, lr_at(phase, st.phase_step) * mult, reset=fresh)
        stop = (gan_rule(name, phase, st.stop, fresh, name in st.stopped_early, self.metric_lpips.pretrained,
                         self.val_changed) if phase.kind == "gan" else StopRule.from_state(st.stop))
        self.generator.train(trains_generator(phase))
        if self.critic is not None:
            self.critic.train(trains_critic(phase))
        val_every, t = phase.val_every or cfg.train.val_every, cfg.train
        self.monitor.start_phase(name, st.phase_index, st.phase_step, st.global_step)
        window = LogWindow(acc, cfg.data.batch_size * t.grad_accum * acc.num_processes, batches)
        stopped = not fresh and name in st.stopped_early  # resumed after the stop rule fired
        if st.val_pending and not stopped:
            stopped, st.val_pending = self._validate_in_phase(name, phase, stop), False
        while st.phase_step < phase.steps and not stopped:
            start = time.perf_counter()
            turn = phase.kind if phase.kind != "gan" else gan_turn(phase, st.phase_step)
            lr = lr_at(phase, st.phase_step)
            set_lr(self.g_opt if turn == "gen" else self.c_opt, lr if turn == "gen" else lr * mult)
            window.add(self.train_step(phase, turn, batches))
            st.phase_step += 1
            st.global_step += 1
            self.monitor.advance()
            last = st.phase_step == phase.steps
            # (a critic phase leaves the generator as it was: validating it there would measure the same numbers)
            validating = val_every and st.phase_step % val_every == 0 and not last and trains_generator(phase)
            saving = t.ckpt_every and st.global_step % t.ckpt_every == 0 and not last
            # the host reads the flags every sync_every steps, and always before anything is validated or saved
            # (steps.HostChecks: raises NonFiniteLoss, or returns whether any rank got a stop signal)
            stop_now = self.checks.read(st.global_step) if self.checks.due or validating or saving or last else False
            if st.phase_step % t.log_every == 0 or last:
                scalars, seconds_per_step = window.read(lr, lr * mult if phase.kind == "gan" else None)
                self.monitor.window(name, scalars, st.phase_step, st.global_step, seconds_per_step)
                st.last_train_log[name] = dict(scalars, step=st.global_step)
                window.reset()
            # the step, its bookkeeping and the flag read (on CUDA the host waits there for the queued steps)
            st.train_seconds += time.perf_counter() - start
            # a stop saves at once: the checkpoint within train.preempt_budget_s, its validation done on resume
            saved, st.val_pending = None, bool(validating and stop_now)
            with window.paused():  # not training time: images/s and data wait stay the training's own
                if t.image_every and st.global_step % t.image_every == 0 and not stop_now:
                    self.log_image(name)
                if validating and not stop_now:
                    stopped = self._validate_in_phase(name, phase, stop)
                if saving:
                    st.stop = stop.state_dict()
                    saved = self.save()
            if stop_now:
                st.stop = stop.state_dict()
                path = saved or self.save()
                message = (f"stopped by {self.signals.name or 'a signal on another rank'} after step "
                           f"{st.phase_step} of phase '{name}' (global step {st.global_step}); the checkpoint "
                           f"{path} resumes it: run the same command again (train.auto_resume)")
                self.monitor.finish("preempted", message, st.global_step)
                raise Preempted(message, path)
        self.monitor.end_phase(name, st.global_step)
        if phase.kind == "gan":
            if not stopped:
                self._validate_in_phase(name, phase, stop)
            if self.best_generator is not None and stop.best_step != st.phase_step:
                log.info("%s: keeping the best generator (its step %d, global step %d; %s %.4f)", name, stop.best_step,
                         st.global_step - st.phase_step + stop.best_step, stop.metric.upper(), stop.best)
                self.last_generator = self._put_back(self.best_generator)
        st.stop, st.phase_step = stop.state_dict(), 0
        st.phase_index += 1
        self.save()
        self.last_generator = None  # (in this one checkpoint only)

    def _put_back(self, snapshot: dict) -> dict:
        """The generator (and its EMA) set to an ema.snapshot; returns the snapshot of the weights it replaced."""
        last = self.ema.roll_back(self.gen_raw, snapshot, self.accelerator.device)
        self.validated = None  # other weights than the last validation measured
        if self.deepspeed:
            refresh_master_weights(self.g_opt)
        return last

    def train_step(self, phase: PhaseConfig, turn: str, batches) -> dict:
        """One optimizer update of ``turn``'s model ("gen" or "critic") under ``phase``'s loss weights; returns
        the detached losses. The learning rate is the caller's (run_phase sets it from the schedule)."""
        cfg, acc, gan = self.cfg, self.accelerator, phase.kind == "gan"
        if self.cudagraphs:
            torch.compiler.cudagraph_mark_step_begin()
        common = dict(grad_accum=cfg.train.grad_accum, adversarial=cfg.loss.adversarial, autocast=self.autocast,
                      max_grad_norm=phase.max_grad_norm, deepspeed=self.deepspeed, flags=self.flags,
                      blind_prob=self.blind_prob)
        if turn == "gen":
            logs = generator_step(acc, self.generator, self.g_opt, batches, w_pixel=phase.w_pixel,
                                  w_lpips=phase.w_lpips, w_adv=phase.w_adv if gan else 0.0, lpips=self.lpips,
                                  critic_raw=self.critic_raw if gan else None, chroma_weight=cfg.loss.chroma_weight,
                                  pixel=cfg.loss.pixel, **common)
            self.ema.update(self.gen_raw, self.g_opt)  # (not after a skipped step)
        else:
            logs = critic_step(acc, self.critic, self.c_opt, batches, generator_raw=self.gen_raw, **common)
        self.checks.stepped(self.state.global_step + 1)
        self.compile_watch.stepped(acc.is_main_process)  # (the first step: a warning if compiling fell back to eager)
        return logs

    def _validate_in_phase(self, name: str, phase: PhaseConfig, stop: StopRule) -> bool:
        results = self.run_validation(name)
        self.state.history.append([name, self.state.phase_step, mean_restored(results, "lpips")])
        if phase.kind != "gan":
            return False
        improved, should_stop = stop.update(mean_restored(results, stop.metric), self.state.phase_step)
        self.monitor.set_best({"metric": stop.metric, "value": stop.best, "step": stop.best_step, "phase": name})
        if improved:
            self.best_generator, stop.best_global = self.ema.snapshot(self.gen_raw), self.state.global_step
        if should_stop:
            log.info("%s: validation %s has not improved for %d checks; stopping at step %d (best %.4f at %d)",
                     name, stop.metric.upper(), stop.patience, self.state.phase_step, stop.best, stop.best_step)
            self.state.stopped_early[name] = self.state.phase_step
        return should_stop

    def fit(self) -> dict:
        """The remaining phases, then the final validation (its metrics returned); the trackers, train.log and the
        lock released however it ends (final.ending: a crash or a full disk said in progress.json first)."""
        with ending(self), training_stream(self.accelerator.device, self.cfg.train.cuda_stream):
            return self._fit()

    def _fit(self) -> dict:
        cfg = self.cfg
        self.monitor.write_config(self.config_yaml)  # main process
        batches = TimedBatches(iter(self.loader))
        self.signals.install()
        try:
            while self.state.phase_index < len(cfg.train.order):
                name = cfg.train.order[self.state.phase_index]
                self.run_phase(name, cfg.train.phases[name], batches)
        except NonFiniteLoss as err:  # nothing non-finite is saved (faults.py)
            raise TrainingStopped(non_finite_stop(self, err)) from None
        finally:
            self.signals.restore()
        return finish_run(self)  # final.py: the final validation, metrics.json, the generator file


def train(cfg: Config, resume: str | None = None, train_loader=None, val_set=None) -> dict:
    """Build a Trainer, resume (``"latest"``, a checkpoint folder, or by ``train.auto_resume`` the run folder's
    newest checkpoint that verifies: train/resume.py), run to the end. One process (no launcher's WORLD_SIZE
    over 1) takes the stop signals for the whole run: one before training begins or during the final validation
    ends it at once as Preempted (exit 75; nothing is lost there), not by the signal with no word."""
    signals, trainer, alone = ckpt.StopSignals(), None, int(os.environ.get("WORLD_SIZE") or 1) <= 1
    if alone:  # (ranks: their launcher asked, before it started them): before models, lock and trackers exist
        check_alone(cfg, resume)  # (and a train.processes it does not start: said)
        signals.install()
    try:
        with signals.at_once("before training began"), removed_if_start_fails(cfg.train.run_dir):  # (run/lock.py)
            trainer = Trainer(cfg, train_loader=train_loader, val_set=val_set, signals=signals)
            try:
                path = choose_checkpoint(trainer.accelerator, trainer.run_dir, resume, cfg.train.auto_resume)
                if path is not None:
                    trainer.resume(path)
                record_session(trainer, path)  # sessions.jsonl: this session's commit and libraries (main process)
            except BaseException:
                trainer.close()  # the run folder's lock and the trackers: a corrected command can run in this process
                raise
        return trainer.fit()
    except ckpt.StopNow as stop:
        raise ckpt.stopped_at_once(stop, cfg.train.run_dir, trainer) from None
    finally:
        if alone:
            signals.restore()
