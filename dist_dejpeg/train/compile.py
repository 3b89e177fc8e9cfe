"""``torch.compile`` for the trainer's models, and where inductor keeps what it compiled.

    use_compile_cache(compile_cache_dir(cfg))   # before the first compile: the run folder's kernel cache
    compile_model(generator, cfg.train.compile_mode)
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from dist_dejpeg.config import Config

log = logging.getLogger("dist_dejpeg")
COMPILE_BACKEND = "inductor"  # torch.compile's backend (tests swap in a failing one)
# the start of warn_if_eager's warning, in the run's train.log: bench/gpu_summary.py reads it (tests hold the two equal)
FELL_BACK = "train.compile: compiling failed"


def _user_compile_cache() -> str | None:
    """A TORCHINDUCTOR_CACHE_DIR set before the run started is the user's choice: train.compile_cache leaves it
    alone. Inductor writes its default there itself once it has looked it up (an import may do that first)."""
    value = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if value is None:
        return None
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    return None if os.path.abspath(value) == os.path.abspath(default_cache_dir()) else value


USER_COMPILE_CACHE = _user_compile_cache()


def compile_cache_dir(cfg: Config) -> Path | None:
    """Where inductor keeps what it compiled (``train.compile_cache``, relative to the run folder; None: the
    library's default, a folder under /tmp on this node, or the user's TORCHINDUCTOR_CACHE_DIR). In the run
    folder, a requeued or resumed run on any node finds its kernels compiled: on the 2-core CPU the first step
    of the compiled div2k model took 292 s cold and 12.6 s from the cache."""
    if USER_COMPILE_CACHE is not None or not cfg.train.compile_cache:
        return None
    return Path(cfg.train.run_dir) / cfg.train.compile_cache


def use_compile_cache(path: Path | None) -> None:
    """Point inductor at ``path`` (read when it first compiles, after this); None: back to its default."""
    if USER_COMPILE_CACHE is not None:
        return
    if path is None:
        os.environ.pop("TORCHINDUCTOR_CACHE_DIR", None)
    else:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(path.absolute())


def compile_model(model: torch.nn.Module, mode: str = "default") -> None:
    """``torch.compile`` in place (same module, same state_dict keys, so checkpoints and DDP are unchanged).
    Compilation is lazy; where it fails at the first call, dynamo's suppress_errors runs that frame eagerly
    and logs a warning instead of stopping the run (compile_outcome tells it: a row or run then is not a compiled
    one). ``mode``: train.compile_mode."""
    import torch._dynamo

    torch._dynamo.config.suppress_errors = True
    model.compile(backend=COMPILE_BACKEND, mode=None if mode == "default" else mode)


def compile_counts() -> dict[str, int]:
    """dynamo's running counts (torch._dynamo.utils.counters): frames it tried, frames that failed (with
    suppress_errors those run eagerly; one it skips as holding nothing to compile counts too), graphs compiled."""
    from torch._dynamo.utils import counters

    frames = counters["frames"]
    return {"failed": frames["total"] - frames["ok"], "graphs": counters["stats"]["unique_graphs"]}


def compile_outcome(since: dict[str, int]) -> dict:
    """What dynamo made of the compiled models called since ``since`` (compile_counts() then): graphs compiled and
    frames failed since, and fell_back: they ran eagerly (suppress_errors), frames failed and no graph compiled,
    since then or in this whole process (a frame that failed once is not tried again: eager with no new failure).
    A row that compiled nothing new and failed nothing reuses what an earlier one compiled."""
    now = compile_counts()
    graphs, failed = now["graphs"] - since["graphs"], now["failed"] - since["failed"]
    fell_back = (failed > 0 and graphs == 0) or (now["failed"] > 0 and now["graphs"] == 0)
    return {"graphs": graphs, "failed_frames": failed, "fell_back": fell_back}


def outcome_text(outcome: dict) -> str:
    """A compiled row's or run's outcome in words: "" where it compiled without a failed frame."""
    if outcome["fell_back"]:
        return f"compiled: fell back to eager ({outcome['failed_frames']} errors)"
    return f"compiled, {outcome['failed_frames']} frames eager" if outcome["failed_frames"] else ""


def warn_if_eager(since: dict[str, int], say: bool = True) -> dict:
    """compile_outcome(since) after a run's first step (it compiled); where compiling fell back to eager, a warning
    (``say``: this rank logs): the run trains, uncompiled, slower than a compiled one."""
    outcome = compile_outcome(since)
    if outcome["fell_back"] and say:
        log.warning(f"{FELL_BACK} (%d frames; dynamo's warnings above say why) and the models run eagerly: this run "
                    "is not a compiled one (its speed is eager's)", outcome["failed_frames"])
    return outcome


class CompileWatch:
    """Whether a run's models compiled: dynamo's counts when build_parts compiled them, read after the first training
    step (compiling is lazy) by ``stepped``, which warns where they fell back to eager; ``outcome``: compile_outcome's
    (None: not compiled, or no step yet)."""

    def __init__(self, compiled: bool):
        self.since, self.outcome = compile_counts() if compiled else None, None

    def stepped(self, say: bool = True) -> None:
        if self.since is not None:
            self.outcome, self.since = warn_if_eager(self.since, say), None
