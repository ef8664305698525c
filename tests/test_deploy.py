"""deploy/: the systemd unit (systemd-analyze verify), the example settings and env files, `config check`."""

from __future__ import annotations

import dataclasses
import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest

from daemon import cli
from daemon.settings import SECTIONS, TOP_LEVEL, Settings, load_settings

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
UNIT = DEPLOY / "patchd.service"
EXAMPLE = DEPLOY / "patchd.toml.example"
ENV_EXAMPLE = DEPLOY / "patchd.env.example"
README = DEPLOY / "README.md"


def unit_settings(text: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            out.setdefault(key.strip(), []).append(value.strip())
    return out


def verify(unit: Path) -> subprocess.CompletedProcess[str]:
    """`systemd-analyze verify` on a copy whose ExecStart is a binary that exists on this machine.

    verify checks that ExecStart's program is executable; /opt/patchd is where the README installs
    patchd, not where this checkout is. Everything else is verified as written.
    """
    exe = shutil.which("true")
    assert exe
    text = unit.read_text()
    assert "/opt/patchd/.venv/bin/patchd run --config" in text
    unit.write_text(text.replace("/opt/patchd/.venv/bin/patchd", exe))
    return subprocess.run(
        ["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60, check=False
    )


def test_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    copy = tmp_path / "patchd.service"
    shutil.copy(UNIT, copy)
    result = verify(copy)
    assert result.returncode == 0 and not result.stderr.strip(), result.stderr


def test_unit_is_a_notify_service_that_keeps_the_gpu_visible() -> None:
    s = unit_settings(UNIT.read_text())
    assert s["Type"] == ["notify"] and s["NotifyAccess"] == ["main"]
    assert int(s["WatchdogSec"][0]) >= 60 and s["Restart"] == ["on-failure"]
    assert int(s["TimeoutStopSec"][0]) >= 300  # longer than one edit (warm stop finishes it)
    assert s["User"] == ["patchd"] and "DynamicUser" not in s  # a static owner for shared storage
    assert s["EnvironmentFile"] == ["/etc/patchd/patchd.env"]
    writable = s["ReadWritePaths"][0].split()
    env = dict(e.split("=", 1) for e in s["Environment"])
    for path in (env["PATCHD_STATE_DIR"], env["PATCHD_STORAGE_ROOT"]):  # state and storage are writable
        assert any(path == w or path.startswith(w + "/") for w in writable), path
    assert s["ProtectSystem"] == ["strict"] and s["NoNewPrivileges"] == ["yes"]
    for hides_gpu in ("PrivateDevices", "DevicePolicy", "DeviceAllow", "ProtectClock"):
        assert hides_gpu not in s, f"{hides_gpu} would hide /dev/nvidia*"


def test_readme_template_for_several_models_also_verifies(tmp_path: Path) -> None:
    """deploy/README.md turns the unit into patchd@.service with one sed; that result must verify too."""
    command = re.search(r"^sed (-e .*?) deploy/patchd\.service", README.read_text(), re.M | re.S)
    assert command, "the README's sed command for patchd@.service"
    args = re.findall(r"-e '([^']*)'", command.group(1))
    template = tmp_path / "patchd@.service"
    template.write_text(
        subprocess.run(
            ["sed", *sum([["-e", a] for a in args], [])],
            input=UNIT.read_text(),
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    )
    s = unit_settings(template.read_text())
    assert s["ExecStart"][0].endswith("--config /etc/patchd/%i.toml")
    assert "PATCHD_STATE_DIR=/var/lib/patchd/%i" in s["Environment"] and s["StateDirectory"] == ["patchd/%i"]
    instance = tmp_path / "patchd@tiny.service"
    instance.symlink_to(template)
    result = verify(instance)
    assert result.returncode == 0 and not result.stderr.strip(), result.stderr


def example_keys(text: str) -> dict[str, dict[str, bool]]:
    """section -> key -> active (False: shown commented out) for every `key = ...` line."""
    keys: dict[str, dict[str, bool]] = {"": {}}
    section = ""
    for line in text.splitlines():
        if m := re.fullmatch(r"\[(\w+)\]", line.strip()):
            section = m.group(1)
            keys[section] = {}
        elif m := re.fullmatch(r'(# )?(\w+) = ("|\[|-?\d|true|false).*', line.strip()):
            keys[section][m.group(2)] = m.group(1) is None
    return keys


def test_example_config_names_every_setting_at_its_default(tmp_path: Path) -> None:
    text = EXAMPLE.read_text()
    keys = example_keys(text)
    assert set(keys) == {"", *SECTIONS}
    assert set(keys[""]) == set(TOP_LEVEL)
    for name, cls in SECTIONS.items():
        fields = {f.name: f.default for f in dataclasses.fields(cls)}
        missing = set(fields) - set(keys[name])
        assert not missing, f"[{name}] keys missing from {EXAMPLE.name}: {sorted(missing)}"
        assert not set(keys[name]) - set(fields), f"[{name}] has keys settings do not know"
        for key, active in keys[name].items():
            # unset-by-default keys are shown commented out; every other key is active, at its default
            assert active == (fields[key] is not None), f"{name}.{key}"
    # each key carries its reason: the line above it is a comment
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if re.fullmatch(r"\w+ = .*", line):
            assert lines[i - 1].startswith("#"), f"no reason above {line!r}"

    # it loads, and loading it changes nothing: every value shown is the default
    env = {"HOME": str(tmp_path)}
    assert load_settings(EXAMPLE, env) == load_settings(None, env)
    assert set(tomllib.loads(text)) == set(TOP_LEVEL) | set(SECTIONS)
    assert Settings.device == tomllib.loads(text)["device"]


def test_env_example_holds_the_secrets_and_loads() -> None:
    text = ENV_EXAMPLE.read_text()
    for var in ("PATCHD_DATABASE_URL", "PATCHD_KAFKA_SASL_PLAIN_PASSWORD"):
        assert re.search(rf"^# {var}=\S+", text, re.M), var
    # uncommented, as an operator fills it in, it is still a valid environment for the settings
    env = dict(line[2:].split("=", 1) for line in text.splitlines() if re.match(r"# PATCHD_[A-Z_]+=", line))
    settings = load_settings(None, {**env, "HOME": "/nonexistent"})
    assert settings.kafka.sasl_plain_password == "CHANGE-ME"
    assert settings.database.url is not None and settings.database.url.startswith("postgresql://")


def test_config_check_prints_effective_values_with_secrets_masked(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "patchd.toml"
    config.write_text(
        '[model]\nname = "tiny"\n[kafka]\nsecurity_protocol = "SASL_SSL"\nsasl_mechanism = "PLAIN"\n'
        'sasl_plain_username = "patchd"\n'
    )
    monkeypatch.setenv("PATCHD_KAFKA_SASL_PLAIN_PASSWORD", "hunter2")
    monkeypatch.setenv("PATCHD_DATABASE_URL", "postgresql://patchd:s3cret@db/patchd")
    monkeypatch.setenv("PATCHD_STATE_DIR", str(tmp_path / "state"))
    assert cli.main(["config", "check", str(config)]) == 0
    out = capsys.readouterr().out
    assert "hunter2" not in out and "s3cret" not in out
    assert 'kafka.sasl_plain_password = "***"' in out
    assert 'database.url = "postgresql://patchd:***@db/patchd"' in out
    assert 'kafka.group_id = "patchd-tiny"' in out  # derived defaults are shown resolved
    assert "PATCHD_DATABASE_URL" in out.splitlines()[1]  # which values the environment set

    assert cli.main(["config", "check", "--json", str(EXAMPLE)]) == 0
    assert '"sasl_plain_password": "***"' in capsys.readouterr().out


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('[kafka]\ntopik = "x"\n', "unknown key kafka.topik"),
        ("[policy]\nquorum = 0\n", "policy.quorum = 0: must be at least 1"),
        ("[health]\nport = 70000\n", "health.port"),
        ('[kafka]\nsecurity_protocol = "SASL_SSL"\n', "kafka.sasl_mechanism"),
        ("device = cuda\n", "not valid TOML"),
    ],
)
def test_config_check_rejects_a_bad_file_naming_the_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str, message: str
) -> None:
    config = tmp_path / "bad.toml"
    config.write_text(content)
    assert cli.main(["config", "check", str(config)]) == 1
    captured = capsys.readouterr()
    assert message in captured.err and captured.out == ""


def test_config_check_on_a_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["config", "check", str(tmp_path / "nope.toml")]) == 1
    assert "does not exist" in capsys.readouterr().err
