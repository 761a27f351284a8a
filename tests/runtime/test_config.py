"""Config from file, env override, CLI flags, unknown keys and bad values (pure)."""

from __future__ import annotations

import argparse
from pathlib import Path

import msgspec
import pytest

from carom_runtime import config
from carom_runtime.config import ConfigError, HttpSettings, PulsarSettings


class DemoSettings(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    pulsar: PulsarSettings = msgspec.field(default_factory=PulsarSettings)
    http: HttpSettings = msgspec.field(default_factory=HttpSettings)
    fps: float = 30.0
    hosts: list[str] = msgspec.field(default_factory=list)


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "demo.yaml"
    p.write_text(text)
    return p


def test_defaults_without_file() -> None:
    s = config.load(DemoSettings, "demo", env={})
    assert s.pulsar.url == "pulsar://127.0.0.1:6650"
    assert s.pulsar.topics.truth.endswith("carom-truth")


def test_file_then_env_then_flags(tmp_path: Path) -> None:
    path = write(tmp_path, "fps: 60\nhttp:\n  port: 9000\npulsar:\n  topics:\n    truth: t1\n")
    s = config.load(DemoSettings, "demo", path, env={})
    assert (s.fps, s.http.port, s.pulsar.topics.truth) == (60.0, 9000, "t1")

    env = {"CAROM_DEMO__HTTP__PORT": "9100", "CAROM_DEMO__HOSTS": '[10.0.0.1, "::1"]'}
    s = config.load(DemoSettings, "demo", path, env=env)
    assert s.http.port == 9100 and s.fps == 60.0 and s.hosts == ["10.0.0.1", "::1"]

    parser = argparse.ArgumentParser()
    config.add_flags(parser, DemoSettings)
    args = parser.parse_args(["--http-port", "9200", "--pulsar-topics-truth", "t3"])
    s = config.load(DemoSettings, "demo", path, env=env, args=args)
    assert (s.http.port, s.pulsar.topics.truth, s.fps) == (9200, "t3", 60.0)


class PortedSettings(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    http: HttpSettings = msgspec.field(default_factory=lambda: HttpSettings(port=8002))


def test_one_env_key_keeps_the_services_own_section_defaults(tmp_path: Path) -> None:
    # The tracker's http.port default is 8002, not HttpSettings' 8000: setting http.host alone
    # (env or flag, with or without a file) must not rebuild the section from the type's defaults.
    env = {"CAROM_PORTED__HTTP__HOST": "0.0.0.0"}
    s = config.load(PortedSettings, "ported", env=env)
    assert (s.http.host, s.http.port) == ("0.0.0.0", 8002)
    s = config.load(PortedSettings, "ported", write(tmp_path, "{}\n"), env=env)
    assert (s.http.host, s.http.port) == ("0.0.0.0", 8002)
    parser = argparse.ArgumentParser()
    config.add_flags(parser, PortedSettings)
    s = config.load(PortedSettings, "ported", env={}, args=parser.parse_args(["--http-host", "::"]))
    assert (s.http.host, s.http.port) == ("::", 8002)


def test_config_file_named_by_env_or_flag(tmp_path: Path) -> None:
    path = write(tmp_path, "fps: 24\n")
    assert config.load(DemoSettings, "demo", env={"CAROM_DEMO_CONFIG": str(path)}).fps == 24.0
    parser = argparse.ArgumentParser()
    config.add_flags(parser, DemoSettings)
    args = parser.parse_args(["--config", str(path)])
    assert config.load(DemoSettings, "demo", env={}, args=args).fps == 24.0


def test_unknown_key_in_file_is_named(tmp_path: Path) -> None:
    path = write(tmp_path, "http:\n  prot: 1\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'http.prot'"):
        config.load(DemoSettings, "demo", path, env={})


def test_unknown_env_key_is_named() -> None:
    with pytest.raises(ConfigError, match="CAROM_DEMO__HTTP__PROT"):
        config.load(DemoSettings, "demo", env={"CAROM_DEMO__HTTP__PROT": "1"})


def test_other_services_env_is_ignored() -> None:
    assert config.load(DemoSettings, "demo", env={"CAROM_ROUTER__X": "1"}).fps == 30.0


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("http:\n  port: many\n", "'http.port'"),
        ("http:\n  port: 70000\n", "'http.port'"),
        ("pulsar:\n  url: http://x\n", "'pulsar.url'"),
        ("fps: [1]\n", "'fps'"),
        ("- a\n- b\n", "mapping"),
        ("fps: 1\n  bad: indent\n", "not valid YAML"),
    ],
)
def test_bad_value_is_named(tmp_path: Path, text: str, needle: str) -> None:
    with pytest.raises(ConfigError) as info:
        config.load(DemoSettings, "demo", write(tmp_path, text), env={})
    assert needle in str(info.value)


def test_bad_env_value_is_named() -> None:
    with pytest.raises(ConfigError, match=r"'http\.port'"):
        config.load(DemoSettings, "demo", env={"CAROM_DEMO__HTTP__PORT": "eighty"})


def test_missing_file_is_reported(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config file"):
        config.load(DemoSettings, "demo", tmp_path / "nope.yaml", env={})


def test_env_var_and_flag_names() -> None:
    assert config.env_var("router", ("pulsar", "url")) == "CAROM_ROUTER__PULSAR__URL"
    assert config.flag(("pulsar", "admin_url")) == "--pulsar-admin-url"


def test_dump_round_trips(tmp_path: Path) -> None:
    s = config.load(DemoSettings, "demo", env={})
    path = write(tmp_path, config.dump(s))
    assert config.load(DemoSettings, "demo", path, env={}) == s
