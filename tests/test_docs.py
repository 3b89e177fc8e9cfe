"""The docs cannot drift: docs/CONFIG.md matches the schema, every schema field is documented, and every command
the README shows parses with the real CLI (a training command also resolves its config with --dry-run) and names
files that exist. What each command does is tested where it lives (tests/test_infer.py restore, test_evaluate.py,
test_report.py, test_onnx.py, test_status.py, test_monitor.py trackers, test_data.py and test_div2k.py prepare,
test_slurm.py the sbatch scripts, test_distributed.py the gloo launcher config, test_bench.py, test_gpu_check.py,
test_debug_recipe.py the main job, `.ci/run` the test command)."""

import dataclasses
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from dist_dejpeg import config
from dist_dejpeg.cli import build_parser, main

ROOT = Path(__file__).parents[1]
README = ROOT / "README.md"
CONFIG_PAGE = ROOT / "docs" / "CONFIG.md"
MARKERS = ("<!-- config-reference:start -->", "<!-- config-reference:end -->")
MAX_README_LINES = 350  # a user guide; the measurement history lives in benchmarks/RESULTS.md


def _between_markers(text: str) -> str:
    start, end = MARKERS
    return text[text.index(start) + len(start):text.index(end)].strip()


def test_config_reference_is_current():
    assert _between_markers(CONFIG_PAGE.read_text()) == config.reference_markdown().strip(), (
        "docs/CONFIG.md is stale: regenerate it with `python -m dist_dejpeg.config --write docs/CONFIG.md`")


def test_config_reference_regenerates_between_the_markers(tmp_path):
    """The documented regenerate command rewrites the tables and keeps the page's own prose."""
    page = tmp_path / "CONFIG.md"
    page.write_text(f"intro\n\n{MARKERS[0]}\nstale table\n{MARKERS[1]}\n\noutro\n")
    subprocess.run([sys.executable, "-m", "dist_dejpeg.config", "--write", str(page)], check=True, cwd=ROOT)
    text = page.read_text()
    assert text.startswith("intro\n\n") and text.endswith("\n\noutro\n")
    assert _between_markers(text) == config.reference_markdown().strip()


def test_the_config_reference_command_has_help_and_refuses_a_wrong_option(tmp_path):
    """`--help`, `--write` without its page and a misspelt option each printed the whole reference, exit 0."""
    def run(*args):
        return subprocess.run([sys.executable, "-m", "dist_dejpeg.config", *args], cwd=ROOT, capture_output=True,
                              text=True)

    shown = run("--help")
    assert shown.returncode == 0 and "--write PAGE" in shown.stdout and "| key |" not in shown.stdout
    for wrong in (["--write"], ["--wirte", str(tmp_path / "CONFIG.md")]):
        done = run(*wrong)
        assert done.returncode == 2 and "error:" in done.stderr and "| key |" not in done.stdout, wrong
    (page := tmp_path / "page.md").write_text("# a page without the markers\n")  # (a ValueError traceback)
    for missing in (page, tmp_path / "nope.md"):
        done = run("--write", str(missing))
        assert done.returncode == 2 and done.stderr.startswith("error: ") and "Traceback" not in done.stderr, missing
    assert page.read_text() == "# a page without the markers\n"
    assert run().stdout.strip() == config.reference_markdown().strip()


def test_every_config_field_has_a_documented_row():
    from dist_dejpeg.config.reference import sections as config_sections

    reference = config.reference_markdown()
    sections = dict(config_sections())  # read from Config's fields: a section added there has its table
    assert [s for s in sections if "." not in s] == [f.name for f in dataclasses.fields(config.Config)]
    assert sections["train.phases.<name>"] is config.PhaseConfig and sections["data"] is config.DataConfig
    for prefix, cls in sections.items():
        for f in dataclasses.fields(cls):
            assert f"`{prefix}.{f.name}`" in reference, f"{prefix}.{f.name} has no comment in dist_dejpeg/config/schema.py"


def test_the_page_shows_each_built_in_phase_s_own_values():
    """The page listed only the generic train.phases.<name> defaults (steps 1000, lr 1e-3, w_lpips 1, w_pixel 1):
    the built-in phases' own values (critic: 500 steps, lr 1e-4, no LPIPS or pixel loss) were nowhere. Each
    built-in phase has a row with every field where it differs from PhaseConfig's default, read from the page."""
    page = CONFIG_PAGE.read_text()
    generic = dataclasses.asdict(config.PhaseConfig())
    phases = config.TrainConfig().phases
    assert set(phases) == {"gen", "critic", "gan"}
    for name, phase in phases.items():
        rows = [line for line in page.splitlines() if line.startswith(f"| `{name}` |")]
        assert len(rows) == 1, name
        shown = dict(re.findall(r"`(\w+): ([^`]+)`", rows[0]))
        differing = {k: repr(v) for k, v in dataclasses.asdict(phase).items() if v != generic[k]}
        assert shown == differing, (name, shown, differing)


