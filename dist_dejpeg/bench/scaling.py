"""Scaling: measured 1 -> 2 processes (gloo on the CPU, through ``accelerate launch``) and a model of DDP
efficiency at 8, 64 and 256 GPUs.

    dist-dejpeg bench scaling --config configs/debug.yaml
    dist-dejpeg bench scaling --updates gen        # the gen update alone (each launch times every update otherwise)
    dist-dejpeg bench train --scaling-model        # the model alone, from this machine's tuned step times

Measured: the same ``bench train`` (tuned row only) runs under ``accelerate launch`` with 1 and with 2
processes of one thread each, so the two runs use the same cores per process; efficiency = (images/s of 2
processes) / (2 x images/s of 1 process).

Model (data parallel, ring all-reduce of fp32 gradients once per optimizer step):
    T_ar(N)   = 2 (N - 1) / N * B / bw + 2 (N - 1) * alpha
    no overlap: efficiency = T_c / (T_c + T_ar)
    overlap:    efficiency = T_c / (T_c + max(T_ar - f_b T_c, T_ar / k))
B: gradient bytes per step (4 x parameters), T_c: the measured compute time of one step on one device,
bw: the bus bandwidth of the slowest link in the ring (NVLink inside a node, N <= 8; one InfiniBand NIC
per GPU across nodes), alpha: per-hop latency, f_b = 2/3: the share of the step that is backward (DDP
overlaps buckets with it), k: DDP's buckets (25 MB each); the last bucket never overlaps.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from dist_dejpeg.bench.common import CPU_CONFIG, TUNED, UPDATES, add_common_arguments, bundled, config_of, write_results

# Bus bandwidths (GB/s) and per-hop latencies that NCCL's all-reduce reaches on current clusters (stated
# assumptions, not measurements of this project): H100 SXM NVLink 4, NDR InfiniBand 400 Gb/s per GPU.
LINKS = {"nvlink": {"bw_gbs": 400.0, "alpha_us": 5.0}, "infiniband": {"bw_gbs": 45.0, "alpha_us": 10.0}}
BACKWARD_SHARE = 2 / 3
BUCKET_BYTES = 25 * 2**20
GPUS_PER_NODE = 8


def allreduce_seconds(n: int, grad_bytes: float) -> float:
    """Ring all-reduce time of ``grad_bytes`` over ``n`` ranks (NVLink within one node, InfiniBand beyond)."""
    if n <= 1:
        return 0.0
    link = LINKS["nvlink" if n <= GPUS_PER_NODE else "infiniband"]
    return 2 * (n - 1) / n * grad_bytes / (link["bw_gbs"] * 1e9) + 2 * (n - 1) * link["alpha_us"] * 1e-6


def predicted_efficiency(step_s: float, grad_bytes: float, n: int, overlap: bool) -> float:
    t_ar = allreduce_seconds(n, grad_bytes)
    if not overlap:
        return step_s / (step_s + t_ar)
    buckets = max(1, math.ceil(grad_bytes / BUCKET_BYTES))
    return step_s / (step_s + max(t_ar - BACKWARD_SHARE * step_s, t_ar / buckets))


def model_table(step_s: dict[str, float], grad_bytes: dict[str, float], gpus=(8, 64, 256)) -> list[list[str]]:
    """Rows (model, step ms, gradient MB, then no-overlap / overlap efficiency at each GPU count)."""
    rows = []
    for name, seconds in step_s.items():
        row = [name, f"{1000 * seconds:.1f}", f"{grad_bytes[name] / 1e6:.1f}"]
        for n in gpus:
            row.append(f"{100 * predicted_efficiency(seconds, grad_bytes[name], n, False):.0f}% / "
                       f"{100 * predicted_efficiency(seconds, grad_bytes[name], n, True):.0f}%")
        rows.append(row)
    return rows


def gradient_bytes(config: str, overrides: list[str]) -> dict[str, float]:
    """fp32 gradient bytes of the generator and the critic (trainable parameters x 4)."""
    from dist_dejpeg.config import load_config
    from dist_dejpeg.models.critic import build_critic
    from dist_dejpeg.models.unet import build_generator

    cfg = load_config(config, list(overrides))
    count = lambda m: sum(p.numel() for p in m.parameters() if p.requires_grad)  # noqa: E731
    return {"generator": 4.0 * count(build_generator(cfg.model)), "critic": 4.0 * count(build_critic(cfg.critic))}


def _launch(processes: int, config: str, overrides: list[str], out: Path, steps: int,
            updates: tuple[str, ...] = ()) -> dict:
    env = dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_cpu_threads_per_process", "1",
           "--num_processes", str(processes), "--num_machines", "1", "--mixed_precision", "no",
           "--dynamo_backend", "no"]
    cmd += ["--multi_gpu"] if processes > 1 else ["--cpu"]
    cmd += ["-m", "dist_dejpeg.cli", "bench", "train", "--no-ladder", "--steps", str(steps), "--results", str(out),
            "--name", f"scaling_{processes}", *(["--updates", *updates] if updates else []), "--config", config,
            *overrides, "train.cpu=true"]
    subprocess.run(cmd, env=env, check=True)
    return json.loads((out / f"scaling_{processes}.json").read_text())


def run(config: str, overrides: list[str], out_dir: str | Path, *, steps: int = 10, name: str = "scaling",
        updates: tuple[str, ...] = ()) -> dict:
    """Time bench train's tuned row in 1 and 2 CPU processes; ``updates``: only those (bench train's --updates;
    empty: all that the config trains)."""
    grads = gradient_bytes(config, overrides)  # first: a config that does not load stops before the launches
    with tempfile.TemporaryDirectory() as tmp:
        one = _launch(1, config, overrides, Path(tmp), steps, updates)
        two = _launch(2, config, overrides, Path(tmp), steps, updates)
    measured, table = {}, []
    for update, r1 in one["results"][TUNED].items():
        r2 = two["results"][TUNED][update]
        eff = r2["images_per_s_per_device"] / r1["images_per_s_per_device"]
        measured[update] = {"images_per_s_1": r1["images_per_s_per_device"],
                            "images_per_s_2": 2 * r2["images_per_s_per_device"], "efficiency": eff}
        # one run each, one after the other: 2 processes cannot beat 2 x 1; above 100% is the machine's drift
        table.append([update, f"{r1['images_per_s_per_device']:.1f}", f"{2 * r2['images_per_s_per_device']:.1f}",
                      f"{100 * eff:.0f}%" + (" (>100%: noise; rerun with more --steps)" if eff > 1 else "")])
    report = {"config": config, "overrides": list(overrides), "threads_per_process": 1, "measured": measured,
              "gradient_bytes": grads}
    note = (f"`{config}` {' '.join(overrides)}; CPU, gloo, 1 thread per process, `accelerate launch` with 1 and 2 "
            f"processes (tuned row of `bench train`, synthetic batches). Efficiency = 2-process images/s / "
            f"(2 x 1-process images/s), both from this run, one run each, one after the other: an efficiency "
            f"above 100% is noise.")
    write_results(out_dir, name, report, "Scaling, measured 1 -> 2 processes", note,
                  ["update", "images/s, 1 process", "images/s, 2 processes (total)", "efficiency"], table)
    return report


def scaling_model(train_report: dict, config: str, overrides: list[str], out_dir: str | Path,
                  name: str = "scaling_model") -> dict:
    """The predicted DDP efficiency at 8/64/256 GPUs from a ``bench train`` report's tuned step times; from a CPU's
    steps (no GPU step measured) it is written, and said to be no GPU prediction."""
    tuned = train_report["results"][TUNED]
    on = str(train_report.get("device", ""))
    grads = gradient_bytes(config, overrides)
    steps = {"generator": tuned["gen"]["ms_per_call"] / 1000}
    if "critic" in tuned:
        steps["critic"] = tuned["critic"]["ms_per_call"] / 1000
    rows = model_table(steps, grads)
    report = {"from": train_report.get("machine"), "config": config, "overrides": overrides,
              "step_device": on, "step_seconds": steps, "gradient_bytes": grads, "links": LINKS,
              "backward_share": BACKWARD_SHARE, "bucket_bytes": BUCKET_BYTES}
    note = (f"Step times: the tuned rows of `bench train` on {train_report.get('machine')} (`{config}` "
            f"{' '.join(overrides)}). Ring all-reduce of fp32 gradients, NVLink {LINKS['nvlink']['bw_gbs']:.0f} "
            f"GB/s within a node of {GPUS_PER_NODE}, InfiniBand {LINKS['infiniband']['bw_gbs']:.0f} "
            f"GB/s per GPU across nodes; cells: efficiency without / with overlap of communication and backward. "
            f"Formula in dist_dejpeg/bench/scaling.py and the README.")
    title = "Predicted DDP efficiency (model, not measured)"
    if not on.startswith("cuda"):  # a CPU step is many times a GPU's: the all-reduce hides behind it
        title += " from a CPU step: not a GPU prediction"
        note = ("The step times are a CPU's (no GPU step measured): far longer than a GPU's, they make every "
                "efficiency far higher than GPUs reach; run `bench train --scaling-model` on a GPU for a "
                "prediction. " + note)
    write_results(out_dir, name, report, title, note,
                  ["model", "step ms", "gradient MB", "8 GPUs", "64 GPUs", "256 GPUs"], rows)
    return report


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser, "scaling", config=False)  # (its --config: no GPU default, see cpu_config_of)
    parser.add_argument("--config", help="training config (none: configs/debug.yaml, on any machine: the "
                                         "measured part runs on the CPU)")
    parser.add_argument("overrides", nargs="*", default=[], help="config overrides, key=value (anywhere but right "
                                                                 "after an option that takes several values)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per block of each bench train")
    parser.add_argument("--updates", nargs="+", choices=list(UPDATES), default=list(UPDATES),
                        help="the updates to time in 1 and 2 processes (bench train's --updates)")


def cpu_config_of(args: argparse.Namespace) -> tuple[str, list[str]]:
    """The config and overrides of the measured part, which runs on the CPU whatever the machine: the CPU debug
    recipe unless --config names a config."""
    return config_of(args) if args.config else (bundled(CPU_CONFIG[0]), [*CPU_CONFIG[1], *args.overrides])


def main(args: argparse.Namespace) -> int:
    run(*cpu_config_of(args), Path(args.results), steps=args.steps, name=args.name, updates=tuple(args.updates))
    return 0
