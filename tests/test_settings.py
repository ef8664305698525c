"""daemon/settings.py: defaults, TOML, PATCHD_* overrides, coercion, errors that name the key."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from daemon.settings import (
    MASK,
    Settings,
    SettingsError,
    effective_settings,
    load_settings,
    mask_url,
    resolve_device,
)
from patching.config import GateConfig, TrainConfig

HOME = {"HOME": "/home/svc"}


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "patchd.toml"
    path.write_text(text)
    return path


def test_no_file_no_env_gives_resolved_defaults() -> None:
    s = load_settings(None, HOME)
    assert s.model.name == "fever-minilm" and s.model.base == "fever-minilm" and s.model.layer is None
    assert s.kafka.bootstrap_servers == ("127.0.0.1:9092",)
    assert s.kafka.topic == "corrections" and s.kafka.group_id == "patchd-fever-minilm"
    assert s.kafka.dlq_topic == "corrections.dlq" and s.kafka.releases_topic == "corrections.releases"
    assert s.state.dir == Path("/home/svc/.local/state/patchd")
    assert s.storage.root == "/home/svc/.local/state/patchd/checkpoints"
    assert s.database.url == "sqlite:////home/svc/.local/state/patchd/patchd.db"
    assert s.device == "auto"
    assert s.trainer == TrainConfig() and s.gate == GateConfig()
    assert (s.policy.quorum, s.policy.conflict_share, s.policy.casefold) == (1, 0.6, False)
    assert (s.publish.interval_s, s.publish.keep_versions) == (5.0, 50)


def test_file_values_and_derived_defaults(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
device = "cuda:1"
[model]
name = "zsre-smollm2"
base = "/models/smol"
layer = 11
[kafka]
bootstrap_servers = ["k1:9092", "k2:9092"]
topic = "fixes"
[state]
dir = "/var/lib/patchd"
[trainer]
lr = 1          # an integer is a fine float
activation = "gelu"
mem_weight = 7.5
[gate]
policy = "regressed"
retries = 0
[policy]
quorum = 3
casefold = true
""",
    )
    s = load_settings(path, HOME)
    assert s.device == "cuda:1"
    assert (s.model.name, s.model.base, s.model.layer) == ("zsre-smollm2", "/models/smol", 11)
    assert s.kafka.bootstrap_servers == ("k1:9092", "k2:9092")
    assert s.kafka.group_id == "patchd-zsre-smollm2"  # follows the model
    assert s.kafka.dlq_topic == "fixes.dlq"
    assert s.storage.root == "/var/lib/patchd/checkpoints"  # follows the state dir
    assert s.database.url == "sqlite:////var/lib/patchd/patchd.db"
    assert s.trainer == TrainConfig(lr=1.0, activation="gelu", mem_weight=7.5)
    assert isinstance(s.trainer.lr, float)
    assert s.gate == GateConfig(policy="regressed", retries=0)
    assert s.policy.quorum == 3 and s.policy.casefold is True


def test_environment_overrides_file_and_is_coerced(tmp_path: Path) -> None:
    path = write(tmp_path, '[kafka]\ntopic = "from-file"\n[policy]\nquorum = 2\n')
    env = {
        **HOME,
        "PATCHD_KAFKA_TOPIC": "from-env",
        "PATCHD_KAFKA_BOOTSTRAP_SERVERS": "a:1, b:2",
        "PATCHD_MODEL_BASE": "/srv/base",
        "PATCHD_MODEL_LAYER": "",  # empty = unset an optional key
        "PATCHD_STATE_DIR": "/data/state",
        "PATCHD_STORAGE_ROOT": "/mnt/shared/ckpt",
        "PATCHD_DATABASE_URL": "postgresql://patchd:pw@db/patchd",
        "PATCHD_POLICY_CONFLICT_SHARE": "0.75",
        "PATCHD_POLICY_CASEFOLD": "yes",
        "PATCHD_TRAINER_MAX_STEPS": "64",
        "PATCHD_TRAINER_MEM_WEIGHT": "",
        "PATCHD_GATE_POLICY": "regressed",
        "PATCHD_LOG_JSON": "off",
        "PATCHD_DEVICE": "cpu",
        "PATCHD_HEALTH_PORT": "0",
        # not settings: other components' variables pass through untouched
        "PATCHD_CACHE_DIR": "/tmp/x",
        "PATCHD_TEST_BOOTSTRAP": "127.0.0.1:1",
        "PATCHD_CONFIG": "/etc/patchd.toml",
        "UNRELATED": "1",
    }
    s = load_settings(path, env)
    assert s.kafka.topic == "from-env"
    assert s.kafka.bootstrap_servers == ("a:1", "b:2")
    assert s.model.base == "/srv/base" and s.model.layer is None
    assert s.state.dir == Path("/data/state") and s.storage.root == "/mnt/shared/ckpt"
    assert s.database.url == "postgresql://patchd:pw@db/patchd"
    assert s.policy.quorum == 2 and s.policy.conflict_share == 0.75 and s.policy.casefold is True
    assert s.trainer.max_steps == 64 and s.trainer.mem_weight is None
    assert s.gate.policy == "regressed"
    assert s.log.json is False and s.device == "cpu" and s.health.port == 0