def test_readme_commands_match_ci():
    ci = (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert ci in README.read_text(), "`.ci/run` must run exactly the README's test command"


def test_readme_is_a_user_guide():
    text = README.read_text()
    assert len(text.splitlines()) <= MAX_README_LINES, "measurements belong in benchmarks/RESULTS.md"
    assert "docs/CONFIG.md" in text and "benchmarks/RESULTS.md" in text
    for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", text):  # relative markdown links resolve
        if "://" not in target:
            assert (ROOT / target).exists(), f"README links to {target}, which does not exist"


def _readme_commands() -> list[list[str]]:
    """Each command of the README's bash blocks as argv: continuation lines joined, comments and leading
    VAR=value assignments dropped, `a && b` split."""
    blocks = re.findall(r"^ *```bash\n(.*?)^ *```", README.read_text(), flags=re.S | re.M)
    commands = []
    for block in blocks:
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            while words:
                cut = words.index("&&") if "&&" in words else len(words)
                command, words = words[:cut], words[cut + 1:]
                while command and re.fullmatch(r"[A-Z_]+=\S*", command[0]):
                    command = command[1:]
                if command:
                    commands.append(command)
    return commands


def _cli_args(command: list[str]) -> list[str] | None:
    """The dist-dejpeg arguments of a command (direct, or under `accelerate launch -m dist_dejpeg.cli`)."""
    if command[0] == "dist-dejpeg":
        return command[1:]
    if command[:2] == ["accelerate", "launch"] and "dist_dejpeg.cli" in command:
        return command[command.index("dist_dejpeg.cli") + 1:]
    return None


def test_readme_commands_parse_and_name_real_files(monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    commands = _readme_commands()
    cli = [args for args in map(_cli_args, commands) if args is not None]
    assert len(cli) >= 15, "the README's dist-dejpeg commands were not found"
    parser = build_parser()
    for args in cli:
        try:  # as cli.main parses (any extra word refused; key=value overrides after the options are positionals)
            parsed, extra = parser.parse_known_args(args)
        except SystemExit:
            pytest.fail(f"the README's `dist-dejpeg {shlex.join(args)}` does not parse: {capsys.readouterr().err}")
        assert not extra, f"the README's `dist-dejpeg {shlex.join(args)}`: unrecognized arguments {extra}"
        if args[0] == "train":  # the config and every override resolve (--resume, model.init_from: a run this
            rest = [a for i, a in enumerate(args[1:]) if a != "--resume" and not (i and args[i] == "--resume"  # checkout
                                                                                   and "=" not in a)  # has not)
                    and not a.startswith("model.init_from=")]
            assert main(["train", "--dry-run", *rest]) == 0, f"dist-dejpeg {shlex.join(args)}"
    for command in commands:
        named = [w for w in command if re.match(r"(configs|launch|benchmarks)/", w)]
        if command[0] == "sbatch":  # script, training config, overrides: as the script hands them to train
            script = next(w for w in command if w.endswith(".sbatch"))
            rest = command[command.index(script) + 1:]
            config.load_config(rest[0], rest[1:])
        for path in named:
            assert (ROOT / path).exists(), f"the README's `{shlex.join(command)}` names {path}, which is missing"


def test_readme_time_to_quality_cites_the_run_its_gains_come_from():
    """The README's gains came from time_to_quality.md, its minutes to +0.5 / +1 dB from an older run's file."""
    table = (ROOT / "benchmarks" / "results" / "time_to_quality.md").read_text()
    cell = lambda what: re.search(rf"\| {re.escape(what)} \| (\S+) ", table).group(1)  # noqa: E731
    text = README.read_text()
    gains = re.search(r"\| debug recipe: RGB PSNR gain .*? \| (\S+) / (\S+) / (\S+) / (\S+) dB", text).groups()
    assert gains == tuple(cell(f"final gain q{q}, guard") for q in (10, 20, 40, 90))
    assert (f"| {cell('images to q10 gain +0.5 dB')} ({cell('minutes to q10 gain +0.5 dB')}) / "
            f"{cell('images to q10 gain +1 dB')} ({cell('minutes to q10 gain +1 dB')} min) |") in text


def test_design_extending_names_files_and_tests_that_exist():
    """docs/DESIGN.md's Extending section (what to touch to add a metric, an encoder, a loss term, a config key):
    every file it names exists, every test it names is in a test file its item names, and the loss-term item
    names the files config/checks.py's loss_weights and a new w_* key need."""
    text = (ROOT / "docs" / "DESIGN.md").read_text()
    section = text.split("## Extending", 1)[1].split("\n## ", 1)[0]
    items = [" ".join(i.split()) for i in section.split("\n- ")[1:]]
    assert [i.split(":", 1)[0] for i in items] == ["A metric", "An encoder", "A loss term", "A config key"]
    for item in items:
        names = re.findall(r"`([^`]+)`", item)
        files = [n for n in names if re.fullmatch(r"[\w/]+\.(py|md)", n)]
        assert files and all((ROOT / f).is_file() for f in files), (item[:20], files)
        tests = [n for n in names if n.startswith("test_")]
        sources = "".join((ROOT / f).read_text() for f in files if f.startswith("tests/"))
        assert all(f"def {t}(" in sources for t in tests), (item[:20], tests)
    assert {"dist_dejpeg/config/schema.py", "dist_dejpeg/train/steps.py", "dist_dejpeg/train/trainer.py"} <= set(
        re.findall(r"`([^`]+)`", items[2]))
