"""Names and a model file's metadata printed to a terminal: a control character in one (a photo named with ESC
sequences, a model whose train_sources hold them) is shown as a visible escape, not sent to the terminal (which
would clear it, retitle it, or forge lines)."""

from __future__ import annotations

import argparse

from dist_dejpeg.run.text import visible

EVIL = "a\x1b]0;pwned\x07\x1b[2J\nb\x9bc\x7f.jpg"


def test_visible_escapes_c0_del_and_c1_and_keeps_the_rest():
    assert visible(EVIL) == "a\\x1b]0;pwned\\x07\\x1b[2J\\x0ab\\x9bc\\x7f.jpg"
    assert visible("photo é 漢字 ☃.jpg") == "photo é 漢字 ☃.jpg" and visible(3) == "3"


def test_restores_per_file_lines_show_a_names_escapes(tmp_path, capsys):
    from dist_dejpeg.restore.inputs import RestoreResult
    from dist_dejpeg.restore.summary import print_restore_summary

    source = str(tmp_path / EVIL)
    results = [RestoreResult(source, error=f"{source}: cannot identify image file"),
               RestoreResult(source, str(tmp_path / "a.png"), quality_from="unknown", passthrough=True)]
    args = argparse.Namespace(output_quality=None, quiet=False, verbose=False, out=str(tmp_path), skip_existing=False)
    print_restore_summary(results, args, "cpu")
    out, err = capsys.readouterr()
    assert "\x1b" not in out + err and "\x07" not in out + err and "\x9b" not in out + err
    assert f"failed: {tmp_path}/a\\x1b]0;pwned\\x07\\x1b[2J\\x0ab\\x9bc\\x7f.jpg: cannot identify" in err
    assert "passed through: " in out and "\\x1b[2J" in out


def test_evaluates_seen_in_training_warning_shows_the_models_names_escaped():
    from dist_dejpeg.evaluation.evaluate import seen_note

    note = seen_note({"images": 1, "photos": [EVIL], "shards": ["s\x1b[31m.tar"]}, 3)
    assert "\x1b" not in note and "\\x1b]0;pwned" in note and "s\\x1b[31m.tar" in note
