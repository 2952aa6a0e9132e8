"""Typed config: YAML + overrides, and one-line errors that name the key."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass, field
from typing import Literal, Optional

import pytest

from dirl.config import (
    ConfigError, DecodingConfig, ModelConfig, OptimConfig, check_block_sizes, check_decoding, check_model,
    load_config, save_config,
)


@dataclass
class Job:
    model: ModelConfig = field(default_factory=ModelConfig)
    decoding: DecodingConfig = field(default_factory=DecodingConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    steps: int = 10
    name: str = "run"

    def validate(self):
        check_model(self.model)
        check_decoding(self.decoding)
        check_block_sizes(self.model, self.decoding)


def write(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


def one_line(e):
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_yaml_and_overrides(tmp_path):
    p = write(tmp_path, "steps: 3\noptim:\n  lr: 1.0e-4\ndecoding:\n  top_k: 50\n")
    cfg = load_config(Job, p, ["optim.lr=2e-5", "decoding.unmasking_strategy=sequential", "optim.betas=[0.9,0.95]"])
    assert cfg.steps == 3 and cfg.optim.lr == 2e-5 and cfg.decoding.top_k == 50
    assert cfg.decoding.unmasking_strategy == "sequential" and cfg.optim.betas == (0.9, 0.95)
    save_config(cfg, tmp_path / "resolved.yaml")
    again = load_config(Job, tmp_path / "resolved.yaml")
    assert again == cfg


@pytest.mark.parametrize(
    "text, overrides, match",
    [
        ("stepz: 3\n", [], "unknown config key 'stepz'"),
        ("optim:\n  learning_rate: 1\n", [], "unknown config key 'optim.learning_rate'"),
        ("", ["steps=ten"], "config key 'steps': expected int"),
        ("", ["optim.lr=fast"], "config key 'optim.lr': expected float"),
        ("", ["decoding.unmasking_strategy=random"], "config key 'decoding.unmasking_strategy': expected one of"),
        ("", ["model.path=/no/such/folder"], "config key 'model.path': path '/no/such/folder' does not exist"),
        ("", ["decoding.top_p=1.5"], "config key 'decoding.top_p'"),
        ("", ["decoding.block_size=8"], "config key 'decoding.block_size': 8 disagrees"),
        ("", ["steps"], "not of the form key.sub=value"),
        ("optim: 3\n", [], "config key 'optim': expected a mapping"),
        ("steps: [1\n", [], "is not valid YAML"),
        ("", ["optim.lr=nan"], "config key 'optim.lr': expected a finite number"),
        ("", ["decoding.top_k=-5"], "config key 'decoding.top_k': must be >= 0"),
        ("optim:\n  lr: .inf\n", [], "config key 'optim.lr': expected a finite number"),
    ],
)
def test_bad_configs_name_the_key(tmp_path, text, overrides, match):
    with pytest.raises(ConfigError) as e:
        load_config(Job, write(tmp_path, text), overrides)
    assert match in one_line(e)


@dataclass
class Sec:
    mode: Literal["auto", "no", "bf16"] = "auto"
    note: Optional[str] = None


@dataclass
class Typed:
    weights: dict[str, float] = field(default_factory=lambda: {"accuracy": 1.0})
    sec: Sec = field(default_factory=Sec)
    name: str = "run"
    template: str = "{question}"
    steps: int = 10


def test_values_are_read_for_their_field_type(tmp_path):
    """A text field keeps an override's text as written (YAML would read 0012 as the octal 10, and
    "Q: {question}" as a mapping); a quoted text is a YAML string; a mapping given for a dict field
    replaces the default mapping, a dotted key sets one entry; YAML's unquoted no is the choice no."""
    cfg = load_config(Typed, None, ["name=0012", "template=Q: {question}", "sec.note=exp #3"], run_defaults=True)
    assert (cfg.name, cfg.template, cfg.sec.note) == ("0012", "Q: {question}", "exp #3")
    cfg = load_config(Typed, None, ['template="a\\n{question}"', "sec.note=null", "name=", "steps=0012"])
    assert (cfg.template, cfg.sec.note, cfg.name, cfg.steps) == ("a\n{question}", None, "", 12)
    for how in (["weights={cosine: 1.0}"], []):
        path = write(tmp_path, "weights: {cosine: 1.0}\n") if not how else None
        assert load_config(Typed, path, how, run_defaults=True).weights == {"cosine": 1.0}
    cfg = load_config(Typed, None, ["weights.speed=0.2"], run_defaults=True)
    assert cfg.weights == {"accuracy": 1.0, "speed": 0.2}
    # a section given as a mapping still merges into the section
    cfg = load_config(Typed, write(tmp_path, "sec: {mode: no}\n"), ["sec={note: x}"], run_defaults=True)
    assert (cfg.sec.mode, cfg.sec.note) == ("no", "x")
    assert load_config(Typed, None, ["sec.mode=no"]).sec.mode == "no"
    with pytest.raises(ConfigError, match="expected one of"):
        load_config(Typed, None, ["sec.mode=yes"])


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(Job, tmp_path / "nope.yaml")


