"""The end of a run: the final validation (the EMA's generator, and the raw one's for ``metrics.json``'s meta),
``metrics.json`` and the generator file with the validated gains restore's guard decides by (main process).
Every rank takes part: the validation is sharded, and a failure writing rank 0's files fails every rank."""

from __future__ import annotations

import contextlib
import logging
from statistics import NormalDist

from dist_dejpeg import code_version
from dist_dejpeg.models.generator_file import read_metadata, save_generator, training_shards
from dist_dejpeg.models.names import CONFORMED_KEYS, JPEG_PSNR, table_json
from dist_dejpeg.run.layout import GENERATOR, METRICS
from dist_dejpeg.train.checkpoint import FINAL_STAGE, StopNow
from dist_dejpeg.train.collective import all_ranks_or_raise, warn_on_main
from dist_dejpeg.train.validation import (GAIN_BOUND_SE, ConformedSums, GridCrops, average_bn_stats, feed,
                                          validate)
from dist_dejpeg.train.window import sum_over_ranks

log = logging.getLogger("dist_dejpeg")


def guard_gains(results: dict, conformed: dict | None = None) -> dict:
    """The generator file's metadata by which restore's guard decides: the RGB PSNR gain per validated quality
    and its lower bound, and the JPEG's PSNR there (as JSON strings: safetensors metadata holds strings); with
    ``conformed`` (validation.conformed_gains'), the gain and bound restore makes consistent with its JPEG at each
    quality, at the cell half-width whose bound is highest there (the file's own cell, 0.5, on a tie): the bounds
    of a choice among k widths (``among``), so that picking the best of them is as sure as one bound alone."""
    # the mean of the crops' own gains, not the difference of the two means: a crop its JPEG keeps exactly (a flat
    # one: PSNR inf) is left out of the JPEG's mean but not of the restored one's (+7.3 dB for a loss of 0.18)
    gains = {k[1:]: r["gain"]["psnr"] for k, r in results.items()}
    lows = {k[1:]: r["gain"]["psnr_low"] for k, r in results.items()}
    jpeg = {k[1:]: r["jpeg"]["psnr"] for k, r in results.items()}
    meta = {"val_psnr_gain": table_json(gains), "val_psnr_gain_low": table_json(lows), JPEG_PSNR: table_json(jpeg)}
    if conformed:
        lows = {q: {h: among(s, len(widths)) for h, s in widths.items()} for q, widths in conformed.items()}
        best = {q: max(bounds, key=lambda h: _or_worst(bounds[h])) for q, bounds in lows.items()}
        tables = ({str(q): conformed[q][h]["psnr"] for q, h in best.items()},
                  {str(q): lows[q][h] for q, h in best.items()}, {str(q): h for q, h in best.items()})
        meta.update({key: table_json(table) for key, table in zip(CONFORMED_KEYS, tables)})
    return meta


def among(summary: dict, k: int) -> float:
    """The lower bound of a gain (gain_summary's) chosen as the best of ``k``: the mean minus the standard errors
    that leave a k-th of the one-sided chance a single bound leaves (Bonferroni; 2.43 for 3 instead of 2). The best
    of three half-widths' bounds at GAIN_BOUND_SE passed a model gaining nothing 1.5-2 times as often as one bound
    (a review's simulation: 41 crops, correlated widths, 4.4 % instead of 2.6 %)."""
    mean, low = summary["psnr"], summary["psnr_low"]
    if k <= 1 or low != low:
        return low
    normal = NormalDist()
    return mean - (mean - low) * normal.inv_cdf(1 - normal.cdf(-GAIN_BOUND_SE) / k) / GAIN_BOUND_SE


def _or_worst(value: float) -> float:
    return value if value == value else float("-inf")  # NaN (no bound) loses to any number


def generator_step(state) -> int:
    """The global step of the generator a run ends with: the gan phase's best validation's, where it was kept
    (evaluate and report said "training steps 330" of the weights of step 320), else the run's last step."""
    best = (state.stop or {}).get("best_global", -1)
    return best if 0 <= best <= state.global_step else state.global_step