@pytest.mark.parametrize(
    ("text", "env", "names"),
    [
        ("[kafka]\nbootstrap = 'x:1'\n", {}, ["kafka.bootstrap", "bootstrap_servers"]),  # typo, with a hint
        ("[kafak]\ntopic = 'x'\n", {}, ["kafak", "kafka"]),
        ("colour = 'blue'\n", {}, ["colour"]),
        ("kafka = 3\n", {}, ["[kafka]", "table"]),
        ("[policy]\nquorum = '3'\n", {}, ["policy.quorum", "an integer"]),
        ("[policy]\nquorum = 2.5\n", {}, ["policy.quorum", "an integer"]),
        ("[policy]\ncasefold = 1\n", {}, ["policy.casefold", "true or false"]),
        ("[policy]\nquorum = 0\n", {}, ["policy.quorum", "at least 1"]),
        ("[policy]\nconflict_share = 1.0\n", {}, ["policy.conflict_share"]),
        ("[trainer]\nlr = -1.0\n", {}, ["trainer.lr", "> 0"]),
        ("[trainer]\nactivation = 'tanh'\n", {}, ["trainer.activation", "'relu'"]),
        ("[trainer]\nwarmup = 3\n", {}, ["trainer.warmup"]),
        ("[gate]\nretry_factor = 0.5\n", {}, ["gate.retry_factor", ">= 1"]),
        (
            "",
            {"PATCHD_KAFKA_POLL_MAX_RECORDS": "many"},
            ["kafka.poll_max_records", "PATCHD_KAFKA_POLL_MAX_RECORDS"],
        ),
        ("", {"PATCHD_KAFKA_TOPICS": "x"}, ["kafka.topics", "PATCHD_KAFKA_TOPICS", "'topic'"]),
        ("", {"PATCHD_POLICY_CASEFOLD": "maybe"}, ["policy.casefold"]),
        ("", {"PATCHD_DEVICE": "gpu"}, ["device", "PATCHD_DEVICE"]),
        ("", {"PATCHD_KAFKA_SECURITY_PROTOCOL": "TLS"}, ["kafka.security_protocol", "SASL_SSL"]),
        ("", {"PATCHD_KAFKA_TOPIC": "bad topic"}, ["kafka.topic"]),
        ("", {"PATCHD_KAFKA_BOOTSTRAP_SERVERS": ","}, ["kafka.bootstrap_servers"]),
        ("", {"PATCHD_HEALTH_PORT": "70000"}, ["health.port"]),
        ("", {"PATCHD_KAFKA_SECURITY_PROTOCOL": "SASL_SSL"}, ["kafka.sasl_mechanism"]),
        (
            "",
            {"PATCHD_KAFKA_SECURITY_PROTOCOL": "SASL_SSL", "PATCHD_KAFKA_SASL_MECHANISM": "PLAIN"},
            ["kafka.sasl_plain_username", "kafka.sasl_plain_password"],
        ),
    ],
)
def test_bad_settings_name_the_key(tmp_path: Path, text: str, env: dict[str, str], names: list[str]) -> None:
    with pytest.raises(SettingsError) as info:
        load_settings(write(tmp_path, text), {**HOME, **env})
    for name in names:
        assert name in str(info.value)


def test_file_errors(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="does not exist"):
        load_settings(tmp_path / "missing.toml", HOME)
    with pytest.raises(SettingsError, match="not valid TOML"):
        load_settings(write(tmp_path, "[kafka\n"), HOME)


def test_trainer_error_names_the_offending_key_among_several(tmp_path: Path) -> None:
    # lr is fine alone, max_steps = 0 is not: the message points at max_steps only
    with pytest.raises(SettingsError) as info:
        load_settings(write(tmp_path, "[trainer]\nlr = 0.1\nmax_steps = 0\n"), HOME)
    assert "trainer.max_steps" in str(info.value) and "trainer.lr (" not in str(info.value)


def test_security_settings_reach_the_kafka_client_config() -> None:
    env = {
        **HOME,
        "PATCHD_KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
        "PATCHD_KAFKA_SASL_MECHANISM": "SCRAM-SHA-512",
        "PATCHD_KAFKA_SASL_PLAIN_USERNAME": "patchd",
        "PATCHD_KAFKA_SASL_PLAIN_PASSWORD": "hunter2",
        "PATCHD_KAFKA_SSL_CAFILE": "/etc/ssl/ca.pem",
        "PATCHD_KAFKA_SSL_CHECK_HOSTNAME": "false",
    }
    s = load_settings(None, env)
    config = s.kafka.client_config()
    assert config["security_protocol"] == "SASL_SSL"
    assert config["sasl_mechanism"] == "SCRAM-SHA-512"
    assert config["sasl_plain_username"] == "patchd" and config["sasl_plain_password"] == "hunter2"
    assert config["ssl_cafile"] == "/etc/ssl/ca.pem" and config["ssl_check_hostname"] is False
    assert "ssl_certfile" not in config  # unset keys are left to kafka-python's defaults
    assert "hunter2" not in repr(s)  # secrets stay out of reprs and logs
    plain = load_settings(None, HOME).kafka.client_config()
    assert plain == {
        "bootstrap_servers": ["127.0.0.1:9092"],
        "client_id": "patchd",
        "security_protocol": "PLAINTEXT",
    }