def test_block_size_against_checkpoint(tiny_dir):
    cfg = load_config(Job, None, [f"model.path={tiny_dir}", "decoding.block_size=4"])
    assert cfg.decoding.block_size == 4
    with pytest.raises(ConfigError) as e:
        load_config(Job, None, [f"model.path={tiny_dir}", "decoding.block_size=8"])
    assert "decoding.block_size" in one_line(e)
    with pytest.raises(ConfigError) as e:
        load_config(Job, None, [f"model.path={tiny_dir}", "model.block_size=2"])
    assert "model.block_size" in one_line(e)


def test_cli_prints_one_line_and_exits_2(tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "dirl.cli", "make-tiny-model", "--out", str(tmp_path / "m"), "hiden_size=3"],
        capture_output=True, text=True,
    )
    assert r.returncode == 2
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert lines == [lines[0]] and "unknown config key 'hiden_size'" in lines[0]
    assert "Traceback" not in r.stderr


def test_cli_help_and_unknown_command():
    r = subprocess.run([sys.executable, "-m", "dirl.cli"], capture_output=True, text=True)
    assert r.returncode == 0 and "make-tiny-model" in r.stdout and "serve" in r.stdout
    r = subprocess.run([sys.executable, "-m", "dirl.cli", "frobnicate"], capture_output=True, text=True)
    assert r.returncode == 2 and "unknown command 'frobnicate'" in r.stderr


def test_cli_make_tiny_model(tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "dirl.cli", "make-tiny-model", "--out", str(tmp_path / "m"), "seed=2", "hidden_size=64"],
        capture_output=True, text=True,
    )
    assert r.returncode == 0, r.stderr
    from dirl.model.sdar import load_model

    m = load_model(tmp_path / "m")
    assert m.config.hidden_size == 64 and m.block_size == 4
    # a shape that is no model is refused before anything is written
    from dirl.model.tiny_cli import cli_main

    for bad, want in (("hidden_size=0", "config key 'hidden_size': must be > 0"),
                      ("num_key_value_heads=3", "config key 'num_attention_heads': 4 is not a multiple")):
        with pytest.raises(ConfigError, match=want):
            cli_main(["--out", str(tmp_path / "bad"), bad])
        assert not (tmp_path / "bad").exists()


def test_reading_and_checking_a_config_needs_no_torch(tiny_dir, tmp_path):
    """``import dirl.config`` and checking a model path (reading its config.json) load no torch."""
    import shutil

    run = tmp_path / "sft-x"  # a run folder: its newest complete checkpoint's model
    shutil.copytree(tiny_dir, run / "checkpoints" / "step_00000002" / "model")
    (run / "checkpoints" / "step_00000002" / "COMPLETE").write_text("")
    code = ("import sys; import dirl.config as c; "
            f"c.check_model(c.ModelConfig(path={str(tiny_dir)!r})); "
            f"c.check_model(c.ModelConfig(path={str(run)!r})); "
            "print(c.read_checkpoint_config({!r}).block_size, 'torch' in sys.modules)".format(str(tiny_dir)))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["4", "False"]


def test_a_renamed_key_names_its_new_name():
    from dirl.eval.run import EvalConfig

    with pytest.raises(ConfigError, match=r"^config key 'server.timeout' was renamed to 'server.timeout_s'$"):
        load_config(EvalConfig, None, ["server.timeout=5"])
    with pytest.raises(ConfigError, match="'server.startup_timeout' was renamed to 'server.startup_timeout_s'"):
        load_config(EvalConfig, None, ["server.startup_timeout=5"])


def test_the_config_key_reference_is_what_the_code_says():
    """docs/CONFIG_KEYS.md is generated from the config dataclasses; a field added, renamed, given
    another default or left without a comment shows here."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, str(root / "scripts" / "config_reference.py"), "--check"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    table = [ln.split(" | ") for ln in (root / "docs" / "CONFIG_KEYS.md").read_text().splitlines()
             if ln.startswith("| `")]
    assert len(table) > 150
    assert not [row[0] for row in table if "(undocumented)" in row[-1]], "keys without a meaning"
    from dirl.train.sft import SFTConfig, load_sft_config

    keys = {row[0].strip("| `") for row in table}
    assert {"train.max_steps", "dist.zero_stage", "rollout.decoding.confidence_threshold", "hidden_size"} <= keys
    default = SFTConfig()
    default.validate()  # resolves what the defaults leave open (data.num_samples for the source)
    assert load_sft_config(None, []) == default  # the defaults the reference shows are the command's
