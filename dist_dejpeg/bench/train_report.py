"""bench train's report: the table of every row measured so far (images/s, ms per step, its spread, the ratio to
the naive row, TFLOP/s and MFU), the summary (tuned / naive, the LPIPS share, the baseline measured again) and
the note that says how it was measured; written after each row, so a run cut short leaves what it had."""

from __future__ import annotations

from pathlib import Path

from dist_dejpeg.bench.common import TUNED, spread_text, write_results
from dist_dejpeg.config import Config
from dist_dejpeg.train.build import DEFERRED_CHECK_DEVICES
from dist_dejpeg.train.compile import outcome_text

# The baseline measured again after everything else: the gap between its two measurements is how much one
# configuration moves between Trainer builds in this run; ratios smaller than that are noise.
AGAIN = "naive again (the same baseline, measured last)"


def write_report(config: str, overrides: list[str], out_dir: str | Path, name: str, base: Config,
                  device, results: dict, errors: dict, flops: float, peak: float | None, naive_label: str, ladder: bool,
                  pending: list[str], *, echo: bool, warmup: int, steps: int, repeats: int, rounds: int = 1) -> dict:
    """bench train's tables from the rows measured so far (``pending``: the variants still to come)."""
    table, summary = [], {}
    for label, rows in results.items():
        for update, r in rows.items():
            base_row = results[naive_label].get(update)
            # images/s over the naive row's (its ms ratio where the batches match; rows of other batch sizes too)
            # (without the ladder no naive row was measured: no ratio, not the tuned row over itself)
            r["x_naive"] = (r["images_per_s_per_device"] / base_row["images_per_s_per_device"]
                            if base_row and ladder else None)
            if update == "gen":
                r["achieved_tflops"] = flops / (r["ms_per_call"] / 1000) / 1e12
                r["mfu_bf16"] = flops / (r["ms_per_call"] / 1000) / peak if peak else None
            compiled = outcome_text(r["compile"]) if "compile" in r else ""  # (suppress_errors: eager, said)
            table.append([update, f"{label} ({compiled})" if compiled else label,
                          f"{r['images_per_s_per_device']:.1f}", f"{r['ms_per_call']:.1f}",
                          spread_text(r["spread"]), f"{r['x_naive']:.2f}" if r["x_naive"] else "",
                          f"{r['first_step_s']:.1f}" if r.get("first_step_s") is not None else "",
                          f"{r['achieved_tflops']:.3f}" if "achieved_tflops" in r else "",
                          f"{100 * r['mfu_bf16']:.1f}%" if r.get("mfu_bf16") else ""])
        if "gen without LPIPS" in rows:
            summary[f"lpips_share_{'naive' if label == naive_label else 'tuned'}"] = \
                1 - rows["gen without LPIPS"]["ms_per_call"] / rows["gen"]["ms_per_call"]
    for label, error in errors.items():
        table.append(["all", label, "failed", "", "", "", "", "", error.replace("|", "/")])
    if ladder and TUNED in results:
        summary["tuned_gen_x_naive"] = results[TUNED]["gen"]["x_naive"]
    if AGAIN in results:
        summary["baseline_repeat_ratio"] = results[AGAIN]["gen"]["x_naive"]
    b, t = base.data, base.train
    report = {"config": config, "overrides": list(overrides), "device": str(device), "batch_size": b.batch_size,
              "crop": b.crop, "encoder": base.model.encoder, "decoder_width": base.model.decoder_width,
              "tuned": {"mixed_precision": t.mixed_precision, "channels_last": base.model.channels_last,
                        "fused_adamw": t.fused_adamw, "compile": t.compile,
                        "sync_every": t.sync_every if device.type in DEFERRED_CHECK_DEVICES else 1},
              "gflops_per_gen_step": flops / 1e9, "bf16_peak_tflops": peak / 1e12 if peak else None,
              "warmup": warmup, "steps": steps, "repeats": repeats, "rounds": rounds, "summary": summary,
              "results": results,
              "errors": errors, "pending": pending}
    share = "; ".join(f"LPIPS share of the gen step ({k.rsplit('_', 1)[1]}): {100 * v:.0f}%"
                      for k, v in summary.items() if k.startswith("lpips"))
    ratio = f"tuned gen / naive gen: {summary['tuned_gen_x_naive']:.2f}x. " if "tuned_gen_x_naive" in summary else ""
    if "baseline_repeat_ratio" in summary:
        ratio += (f"The baseline measured again last ran at {summary['baseline_repeat_ratio']:.2f}x its first "
                  f"measurement: differences of that size between rows are noise. ")
    note = (f"`{config}` {' '.join(overrides)}; batch {b.batch_size} x {b.crop} px per device, {base.model.encoder}, "
            f"synthetic batches on {device}; {flops / 1e9:.2f} GFLOP per gen step (flop_counter, fp32 eager). "
            f"Tuned = precision {t.mixed_precision}, channels_last {base.model.channels_last}, fused AdamW "
            f"{t.fused_adamw}, compile {t.compile}, host checks every "
            f"{t.sync_every if device.type in DEFERRED_CHECK_DEVICES else 1} steps. {ratio}"
            + (f"{share}. " if share else "")
            + f"Median of {repeats} blocks of {steps} steps after {warmup} warm-up steps (the first one, with any "
            f"compilation, timed on its own: first step s)"
            + (f"; every variant measured in {rounds} rounds, the median round shown, spread across rounds"
               if rounds > 1 else "") + "; ratios within this run.")
    # the busy share against the unprofiled step: the profiler's own overhead lengthens the profiled one
    profiled = [f"{label}: {p['kernels_per_step']:.0f} kernels, GPU busy {p['device_busy_ms']:.1f} ms of the "
                f"{r['ms_per_call']:.1f} ms step ({100 * p['device_busy_ms'] / r['ms_per_call']:.0f}%; profiled step "
                f"{p['wall_ms']:.1f} ms)"
                for label, rows in results.items() if (r := rows.get("gen")) and (p := r.get("profile"))
                and p.get("device_busy_ms") is not None]
    if profiled:
        note += (" Profiled gen steps (torch.profiler; busy: some kernel running; the operator tables in "
                 f"{name}_profile_<n>.txt): " + "; ".join(profiled) + ".")
    skipped = [f"{label} / {update}: {r['cudagraph_skips']}" for label, rows in results.items()
               for update, r in rows.items() if r.get("cudagraph_skips")]
    if skipped:
        note += (" Regions inductor ran without CUDA graphs (TORCH_LOGS=cudagraphs says why): "
                 + "; ".join(skipped) + ".")
    eager = [f"{label} / {update}" for label, rows in results.items() for update, r in rows.items()
             if (r.get("compile") or {}).get("fell_back")]
    if eager:
        note += (" **Compiled rows that fell back to eager** (compiling failed; dynamo's suppress_errors ran them "
                 "uncompiled, its warnings in the log say why): " + "; ".join(eager) + ".")
    if pending:
        note += f" **Incomplete: still to measure: {'; '.join(pending)}.**"
    write_results(out_dir, name, report, "Train-step throughput", note,
                  ["update", "variant", "images/s per device", "ms/step", "spread", "x naive", "first step s",
                   "TFLOP/s", "MFU (bf16)"],
                  table, echo=echo)
    return report
