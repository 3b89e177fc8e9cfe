"""``torch.compile`` for the trainer's models, and where inductor keeps what it compiled.

    use_compile_cache(compile_cache_dir(cfg))   # before the first compile: the run folder's kernel cache
    compile_model(generator, cfg.train.compile_mode)
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from dist_dejpeg.config import Config

COMPILE_BACKEND = "inductor"  # torch.compile's backend (tests swap in a failing one)


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
    and logs a warning instead of stopping the run. ``mode``: train.compile_mode."""
    import torch._dynamo

    torch._dynamo.config.suppress_errors = True
    model.compile(backend=COMPILE_BACKEND, mode=None if mode == "default" else mode)