def test_effective_settings_mask_secrets_and_are_json() -> None:
    env = {
        **HOME,
        "PATCHD_KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT",
        "PATCHD_KAFKA_SASL_MECHANISM": "PLAIN",
        "PATCHD_KAFKA_SASL_PLAIN_USERNAME": "u",
        "PATCHD_KAFKA_SASL_PLAIN_PASSWORD": "hunter2",
        "PATCHD_DATABASE_URL": "postgresql+psycopg://patchd:s3cret@db:5432/patchd",
    }
    out = effective_settings(load_settings(None, env))
    text = json.dumps(out)
    assert "hunter2" not in text and "s3cret" not in text
    assert out["kafka"]["sasl_plain_password"] == MASK
    assert out["kafka"]["ssl_password"] is None  # unset stays visibly unset
    assert out["database"]["url"] == f"postgresql+psycopg://patchd:{MASK}@db:5432/patchd"
    assert out["trainer"]["lr"] == TrainConfig().lr and out["state"]["dir"] == "/home/svc/.local/state/patchd"
    assert set(out) == {"device", *(f for f in Settings.__dataclass_fields__ if f != "device")}


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("[kafka]\nsasl_plain_password = 31337424242\n", "kafka.sasl_plain_password"),  # unquoted digits
        ("[kafka]\nssl_password = 31337424242\n", "kafka.ssl_password"),
        ('[storage]\nsecret_access_key = ["31337424242"]\n', "storage.secret_access_key"),
        ('[database]\nurl = ["postgresql://patchd:31337424242@db/patchd"]\n', "database.url"),
    ],
)
def test_a_mistyped_secret_is_named_but_not_shown(tmp_path: Path, text: str, key: str) -> None:
    # the error reaches the journal and `patchd config check`: a password of the wrong type is
    # still the password
    with pytest.raises(SettingsError) as info:
        load_settings(write(tmp_path, text), HOME)
    assert key in str(info.value) and f"got {MASK}" in str(info.value)
    assert "31337424242" not in str(info.value)


def test_mask_url_leaves_passwordless_urls_alone() -> None:
    assert mask_url("sqlite:////x/patchd.db") == "sqlite:////x/patchd.db"
    assert mask_url("postgresql://patchd@db/patchd") == "postgresql://patchd@db/patchd"
    assert mask_url(None) is None


def test_resolve_device() -> None:
    assert resolve_device("cpu") == "cpu" and resolve_device("cuda:1") == "cuda:1"
    assert resolve_device("auto") in ("cpu", "cuda")


def test_an_s3_root_with_its_options_and_the_secret_masked() -> None:
    env = {
        **HOME,
        "PATCHD_STORAGE_ROOT": "s3://team-models/patchd",
        "PATCHD_STORAGE_ENDPOINT_URL": "https://minio.internal:9000",
        "PATCHD_STORAGE_ACCESS_KEY_ID": "AKIAEXAMPLE",
        "PATCHD_STORAGE_SECRET_ACCESS_KEY": "s3cr3t-value",
    }
    s = load_settings(None, env)
    assert s.storage.root == "s3://team-models/patchd"  # a URI is kept as written, not made a path
    assert s.storage.cache_dir == Path("/home/svc/.local/state/patchd/s3-cache")
    options = s.storage.s3_options()
    assert options.endpoint_url == "https://minio.internal:9000" and options.secret_access_key == "s3cr3t-value"
    assert "s3cr3t-value" not in repr(s) and "s3cr3t-value" not in str(effective_settings(s))
    assert effective_settings(s)["storage"]["secret_access_key"] == "***"


@pytest.mark.parametrize(
    ("env", "key"),
    [
        ({"PATCHD_STORAGE_ROOT": "gs://bucket/x"}, "storage.root"),
        ({"PATCHD_STORAGE_ROOT": "s3://B/x"}, "storage.root"),
        ({"PATCHD_STORAGE_ACCESS_KEY_ID": "AKIAEXAMPLE"}, "storage.access_key_id"),
    ],
)
def test_a_bad_storage_setting_names_its_key(env: dict[str, str], key: str) -> None:
    with pytest.raises(SettingsError, match=key.replace(".", r"\.")):
        load_settings(None, {**HOME, **env})