def final_validation(trainer) -> tuple[dict, dict | None]:
    """The final validation of the EMA's generator, logged (its scalars and image grid): validate's results and
    conformed_gains' from one forward over the crops, which also gives the grid (each was a forward of its own).
    Where nothing changed since the run's last validation (a gan phase ending on the generator it keeps), its
    results, and the forward for the other two alone."""
    acc, cfg, step = trainer.accelerator, trainer.cfg, trainer.state.global_step
    model, val_set, size = trainer.ema.model(trainer.gen_raw), trainer.val_set, cfg.data.val_batch_size
    also = (ConformedSums(acc, val_set), GridCrops(val_set))
    if trainer.validated is not None and trainer.validated[0] == step:
        results = trainer.validated[1]
        log.info("final validation: the generator validated at step %d, unchanged since", step)
        feed(acc, model, val_set, size, also, cudagraphs=trainer.cudagraphs)
    else:
        average_bn_stats(acc, trainer.models())
        results = validate(acc, model, val_set, trainer.metric_lpips, size, cudagraphs=trainer.cudagraphs, also=also)
    trainer.monitor.final(results, also[1].grid(), step, trainer.state.val_set)
    return results, also[0].results(acc)


def finish_run(trainer) -> dict:
    """Validate a finished run's generator and write its files; returns the final validation's results. A stop
    signal meanwhile ends one process at once (StopSignals.at_once; exit 75): the last checkpoint holds every
    phase, and the same command does this again."""
    acc, cfg, state = trainer.accelerator, trainer.cfg, trainer.state
    with trainer.signals.at_once(FINAL_STAGE):
        results, conformed = final_validation(trainer)  # the EMA's; the raw generator's once more, for the meta
        ema = trainer.ema.meta(lambda: validate(acc, trainer.gen_raw, trainer.val_set, trainer.metric_lpips,
                                                cfg.data.val_batch_size, cudagraphs=trainer.cudagraphs))
        skipped = trainer.data_skipped()
        local = next(iter(trainer.val_set.values()))[0].shape[0] if trainer.val_set else 0
        n_val = sum_over_ranks(acc, {"images": local})["images"]
        if any(skipped.values()):  # (summed over the ranks: said once)
            warn_on_main(acc.is_main_process)("training data: skipped %s", skipped)
        with all_ranks_or_raise(acc):  # rank 0's files failing fails every rank now; also the last barrier
            if acc.is_main_process:  # (each file atomic: a stop between them leaves a run that validates again)
                trainer.monitor.write_metrics(results, lpips=trainer.metric_lpips.description, state=state, ema=ema,
                                              val_images=n_val, skipped=skipped, last_train=state.last_train_log)
                save_generator(trainer.ema.model(trainer.gen_raw), cfg.model, trainer.run_dir / GENERATOR,
                               extra={"lpips": trainer.metric_lpips.description, "global_step": generator_step(state),
                                      "ema_decay": cfg.train.ema_decay, **guard_gains(results, conformed),
                                      **training_shards(cfg.data), "code": trained_by(trainer.run_dir, state)})
                log.info("wrote %s and %s", trainer.run_dir / METRICS, trainer.run_dir / GENERATOR)
    trainer.monitor.finish("finished", "", state.global_step)
    trainer.monitor.close()
    return results


def trained_by(run_dir, state) -> str:
    """The generator file's "code": this code, unless the file there is already of this step (a finished run run
    again: it validates again, no step trained; an upgrade would otherwise credit the new code with the weights)."""
    try:
        earlier = read_metadata(run_dir / GENERATOR)
    except (OSError, ValueError):
        return code_version()
    same_step = earlier.get("global_step") == str(generator_step(state))
    return (earlier.get("code") if same_step else None) or code_version()


@contextlib.contextmanager
def ending(trainer):
    """Trainer.fit's end, however it comes: progress.json says why where nothing said it yet (a crash, a full disk:
    Monitor.disk_full_error; a KeyboardInterrupt: a second Ctrl-C), then the trackers and train.log are closed and
    the lock released, so that a later run in the same process (a notebook's) neither writes into this run's
    train.log nor keeps its TensorBoard writer. A StopNow (the final validation's) is left to train(), which says
    it (checkpoint.stopped_at_once) and closes them."""
    close = True
    try:
        yield
    except StopNow:
        close = False
        raise
    except Exception as err:  # a full disk (a checkpoint, the final files): DiskFull's message, exit 3
        raise trainer.monitor.disk_full_error(err)  # (err itself for any other error)
    except KeyboardInterrupt:  # (the first Ctrl-C stops after the step with a checkpoint: Preempted)
        trainer.monitor.finish("crashed", "KeyboardInterrupt: interrupted at once (a second Ctrl-C?), without a "
                                          "checkpoint", trainer.state.global_step)
        raise
    finally:
        if close:
            trainer.monitor.close()
        trainer.lock.release()
