"""What `dist-dejpeg restore` prints when a folder is done or interrupted: the per-image lines and the one line of
counts a user reads last (cli_use.py's restore command)."""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

from dist_dejpeg.run.text import visible


def print_restore_summary(results: list, args: argparse.Namespace, device, record=None, interrupted=False) -> None:
    """Per image (none under --quiet, which wins over --verbose; all with --verbose): what was passed through or
    restored without a known quality, what was skipped; every failure; the record's lines that could not be written;
    then one line of counts (restored, passed through, skipped, failed, not begun), last: the line a user reads."""
    failed = [r for r in results if r.error and not r.stopped]
    stopped = [r for r in results if r.stopped]
    skipped = [r for r in results if r.skipped]
    earlier = [r for r in results if r.earlier]
    written = [r for r in results if r.output and not r.skipped]
    restored = [r for r in written if not r.passthrough]
    seconds, megapixels = sum(r.seconds for r in restored), sum(r.megapixels for r in restored)
    # a rate from under a megapixel is mostly the first forward's warm-up: the time itself then
    rate = "" if not megapixels else (f", {1000 * seconds / megapixels:.0f} ms per megapixel" if megapixels >= 1
                                      else f" in {seconds:.1f} s ({megapixels:.2f} megapixels)")
    recoded = {r.source: _reencoded(r, args.output_quality) for r in written if r.passthrough}
    passed = sum(not how for how in recoded.values())
    for r in [] if args.quiet else written:
        if args.verbose or r.passthrough or r.quality is None:
            q = f"q{r.quality} ({r.quality_from})" if r.quality is not None else r.quality_from
            how = "restored" if not r.passthrough else (f"not restored, re-encoded as {recoded[r.source]}"
                                                         if recoded[r.source] else "passed through")
            note = f"; {r.note}" if r.note else ""
            note = note.replace("passed through unchanged", "not restored") if how.startswith("not") else note
            print(visible(f"{how}: {r.source}: {q}{note}"))
    for r in skipped if args.verbose and not args.quiet else []:
        print(visible(f"skipped: {r.source}: {r.output} exists"))
    for r in earlier if args.verbose and not args.quiet else []:
        print(visible(f"skipped: {r.source}: an earlier restore wrote it (name it by itself to restore it again)"))
    for r in failed:
        print(visible(f"failed: {r.source}: {r.error.removeprefix(f'{r.source}: ')}"), file=sys.stderr)  # named once
    quota = bool(stopped) and "(EDQUOT)" in stopped[0].error  # (restore/files.py says a quota as run/files.py does)
    if record is not None and record.failed:  # (a side write: the restore went on)
        print(f"warning: {record.failed} line(s) of the record {record.path} could not be written", file=sys.stderr)
    if stopped and not interrupted:  # one line, not one per image never begun
        print(f"stopped: {stopped[0].error.removeprefix('not restored: ')}: {len(stopped)} image(s) not begun; free "
              f"space{' within the quota' if quota else ''}, then run the same command"
              f"{'' if args.skip_existing else ' with --skip-existing'} for the rest", file=sys.stderr)
    print(f"restored {len(restored)} image(s) into {args.out} on {device}{rate}; "
          + (f"passed {passed} through unchanged; " if passed else "")
          + "".join(f"{n} not restored but re-encoded as {how}; " for how, n in
                    sorted(Counter(how for how in recoded.values() if how).items()))
          + (f"skipped {len(skipped)} existing; " if skipped else "")
          + (f"left {len(earlier)} earlier output(s) alone; " if earlier else "") + f"{len(failed)} failed"
          + (f"; {len(stopped)} not begun ({'interrupted' if interrupted else 'quota exceeded' if quota else 'disk full'})"
             if stopped else ""))


def _reencoded(result, output_quality: int | None) -> str:
    """How a passed-through image's output was encoded with loss ("JPEG q60": a PNG given --format jpg), or ""
    where it is the input file itself or its pixels in a lossless format: the save said which
    (RestoreResult.reencoded, restore/files.py), not a comparison of the files afterwards (an input removed or
    replaced since made a copy of it read as re-encoded)."""
    from dist_dejpeg.jpeg.formats import save_options

    if not result.reencoded:
        return ""
    fmt, options = save_options(Path(result.output).suffix, output_quality)
    return f"{'WebP' if fmt == 'WEBP' else fmt} q{options['quality']}"
