"""Presets, overrides and the errors a user sees for bad configuration."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from archipelago import config as cfglib
from archipelago.config import ConfigError


@dataclass
class Inner:
    num_layers: int = 2
    lr: float = 1e-3
    name: str = "x"
    flag: bool = False
    dims: list[int] = field(default_factory=lambda: [1, 2])


@dataclass
class Outer:
    required: int
    inner: Inner = field(default_factory=Inner)


def test_build_fills_nested_dataclasses_and_coerces_ints_to_floats():
    cfg = cfglib.build(Outer, {"required": 3, "inner": {"lr": 1, "dims": [4]}})
    assert cfg.required == 3 and cfg.inner.lr == 1.0 and isinstance(cfg.inner.lr, float)
    assert cfg.inner.dims == [4] and cfg.inner.num_layers == 2


@pytest.mark.parametrize("table,message", [
    ({"required": 1, "inner": {"num_layerz": 2}}, "unknown config key 'inner.num_layerz'"),
    ({"required": 1, "inner": {"num_layers": "four"}}, "'inner.num_layers' must be an integer"),
    ({"required": 1, "inner": {"num_layers": 2.5}}, "'inner.num_layers' must be an integer"),
    ({"required": 1, "inner": {"flag": 1}}, "'inner.flag' must be true or false"),
    ({"required": 1, "inner": {"lr": "fast"}}, "'inner.lr' must be a number"),
    ({"required": 1, "inner": 5}, "'inner' must be a table"),
    ({}, "'required' is required"),
])
def test_bad_tables_name_the_field(table, message):
    with pytest.raises(ConfigError) as info:
        cfglib.build(Outer, table)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_overrides_parse_toml_literals_and_bare_words():
    table = cfglib.apply_overrides({"inner": {}}, ["inner.num_layers=4", "inner.lr=3e-4",
                                                   "inner.flag=true", "inner.name=hello",
                                                   "inner.dims=[7, 8]", "required=1"])
    cfg = cfglib.build(Outer, table)
    assert (cfg.inner.num_layers, cfg.inner.lr, cfg.inner.flag, cfg.inner.name, cfg.inner.dims) == (
        4, 3e-4, True, "hello", [7, 8])


@pytest.mark.parametrize("text", ["nokey", "=3", "a..b=1"])
def test_malformed_overrides_are_refused(text):
    with pytest.raises(ConfigError):
        cfglib.apply_overrides({}, [text])


def test_presets_merge_over_their_base(tmp_path, monkeypatch):
    (tmp_path / "a.toml").write_text("[inner]\nnum_layers = 3\nlr = 0.5\n")
    (tmp_path / "b.toml").write_text('base = "a"\nrequired = 2\n[inner]\nlr = 0.25\n')
    (tmp_path / "loop.toml").write_text('base = "loop"\n')
    monkeypatch.setenv(cfglib.CONFIGS_DIR_ENV, str(tmp_path))
    cfg = cfglib.load(Outer, "b")
    assert cfg.inner.num_layers == 3 and cfg.inner.lr == 0.25 and cfg.required == 2
    with pytest.raises(ConfigError, match="includes itself"):
        cfglib.load_preset("loop")
    with pytest.raises(ConfigError, match="unknown preset 'nope'"):
        cfglib.load_preset("nope")


def test_load_drops_other_commands_tables_but_not_bad_overrides(tmp_path, monkeypatch):
    (tmp_path / "p.toml").write_text("required = 1\n[sim]\nislands = 3\n")
    monkeypatch.setenv(cfglib.CONFIGS_DIR_ENV, str(tmp_path))
    assert cfglib.load(Outer, "p").required == 1
    with pytest.raises(ConfigError, match="unknown config key 'sim'"):
        cfglib.load(Outer, "p", ["sim.islands=4"])


def test_config_hash_is_stable_and_sensitive():
    a = cfglib.build(Outer, {"required": 1})
    b = cfglib.build(Outer, {"required": 1})
    c = cfglib.build(Outer, {"required": 2})
    assert cfglib.config_hash(a) == cfglib.config_hash(b) != cfglib.config_hash(c)
