"""load_config / validate / to_dict-from_dict and the ``train --dry-run`` CLI path."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import yaml

from dist_dejpeg import cli
from dist_dejpeg.config import Config, ConfigError, from_dict, load_config, to_dict, to_yaml

ROOT = Path(__file__).resolve().parents[1]
DEBUG_YAML = ROOT / "configs" / "debug.yaml"


def test_defaults_load():
    cfg = load_config()
    assert isinstance(cfg, Config)
    assert cfg.data.batch_size == 16
    assert cfg.data.crop == 256
    assert cfg.train.order == ["gen", "critic", "gan"]
    assert set(cfg.train.phases) == {"gen", "critic", "gan"}
    assert {name: p.kind for name, p in cfg.train.phases.items()} == {"gen": "gen", "critic": "critic", "gan": "gan"}


def test_yaml_file_then_overrides(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump({
        "data": {"crop": 64, "batch_size": 8},
        "train": {"run_dir": "runs/x", "phases": {"gen": {"steps": 10, "lr": 0.5}}},
    }))
    cfg = load_config(path, ["data.batch_size=3", "train.phases.gen.steps=5"])
    assert cfg.data.batch_size == 3  # override beats the file
    assert cfg.data.crop == 64  # file beats the default
    assert cfg.train.run_dir == "runs/x"
    gen = cfg.train.phases["gen"]
    assert gen.steps == 5 and gen.lr == 0.5 and gen.kind == "gen"
    # phases the file did not touch keep their per-phase defaults (merged, not replaced)
    assert cfg.train.phases["critic"].lr == pytest.approx(1e-4)
    assert cfg.train.phases["gan"].betas == [0.0, 0.9]
    assert cfg.data.quality_max == 95


def test_overrides_without_file():
    cfg = load_config(None, ["data.batch_size=3", "train.phases.gen.steps=5", "data.val_qualities=[15,30]"])
    assert cfg.data.batch_size == 3
    assert cfg.train.phases["gen"].steps == 5
    assert cfg.data.val_qualities == [15, 30]


def test_a_list_where_sections_are_is_an_error_naming_the_key(tmp_path):
    """`train.phases=[gan]` (meant for train.order) raised omegaconf's TypeError "Cannot merge incompatible
    container types" as a traceback; a file giving a list for a section likewise."""
    with pytest.raises(ConfigError, match=r"config key 'train.phases': `train.phases=\[gan\]` gives a list or a "
                                          r"value where the config holds sections of keys.*; the phases' order is "
                                          r"train.order$"):
        load_config(None, ["train.phases=[gan]"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  phases: [gen, gan]\n")
    with pytest.raises(ConfigError, match=f"config file {bad}: it gives a list or a value"):
        load_config(bad, [])


def test_load_does_not_mutate_overrides():
    overrides = ["data.batch_size=3"]
    load_config(None, overrides)
    assert overrides == ["data.batch_size=3"]


@pytest.mark.parametrize("override, key", [
    ("bogus=1", "bogus"),
    ("data.bogus=1", "data.bogus"),
    ("train.phases.gen.bogus=1", "train.phases.gen.bogus"),
    ("model.not_a_field=true", "model.not_a_field"),
])
def test_unknown_key_is_error_naming_it(override, key):
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    assert f"'{key}'" in str(info.value)
    # and where the keys are declared (`Key 'w_fft' not in 'PhaseConfig'` named no file)
    assert str(info.value).endswith("(keys are declared in dist_dejpeg/config/schema.py; docs/CONFIG.md lists them)")


@pytest.mark.parametrize("override, where", [
    ("train.lr=1e-3", "'train.phases.<name>.lr'"),  # a phase's key at the train level
    ("model.batch_size=8", "'data.batch_size'"),
    ("train.phases.gan.crop=64", "'data.crop'"),
    ("data.batchsize=8", "'batch_size'"),  # a typo: OmegaConf's own suggestion, not a second one
])
def test_a_key_in_the_wrong_section_says_where_it_is(override, where):
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    assert str(info.value).count("id you mean") == 1 and where in str(info.value), str(info.value)
    with pytest.raises(ConfigError) as info:
        load_config(None, ["train.phases.gen.learning_rate=1"])  # nowhere: no suggestion
    assert "mean" not in str(info.value)


@pytest.mark.parametrize("override, key", [
    ("data.crop=abc", "data.crop"),
    ("train.phases.gen.steps=many", "train.phases.gen.steps"),
    ("model.pretrained=maybe", "model.pretrained"),
])
def test_wrong_type_is_error_naming_it(override, key):
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    assert key in str(info.value)


def test_a_list_key_given_one_value_says_it_takes_a_list():
    with pytest.raises(ConfigError, match=r"'data.val_qualities': expects a list, e.g. data.val_qualities=\[a,b\]"):
        load_config(None, ["data.val_qualities=10"])


def test_unknown_key_in_yaml_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("data:\n  crop: 64\n  bogus_key: 3\n")
    with pytest.raises(ConfigError, match=r"data\.bogus_key"):
        load_config(path)


def test_missing_file_and_malformed_override():
    with pytest.raises(ConfigError, match="not found"):
        load_config(ROOT / "configs" / "does_not_exist.yaml")
    with pytest.raises(ConfigError, match="data.batch_size"):
        load_config(None, ["data.batch_size"])


@pytest.mark.parametrize("text, words", [
    (b"data:\n  batch_size: [1\n", r"not valid YAML: did not find expected ',' or '\]' at line 3, column 1"),
    (b"data:\n\tbatch_size: 3\n", r"not valid YAML: .* at line 2, column 1"),  # a tab
    (b"- data\n- train\n", r"holds a list, not sections of keys"),
    (b"3\n", r"cannot be read as a YAML config"),
    (b"hello\n", r"holds the text 'hello', not sections of keys"),
    (b"data:\n  crop: 64\ntrain: 3\n", r"train: is 3, not a section of keys"),
    (b"\x89PNG\r\n\x1a\n\xd0\xff", r"cannot be read as a YAML config \('utf-8' codec"),
])
def test_a_config_file_that_is_not_a_yaml_mapping_is_one_line(tmp_path, text, words):
    """A YAML syntax error, a list, a number or a binary file given as --config: a ConfigError naming the file
    (the CLI's exit 2 and one line), not the parser's traceback (exit 1)."""
    path = tmp_path / "experiment.yaml"
    path.write_bytes(text)
    with pytest.raises(ConfigError, match=rf"^config file {re.escape(str(path))}: {words}") as caught:
        load_config(path)
    assert "\n" not in str(caught.value)


def test_a_section_with_every_key_commented_out_is_its_defaults(tmp_path):
    (path := tmp_path / "experiment.yaml").write_text("data:\n  crop: 64\ntrain:\n  # seed: 3\n")
    cfg = load_config(path)
    assert cfg.data.crop == 64 and cfg.train.seed == Config().train.seed


def test_phase_typo_not_in_order_is_error():
    with pytest.raises(ConfigError) as info:
        load_config(None, ["train.phases.gne.steps=3"])
    assert "gne" in str(info.value)


def test_order_naming_undefined_phase_is_error():
    with pytest.raises(ConfigError, match="nope"):
        load_config(None, ["train.order=[gen,nope]"])


def test_kind_inferred_from_name():
    cfg = load_config(None, ["train.phases.gen.kind=''", "train.phases.critic.kind=''"])
    assert cfg.train.phases["gen"].kind == "gen"
    assert cfg.train.phases["critic"].kind == "critic"


def test_kind_inferred_from_name_in_yaml(tmp_path):
    path = tmp_path / "phases.yaml"
    path.write_text("train:\n  phases:\n    gan:\n      kind: ''\n      steps: 4\n")
    cfg = load_config(path)
    assert cfg.train.phases["gan"].kind == "gan"
    assert cfg.train.phases["gan"].steps == 4


def test_a_phase_named_final_is_refused():
    """Its in-phase validations were logged under the final validation's TensorBoard tags (final/qN_*) and image
    name, two sets of numbers on one curve."""
    with pytest.raises(ConfigError, match=r"'train\.order': a phase cannot be named 'final'"):
        load_config(None, ["train.phases.final.kind=gan", "train.phases.final.steps=3", "train.order=[gen,final]"])


def test_custom_phase_needs_kind():
    with pytest.raises(ConfigError, match=r"train\.phases\.mygen\.kind"):
        load_config(None, ["train.phases.mygen.steps=3", "train.order=[gen,mygen]"])
    cfg = load_config(None, ["train.phases.mygen.kind=gen", "train.phases.mygen.steps=3", "train.order=[gen,mygen]"])
    assert cfg.train.phases["mygen"].kind == "gen"
    assert cfg.train.phases["mygen"].steps == 3


@pytest.mark.parametrize("override, key", [
    ("train.mixed_precision=fp8", "train.mixed_precision"),
    ("data.backend=x", "data.backend"),
    ("loss.lpips_net=resnet", "loss.lpips_net"),
    ("loss.adversarial=wgan", "loss.adversarial"),
    ("loss.pixel=l2", "loss.pixel"),
    ("train.phases.gen.schedule=linear", "train.phases.gen.schedule"),
    ("train.phases.gen.kind=dis", "train.phases.gen.kind"),
])
def test_invalid_enum_is_error_naming_key(override, key):
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    assert key in str(info.value)


def test_quality_min_above_max_is_error():
    with pytest.raises(ConfigError, match="quality_min"):
        load_config(None, ["data.quality_min=60", "data.quality_max=50"])
    # the boundary (min == max) is fine
    cfg = load_config(None, ["data.quality_min=50", "data.quality_max=50"])
    assert cfg.data.quality_min == cfg.data.quality_max == 50


@pytest.mark.parametrize("override, key", [
    ("data.crop=60", "data.crop"),
    ("data.batch_size=0", "data.batch_size"),
    ("data.val_qualities=[10,101]", "data.val_qualities"),
    ("train.grad_accum=0", "train.grad_accum"),
    ("data.quality_power=-0.5", "data.quality_power"),
    ("data.channel_shuffle=1.5", "data.channel_shuffle"),
    ("data.quality_power=4.5", "data.quality_power"),
    ("data.quality_power=nan", "data.quality_power"),
    ("data.quality_power=inf", "data.quality_power"),
    ("data.val_qualities=[]", "data.val_qualities"),  # (crashed at the first gan validation)
    ("train.log_every=0", "train.log_every"),  # (a modulo by zero at the first step)
    ("train.keep_last=-1", "train.keep_last"),
    ("data.shuffle_buffer=-1", "data.shuffle_buffer"),
    ("data.num_workers=-2", "data.num_workers"),
    ("data.val_max_images=-1", "data.val_max_images"),
    ("data.max_bad_samples=-2", "data.max_bad_samples"),
    ("data.val_qualities=[10,20", "data.val_qualities"),  # (a YAML ParserError traceback)
    ("train.order=[gen,gan,gan]", "train.order"),  # (the step totals and status counted the phase once)
    ("model.decoder_width=0", "model.decoder_width': must be >= 1, got 0"),  # (torch's RuntimeError at build)
    ("critic.width=0", "critic.width': must be >= 1, got 0"),
    ("critic.n_blocks=-1", "critic.n_blocks': must be >= 0, got -1"),
])
def test_other_range_checks(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, [override])


@pytest.mark.parametrize("override, words", [
    ("train.phases.gan.lr=-1e-5", r"gan\.lr': must be a finite number > 0, got -1e-05"),  # (the loss climbed)
    ("train.phases.gen.lr=nan", r"gen\.lr': must be a finite number > 0, got nan"),
    ("train.phases.gan.critic_lr_mult=0", r"gan\.critic_lr_mult': must be a finite number > 0"),
    ("train.phases.gen.warmup=2", r"gen\.warmup': must be a share of the phase's steps in \[0, 1\), got 2"),
    ("train.phases.gen.w_pixel=-1", r"gen\.w_pixel': must be a finite number >= 0, got -1"),
    ("train.phases.gan.w_adv=inf", r"gan\.w_adv': must be a finite number >= 0, got inf"),
    ("train.phases.gen.weight_decay=-0.1", r"gen\.weight_decay'"),
    ("train.phases.gen.max_grad_norm=-1", r"gen\.max_grad_norm'"),
    ("train.phases.gan.betas=[0.5,1.5]", r"gan\.betas': Adam's betas must each be in \[0, 1\)"),
    ("train.phases.gan.critic_iters=-1", r"gan\.critic_iters': must be >= 0, got -1"),  # (every turn the gen's)
    ("train.phases.gan.patience=-2", r"gan\.patience': must be >= 0"),
    ("train.phases.gen.val_every=-5", r"gen\.val_every': must be >= 0"),
    ("train.ckpt_every=-5", r"ckpt_every': must be >= 0 \(steps; 0: off\), got -5"),
    ("train.val_every=-1", r"val_every'"),
    ("train.image_every=-1", r"image_every'"),
])
def test_phase_numbers_training_would_misuse_are_refused(override, words):
    """A negative lr, a warmup of 2, a negative count or weight: each was taken without a word (the loss climbed,
    the peak lr was never reached, a rule ran backwards); now a ConfigError naming the key and the range."""
    with pytest.raises(ConfigError, match=r"^config key 'train\.(phases\.)?" + words):
        load_config(None, [override])
    load_config(None, ["train.phases.gen.warmup=0.99", "train.phases.gan.critic_iters=0", "train.ckpt_every=0",
                       "train.phases.critic.w_pixel=0", "train.phases.gan.betas=[0,0.999]"])  # the edges are fine


def test_a_conditioned_model_that_never_sees_a_quality_is_refused():
    """quality_blind_prob=1 with conditioning: the quality embedding would get no gradient, yet validation, the
    guard's gains and restore all tell the model each quality (a path never trained); blind is its own setting."""
    with pytest.raises(ConfigError, match=r"model\.quality_blind_prob': 1 hides every.*quality_conditioning=false"):
        load_config(None, ["model.quality_conditioning=true", "model.quality_blind_prob=1"])
    assert load_config(None, ["model.quality_blind_prob=1"]).model.quality_blind_prob == 1  # (not conditioned)
    assert load_config(None, ["model.quality_conditioning=true", "model.quality_blind_prob=0.99"]).model.quality_conditioning


def test_debug_yaml_loads():
    """Every value written in configs/debug.yaml arrives in the typed config."""
    from omegaconf import OmegaConf

    cfg = load_config(DEBUG_YAML)
    written = OmegaConf.to_container(OmegaConf.load(DEBUG_YAML))
    loaded = to_dict(cfg)

    def check(tree, into, path):
        for key, value in tree.items():
            if isinstance(value, dict):
                check(value, into[key], f"{path}{key}.")
            else:
                assert into[key] == value, f"{path}{key}"

    check(written, loaded, "")
    assert cfg.model.pretrained is False and cfg.loss.lpips_pretrained is False  # offline-safe
    assert cfg.train.mixed_precision == "no"  # the quoted "no" survives YAML
    assert all(p.kind == name for name, p in cfg.train.phases.items())


@pytest.mark.parametrize("overrides", [
    [],
    ["train.phases.mygen.kind=gen", "train.phases.mygen.steps=7", "train.order=[gen,mygen,gan]"],
])
def test_dict_round_trip(overrides):
    cfg = load_config(DEBUG_YAML, overrides)
    data = to_dict(cfg)
    snapshot = copy.deepcopy(data)
    again = from_dict(data)
    assert again == cfg
    assert data == snapshot  # from_dict does not mutate its input


def test_recipe_knobs_default_off_and_load():
    """data.quality_power, data.rot90, data.channel_shuffle and loss.pixel are off by default and take their
    values."""
    cfg = load_config()
    assert (cfg.data.quality_power, cfg.data.rot90, cfg.data.channel_shuffle, cfg.loss.pixel) == (0.0, False, 0.0, "l1")
    cfg = load_config(None, ["data.quality_power=4", "data.rot90=true", "data.channel_shuffle=1", "loss.pixel=charbonnier"])
    assert (cfg.data.quality_power, cfg.data.rot90, cfg.data.channel_shuffle, cfg.loss.pixel) == (4.0, True, 1.0,
                                                                                                   "charbonnier")


def test_from_dict_is_strict():
    data = to_dict(load_config())
    data["data"]["bogus"] = 1
    with pytest.raises(ConfigError, match="bogus"):
        from_dict(data)


def test_yaml_round_trip(tmp_path):
    cfg = load_config(DEBUG_YAML, ["data.batch_size=5"])
    path = tmp_path / "dumped.yaml"
    path.write_text(to_yaml(cfg))
    assert load_config(path) == cfg


def test_cli_dry_run_prints_resolved_yaml(capsys):
    rc = cli.main(["train", "--config", str(DEBUG_YAML), "--dry-run", "data.batch_size=3"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "batch_size: 3" in out
    printed = yaml.safe_load(out)
    assert printed["data"]["batch_size"] == 3
    assert printed["data"]["crop"] == 64  # from the file


def test_cli_unknown_key_returns_2(capsys):
    rc = cli.main(["train", "--config", str(DEBUG_YAML), "--dry-run", "data.bogus=1"])
    captured = capsys.readouterr()
    assert rc == 2
    assert "data.bogus" in captured.err
    assert captured.out == ""


def test_generator_phase_without_any_loss_is_an_error():
    with pytest.raises(ConfigError, match=r"train\.phases\.gen\.w_lpips/w_pixel': the generator needs a loss"):
        load_config(None, ["train.phases.gen.w_pixel=0", "train.phases.gen.w_lpips=0"])
    # the gan phase may train on the adversarial term alone
    load_config(None, ["train.phases.gan.w_pixel=0", "train.phases.gan.w_lpips=0"])


def test_a_new_loss_weight_is_checked_without_an_edit():
    """Adding a loss term's w_* key to PhaseConfig needed two hand-kept lists in config/checks.py (the weights that
    must be >= 0, and the generator-needs-a-loss rule): both read every w_* field now."""
    import dataclasses

    from dist_dejpeg.config import checks
    from dist_dejpeg.config.schema import PhaseConfig

    @dataclasses.dataclass
    class WithFft(PhaseConfig):
        w_fft: float = 0.0

    assert checks.loss_weights(WithFft())[-1] == "w_fft" and set(checks.loss_weights(PhaseConfig())) >= {
        "w_lpips", "w_pixel", "w_adv"}
    with pytest.raises(ConfigError, match=r"^config key 'train\.phases\.gen\.w_fft': must be a finite number >= 0"):
        checks._phase_numbers("gen", WithFft(kind="gen", w_fft=-1.0))
    checks._generator_loss("gen", WithFft(kind="gen", w_pixel=0.0, w_lpips=0.0, w_fft=0.5))  # the new term alone
    with pytest.raises(ConfigError, match=r"gen\.w_lpips/w_pixel/w_fft': the generator needs a loss"):
        checks._generator_loss("gen", WithFft(kind="gen", w_pixel=0.0, w_lpips=0.0))


def test_div2k_recipe_loads_and_names_the_seed_settings():
    cfg = load_config(Path(__file__).parents[1] / "configs" / "div2k.yaml")
    assert cfg.model.encoder.startswith("mobilenetv3") and cfg.model.pretrained
    assert cfg.loss.lpips_net == "vgg" and cfg.train.phases["gan"].betas == [0.0, 0.9]
    assert (cfg.train.phases["gan"].critic_iters, cfg.train.phases["gan"].gen_iters) == (5, 2)
    assert cfg.data.val_qualities == [10, 20, 30, 40, 60, 80, 90]


@pytest.mark.parametrize("depth", [1, -1])
def test_an_encoder_depth_without_a_u_net_is_a_config_error(depth):
    """One stage has no skip to join (and -1 no stage): refused with the key at load, not at build."""
    with pytest.raises(ConfigError, match=rf"'model.encoder_depth': must be 0 \(all stages\) or at least 2, got {depth}"):
        load_config(None, [f"model.encoder_depth={depth}"])


def test_an_override_value_starting_with_a_yaml_indicator_is_the_text_itself():
    """data.train_glob=*.tar was a YAML alias (a ScannerError traceback); &x an anchor (the value silently None)."""
    cfg = load_config(None, ["data.train_glob=*.tar", "data.val_glob=&val*.tar", "train.run_dir=@runs/x"])
    assert (cfg.data.train_glob, cfg.data.val_glob, cfg.train.run_dir) == ("*.tar", "&val*.tar", "@runs/x")
    assert load_config(None, ['data.train_glob="*.tar"']).data.train_glob == "*.tar"  # quoted, as before
    # key= (what a shell makes of key=''): the empty text, not None ("Incompatible value 'None'")
    assert load_config(None, ["train.compile_cache="]).train.compile_cache == ""


def test_cli_config_file_error_is_one_line_and_exit_2(tmp_path, capsys):
    """A YAML typo in an experiment's file: exit 2 and one line naming the file and the place, no traceback."""
    path = tmp_path / "exp.yaml"
    path.write_text("train:\n  phases:\n    gan: {lr: 1e-5\n")
    assert cli.main(["train", "--config", str(path), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: config file {path}: not valid YAML") and "line 4" in err and err.count("\n") == 1


def test_cli_get_suggests_the_key_meant(capsys):
    """--get with a typo (as scripts call it): exit 2 and the keys spelled alike, or where that name lives."""
    for key, meant in (("data.batch_sise", "'data.batch_size'"), ("train.phases.gna.lr", "'train.phases.gan.lr'"),
                       ("lr", "'train.phases.<name>.lr'"), ("trian", "'train'")):
        assert cli.main(["train", "--config", str(DEBUG_YAML), "--get", key]) == 2
        captured = capsys.readouterr()
        assert captured.err.startswith(f"error: no config key '{key}'. Did you mean ") and meant in captured.err, key
        assert captured.out == ""
    assert cli.main(["train", "--get", "data.val_qualities[1]", "data.val_qualities=[10,30]"]) == 0
    assert capsys.readouterr().out == "30\n"
    # an empty key (`--get "$KEY"`, KEY unset) is a missing key, not no --get: that started a whole training
    assert cli.main(["train", "--config", str(DEBUG_YAML), "--get", ""]) == 2
    assert capsys.readouterr().err.startswith("error: no config key ''")


def test_paths_seeds_and_overrides_quoted_together_are_refused_by_key(tmp_path, capsys):
    """train.run_dir empty (an unset shell variable: the run went into the current folder) or the filesystem's
    root, a run_dir or data.root that is a file (mkdir tracebacks from both ranks), a seed past what each rank's
    seed + its index can take (a ValueError on one rank, a hang-up on the other), several overrides in one
    argument ("$OVERRIDES": data.root became the whole text and the run resumed another folder)."""
    (tmp_path / "afile").write_text("x")
    for override, says in (("train.run_dir=", "'' is no run folder (empty: an unset shell variable?)"),
                           ("train.run_dir=/", "'/' is no run folder (the filesystem's root)"),
                           (f"train.run_dir={tmp_path / 'afile'}", "is a file, not a folder"),
                           (f"data.root={tmp_path / 'afile'}", "is a file, not a folder"),
                           ("train.seed=-1", "must be in [0, 2**31)"), ("train.seed=4294967295", "must be in [0, 2**31)"),
                           ("data.root=shards data.auto_prepare=none", "holds another override (data.auto_prepare=none)"),
                           ("data.crop=32", "below the critic's minimum 64 px")):  # (the dry run passed it)
        assert cli.main(["train", "--config", str(DEBUG_YAML), override, "--dry-run"]) == 2, override
        err = capsys.readouterr().err
        assert err.startswith("error: config key '") and says in err and err.count("\n") == 1, (override, err)
    assert cli.main(["train", "--config", str(DEBUG_YAML), "train.run_dir=my runs/a b", "--dry-run"]) == 0
    capsys.readouterr()
    assert cli.main(["train", "--config", str(tmp_path), "--dry-run"]) == 2  # (said "config file not found")
    assert f"error: config file {tmp_path} is a folder" in capsys.readouterr().err


@pytest.mark.parametrize("overrides, words", [
    (["train.order=[gen,critic]"], ["phase 'critic' trains the critic, but no gan phase with steps runs after it"]),
    (["train.order=[gan,gen]"], ["phase 'gan' starts from an untrained generator"]),
    (["train.phases.gen.steps=0"], ["phase 'gan' starts from an untrained generator"]),  # (0 steps: absent)
    (["train.phases.gen.steps=0", "train.phases.critic.steps=0", "train.phases.gan.steps=0"],
     ["every phase of train.order ['gen', 'critic', 'gan'] has 0 steps"]),
    (["train.order=[critic,gan]", "model.init_from=runs/old"], []),  # fine-tuning a trained generator
    (["train.order=[gen]"], []),  # (the config file's critic and gan settings: its recipe, cut on purpose)
    ([], []),
    (["train.order=[gen,gan]", "train.phases.critic.lr=1e-3", "train.phases.gen.lr=1e-3"],  # (silently unused)
     ["config key 'train.phases.critic.lr' is set, but phase 'critic' is not in train.order ['gen', 'gan']"]),
    (["train.order=[gen]", "train.phases.gan={lr: 0.1, steps: 5}"],
     ["config keys 'train.phases.gan.lr', 'train.phases.gan.steps' are set, but phase 'gan' is not in train.order"]),
])
def test_phase_orders_that_waste_a_run_are_warned_of(capsys, monkeypatch, overrides, words):
    """Orders the config accepts (tests and ablations use them) but where a real run's steps go nowhere: a
    warning on stderr when the command starts (--dry-run shows it), the config still loads."""
    from dist_dejpeg.train import init_from

    monkeypatch.setattr(init_from, "init_from_config", lambda model: model)  # (runs/old: a trained run's config)
    assert cli.main(["train", "--config", str(DEBUG_YAML), "--dry-run", *overrides]) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == len(words) and all(w in line for w, line in zip(words, warnings)), warnings


@pytest.mark.parametrize("overrides, words", [
    (["data.val_crop=24"], r"'data.val_crop': 24 px is below the 31 px a side that LPIPS-alex \(loss.metric_net\)"),
    (["data.crop=8", "train.phases.gen.w_lpips=1"], r"'data.crop': 8 px is below the 16 px a side that LPIPS-vgg"),
    (["loss.lpips_pretrained=false", "loss.metric_weights=alex.pth"],  # (the file was ignored: a random LPIPS)
     r"'loss.metric_weights': a backbone file is given, but loss.lpips_pretrained is false"),
])
def test_lpips_settings_that_cannot_work_are_refused_when_the_config_loads(overrides, words):
    """LPIPS's pooling leaves nothing of a small crop: it failed inside the network (a validation crop at the first
    validation, possibly hours in) with torch's words about channels."""
    with pytest.raises(ConfigError, match=words):
        load_config(None, overrides)
    load_config(None, ["data.crop=8", "train.phases.gen.w_lpips=0", "train.order=[gen]"])  # no LPIPS loss, no critic
