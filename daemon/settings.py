"""Typed settings: a TOML file plus `PATCHD_<SECTION>_<KEY>` environment overrides.

The only reader of configuration. Every key has a default (with its reason), so the daemon runs
with no file at all. Precedence: default < file < environment. Unknown sections and keys, and
values of the wrong type or out of range, raise SettingsError naming the key and where it came
from; start-up stops there.

    [kafka] bootstrap_servers  <->  PATCHD_KAFKA_BOOTSTRAP_SERVERS
    device (top level)         <->  PATCHD_DEVICE

Environment values are strings and are parsed by the key's type (int, float, bool as
true/false/1/0/yes/no/on/off, lists comma-separated; an empty value sets an optional key to
None). PATCHD_* variables that name no section (PATCHD_CACHE_DIR, PATCHD_TEST_BOOTSTRAP, ...)
belong to other parts of patchd and are ignored here. `[trainer]` and `[gate]` map field by field
onto patching.config.TrainConfig and GateConfig.

Why not pydantic-settings (weighed in the architecture issue): it merges its sources before it
validates, so an error names the key but not where the value came from (this file's or that
environment variable), which is the first thing an operator needs; it reads a list from the
environment as JSON, so `PATCHD_KAFKA_BOOTSTRAP_SERVERS=h1:9092,h2:9092` would need a custom
decoder on every list; telling PATCHD_* variables of other components (ignored) from unknown keys
of a known section (an error) needs a custom source; and [trainer] / [gate] are the engine's
dataclasses, which must not depend on pydantic. What remained to write by hand was about as long
as the reflection below, which the tests pin (tests/test_settings.py).
"""

from __future__ import annotations

import difflib
import re
import tomllib
import types
import typing
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields, is_dataclass, replace
from pathlib import Path
from typing import Any, Literal, Union

from patching.augment import Source
from patching.config import GateConfig, TrainConfig

if typing.TYPE_CHECKING:
    from patching.s3storage import S3Options

ENV_PREFIX = "PATCHD_"
MASK = "***"
SecurityProtocol = Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"]
SaslMechanism = Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512", "GSSAPI", "OAUTHBEARER"]


class SettingsError(ValueError):
    """A bad configuration; the message names the key and its source."""


@dataclass(frozen=True)
class ModelSettings:
    # the prepared FEVER classifier is the quickstart's model (patching/bases/load.py)
    name: str = "fever-minilm"
    # a prepared base name or a local directory; None = the prepared base called `name`
    base: str | None = None
    # None = the architecture table's last FFN (patching/arch.py); set only to patch another layer
    layer: int | None = None
    # the frozen model's weights: "auto" = bfloat16 on a GPU (half the memory, the GPU's fast path),
    # float32 on a CPU (bfloat16 matmuls are slow there); patch neurons are float32 either way
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    # JSONL files ({"input": ...} per line) of unrelated inputs for the memory M and the locality
    # gate's held-out set; None = the prepared base's built-in task splits (fever-minilm -> fever)
    memory_file: Path | None = None
    heldout_file: Path | None = None


@dataclass(frozen=True)
class KafkaSettings:
    # deploy/kafka/broker.sh's default address
    bootstrap_servers: tuple[str, ...] = ("127.0.0.1:9092",)
    # DESIGN §4: corrections arrive here; "<topic>.dlq" and "<topic>.releases" derive from it
    topic: str = "corrections"
    # None = "patchd-<model>": one consumer group per patched model
    group_id: str | None = None
    client_id: str = "patchd"
    # plaintext on loopback by default; production sets SSL / SASL_SSL
    security_protocol: SecurityProtocol = "PLAINTEXT"
    ssl_cafile: str | None = None
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None
    ssl_password: str | None = field(default=None, repr=False)  # secret
    # verify the broker's certificate names the host we dialled (off only for test CAs)
    ssl_check_hostname: bool = True
    sasl_mechanism: SaslMechanism | None = None
    sasl_plain_username: str | None = None
    sasl_plain_password: str | None = field(default=None, repr=False)  # secret
    # records per poll: big enough to amortise one database transaction per batch
    poll_max_records: int = 200
    # backpressure: pause the consumer while this many mistakes wait for the worker
    max_pending: int = 1000
    # the other models whose daemons read this topic: their events are skipped and counted, not
    # dead-lettered; of all these daemons, the one whose model name sorts first dead-letters the
    # events none of them can claim (daemon/messages.py), so list the same set on every one
    known_models: tuple[str, ...] = ()

    @property
    def dlq_topic(self) -> str:
        return f"{self.topic}.dlq"

    @property
    def releases_topic(self) -> str:
        return f"{self.topic}.releases"

    def client_config(self) -> dict[str, Any]:
        """Connection and security keyword arguments shared by kafka-python's clients."""
        config: dict[str, Any] = {
            "bootstrap_servers": list(self.bootstrap_servers),
            "client_id": self.client_id,
            "security_protocol": self.security_protocol,
        }
        if self.security_protocol in ("SSL", "SASL_SSL"):
            config["ssl_check_hostname"] = self.ssl_check_hostname
            for key in ("ssl_cafile", "ssl_certfile", "ssl_keyfile", "ssl_password"):
                if getattr(self, key) is not None:
                    config[key] = getattr(self, key)
        if self.security_protocol.startswith("SASL_"):
            for key in ("sasl_mechanism", "sasl_plain_username", "sasl_plain_password"):
                if getattr(self, key) is not None:
                    config[key] = getattr(self, key)
        return config


@dataclass(frozen=True)
class DatabaseSettings:
    # None = SQLite file <state.dir>/patchd.db (resolved at load): embedded, nothing to run
    url: str | None = field(default=None, repr=False)  # may hold a password


@dataclass(frozen=True)
class StateSettings:
    # None = ~/.local/state/patchd (resolved at load): the XDG place for a service's own state
    dir: Path | None = None
    # the engine snapshot (<state.dir>/engine/...) is written after this many accepted patches and
    # at every stop, so a restart restores it instead of replaying every patch; 0 = only at stops
    snapshot_every: int = 100


@dataclass(frozen=True)
class StorageSettings:
    # a path (local or NFS), file://PATH or s3://BUCKET/PREFIX; None = <state.dir>/checkpoints
    # (resolved at load); production points it at shared storage
    root: str | None = None
    # s3:// only. Each None falls back to the AWS SDK's own chain, so the standard AWS_* variables,
    # ~/.aws and instance roles work as they do for every AWS tool.
    # None = AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL, else AWS; set it for MinIO, Ceph, s3proxy ...
    endpoint_url: str | None = None
    # None = AWS_REGION / AWS_DEFAULT_REGION / ~/.aws/config
    region: str | None = None
    # None = AWS_ACCESS_KEY_ID / ~/.aws/credentials / an instance or pod role
    access_key_id: str | None = None
    secret_access_key: str | None = field(default=None, repr=False)  # secret
    # fetched version files; None = <state.dir>/s3-cache (resolved at load)
    cache_dir: Path | None = None

    def s3_options(self) -> S3Options:
        from patching.s3storage import S3Options

        return S3Options(self.endpoint_url, self.region, self.access_key_id, self.secret_access_key, self.cache_dir)


@dataclass(frozen=True)
class PolicySettings:
    # one report is enough when corrections come from a trusted channel; raise for public feedback
    quorum: int = 1
    # the winning target needs more than this share of a mistake's reports (memory/policy.py)
    conflict_share: float = 0.6
    # reports one reporter may send per window before the rest are rejected (flood guard)
    # (memory/ingest.py) named reporters only: anonymous reports count as one voice for quorum
    reporter_rate_limit: int = 100
    reporter_rate_window_s: float = 3600.0
    # 0 = off (a trusted channel). For public feedback, e.g. 86400: a reporter is established once
    # its first report is a day old, and a mistake whose target no established reporter sent is
    # held for an operator (`patchd review`) instead of patched (memory/policy.py)
    reporter_probation_s: float = 0.0
    # inputs longer than this are rejected: far past any encoder's context, likely abuse
    max_input_chars: int = 4000
    # paraphrases per event: each one costs a forward pass when the patch is trained
    max_equivalents: int = 16
    # train each patch on the paraphrases sent with its reports too (the events' `equivalents`): the
    # neuron then also answers rephrasings of the question, not just the reported wording
    train_on_equivalents: bool = True
    # train each patch also behind this many unrelated prefixes, as more equivalents with the same
    # target (context augmentation, patching/augment.py): the fix then holds when the question comes
    # after other text, not only as the bare string. Unset = 10 for a generator, 0 for a classifier:
    # on zsre-smollm2's first 220 zsRE fixes, 10 memory texts took the in-context hit rate from 0.10
    # to 0.60 and paraphrases from 0.36 to 0.63 at equal locality and retention; on fever-minilm they
    # raised it from 0.39 to 0.60 but cost 3 points of accuracy on other training claims. About
    # 5x the training time per patch (docs/results/levers-21.md). 0 = off
    context_prefixes: int | None = None
    # where they come from: "memory" = the last memory inputs (M's own texts; they won on every
    # context figure), "generated" = a generator's own continuations of seed words (as WISE makes them)
    context_prefix_source: Source = "memory"
    # a generator whose tokenizer has a chat template: train each patch also as this many chat forms
    # of its question (a system prompt and an earlier exchange whose question is one of the context
    # prefixes, patching/augment.py), so that the fix holds when a chat client asks it. Needs the
    # prefixes. Unset = 3 for such a generator (daemon/model.py CHAT_COPIES), 0 otherwise. 0 = off
    context_chat_copies: int | None = None
    # whole event size: a correction is a sentence or two, not a document
    max_event_bytes: int = 65536
    # case usually carries meaning (names, acronyms), so reports differing in case stay distinct
    casefold: bool = False


@dataclass(frozen=True)
class PublishSettings:
    # seconds between publish checks: downstream sees a fix within seconds, storage sees few versions
    interval_s: float = 5.0
    # versions kept on storage (each costs kilobytes); older ones are pruned, LATEST never
    keep_versions: int = 50
    # Ed25519 private key (`patchd keys generate`) that signs every manifest; None = the systemd
    # credential signing.key when there is one ($CREDENTIALS_DIRECTORY), else versions are unsigned
    signing_key: Path | None = None


@dataclass(frozen=True)
class HealthSettings:
    # loopback: /livez /readyz /metrics are for the local agent and the orchestrator, not the world
    host: str = "127.0.0.1"
    # the conventional Prometheus port for an application's metrics; 0 disables the endpoint
    port: int = 9464


@dataclass(frozen=True)
class LogSettings:
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    # one JSON object per line for the journal and log shippers; false = readable console lines
    json: bool = True


@dataclass(frozen=True)
class Settings:
    # "auto" = cuda when torch sees a GPU, else cpu
    device: str = "auto"
    model: ModelSettings = field(default_factory=ModelSettings)
    kafka: KafkaSettings = field(default_factory=KafkaSettings)
    database: DatabaseSettings = field(default_factory=DatabaseSettings)
    state: StateSettings = field(default_factory=StateSettings)
    storage: StorageSettings = field(default_factory=StorageSettings)
    trainer: TrainConfig = field(default_factory=TrainConfig)
    gate: GateConfig = field(default_factory=GateConfig)
    policy: PolicySettings = field(default_factory=PolicySettings)
    publish: PublishSettings = field(default_factory=PublishSettings)
    health: HealthSettings = field(default_factory=HealthSettings)
    log: LogSettings = field(default_factory=LogSettings)


TOP_LEVEL = ("device",)  # keys outside any section
SECTIONS: dict[str, type] = {
    f.name: typing.get_type_hints(Settings)[f.name] for f in fields(Settings) if f.name not in TOP_LEVEL
}
SECRETS = {("kafka", "ssl_password"), ("kafka", "sasl_plain_password"), ("storage", "secret_access_key")}
# and the keys whose values may hold one (a database URL's password): errors never show their values
SENSITIVE = SECRETS | {("database", "url")}
_DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?|mps")
# Kafka allows 249; the ".releases" suffix must still fit
_TOPIC = re.compile(r"[A-Za-z0-9._-]{1,200}")
_STORAGE_URI = re.compile(r"file://.+|s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/.*)?")
_TRUE, _FALSE = {"1", "true", "yes", "on"}, {"0", "false", "no", "off"}


def load_settings(path: Path | None, env: Mapping[str, str]) -> Settings:
    """Defaults, then the TOML file at `path` (if any), then PATCHD_* variables from `env`."""
    raw: Raw = {name: {} for name in SECTIONS}
    top: dict[str, tuple[Any, str]] = {}
    if path is not None:
        _read_file(Path(path), raw, top)
    _read_env(env, raw, top)

    sections: dict[str, Any] = {}
    for name, cls in SECTIONS.items():
        sections[name] = _build(cls, name, raw[name])
    device = _coerce(*top["device"], str, "device") if "device" in top else Settings.device
    if not _DEVICE.fullmatch(device):
        source = f"from {top['device'][1]}" if "device" in top else "default"
        raise SettingsError(f"device ({source}): expected auto, cpu, cuda, cuda:N or mps, got {device!r}")
    settings = Settings(device=device, **sections)
    _check(settings)
    return _resolve(settings, env)


def effective_settings(settings: Settings) -> dict[str, Any]:
    """Every effective value as plain JSON types, secrets masked (for `patchd config check`)."""
    out: dict[str, Any] = {"device": settings.device}
    for name in SECTIONS:
        section = {k: _plain(v) for k, v in asdict(getattr(settings, name)).items()}
        for sec, key in SECRETS:
            if sec == name and section.get(key) is not None:
                section[key] = MASK
        out[name] = section
    out["database"]["url"] = mask_url(settings.database.url)
    out["kafka"]["dlq_topic"] = settings.kafka.dlq_topic
    out["kafka"]["releases_topic"] = settings.kafka.releases_topic
    return out


def mask_url(url: str | None) -> str | None:
    """postgresql://user:secret@host/db -> postgresql://user:***@host/db."""
    return None if url is None else re.sub(r"(://[^:/@]*:)[^@/]*@", rf"\g<1>{MASK}@", url)


def resolve_device(device: str) -> str:
    """The torch device for a `device` setting: "auto" becomes "cuda" when a GPU is visible."""
    if device != "auto":
        return device
    import torch  # lazy: `patchd --help` and config checks must not pay for torch

    return "cuda" if torch.cuda.is_available() else "cpu"


# ---------------------------------------------------------------------------- reading


Raw = dict[str, dict[str, tuple[Any, str]]]  # section -> key -> (value, where it came from)


def _read_file(path: Path, raw: Raw, top: dict[str, tuple[Any, str]]) -> None:
    try:
        with path.open("rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        raise SettingsError(f"config file {path} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise SettingsError(f"config file {path} is not valid TOML: {exc}") from None
    for key, value in data.items():
        if key in TOP_LEVEL:
            top[key] = (value, str(path))
        elif key in SECTIONS:
            if not isinstance(value, dict):
                raise SettingsError(f"[{key}] in {path} must be a table (a [{key}] section), got {value!r}")
            for sub, item in value.items():
                raw[key][sub] = (item, str(path))
        else:
            raise SettingsError(f"unknown section or key {key!r} in {path}{_hint(key, [*SECTIONS, *TOP_LEVEL])}")


def _read_env(env: Mapping[str, str], raw: Raw, top: dict[str, tuple[Any, str]]) -> None:
    for var, value in env.items():
        if not var.startswith(ENV_PREFIX):
            continue
        rest = var[len(ENV_PREFIX) :].lower()
        if rest in TOP_LEVEL:
            top[rest] = (_EnvValue(value), var)
            continue
        section, _, key = rest.partition("_")
        if section in SECTIONS and key:
            raw[section][key] = (_EnvValue(value), var)
        # anything else is another component's variable (PATCHD_CACHE_DIR, PATCHD_TEST_*)


class _EnvValue(str):
    """A string that came from the environment and may be parsed into the key's type."""


# ---------------------------------------------------------------------------- building


def _build(cls: type, section: str, values: dict[str, tuple[Any, str]]) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in fields(cls)]
    kwargs: dict[str, Any] = {}
    for key, (value, source) in values.items():
        if key not in hints or key not in names:
            where = f"{source}" if not source.startswith(ENV_PREFIX) else f"environment variable {source}"
            raise SettingsError(f"unknown key {section}.{key} in {where}{_hint(key, names)}")
        kwargs[key] = _coerce(value, source, hints[key], f"{section}.{key}")
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as exc:
        # name the key: the one(s) that fail alone, else all that were set (a combination fails)
        culprits = [k for k in kwargs if _fails(cls, {k: kwargs[k]})] or list(kwargs)
        where = ", ".join(f"{section}.{k} (from {values[k][1]})" for k in culprits)
        raise SettingsError(f"{where}: {exc}") from None


def _fails(cls: type, kwargs: dict[str, Any]) -> bool:
    try:
        cls(**kwargs)
    except (ValueError, TypeError):
        return True
    return False


def _coerce(value: Any, source: str, hint: Any, key: str) -> Any:
    """`value` as type `hint`; environment strings are parsed, file values must already fit."""
    from_env = isinstance(value, _EnvValue)
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    where = f"{key} (from {source})"
    if origin in (Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        if from_env and value.strip() == "":
            return None
        if len(inner) == 1:
            return _coerce(value, source, inner[0], key)
    if origin is Literal:
        got = str(value) if from_env else value
        if got not in args:
            raise SettingsError(f"{where}: expected one of {', '.join(map(repr, args))}, got {_shown(key, got)}")
        return got
    if origin is tuple:
        items = [s.strip() for s in value.split(",") if s.strip()] if isinstance(value, str) else value
        if not isinstance(items, list | tuple):
            raise SettingsError(f"{where}: expected a list of strings, got {_shown(key, value)}")
        return tuple(_coerce(_EnvValue(i) if from_env else i, source, args[0], key) for i in items)
    if hint is bool:
        if from_env and value.strip().lower() in _TRUE | _FALSE:
            return value.strip().lower() in _TRUE
        if isinstance(value, bool):
            return value
        raise SettingsError(f"{where}: expected true or false, got {_shown(key, value)}")
    if hint in (int, float):
        if from_env:
            try:
                return hint(value.strip())
            except ValueError:
                raise SettingsError(f"{where}: expected {_NAMES[hint]}, got {_shown(key, str(value))}") from None
        wrong = isinstance(value, bool) or not isinstance(value, int | float)
        if wrong or (hint is int and isinstance(value, float)):
            raise SettingsError(f"{where}: expected {_NAMES[hint]}, got {_shown(key, value)}")
        return hint(value)
    if hint is Path:
        if not isinstance(value, str) or not value:
            raise SettingsError(f"{where}: expected a path, got {_shown(key, value)}")
        return Path(value)
    if hint is str:
        if not isinstance(value, str):
            raise SettingsError(f"{where}: expected a string, got {_shown(key, value)}")
        return str(value)
    raise SettingsError(f"{where}: settings cannot read a value of type {hint!r}")  # a bug, not a user error


_NAMES = {int: "an integer", float: "a number"}


def _shown(key: str, value: Any) -> str:
    """A value as an error message shows it: never a secret's (a mistyped password is still one)."""
    return MASK if tuple(key.split(".", 1)) in SENSITIVE else repr(value)


def _hint(key: str, options: list[str]) -> str:
    close = difflib.get_close_matches(key, options, n=1)
    return f" (did you mean {close[0]!r}?)" if close else f" (known: {', '.join(sorted(options))})"


def _check(s: Settings) -> None:
    """Ranges and cross-key rules of the daemon's own sections (the patching ones check themselves)."""
    rules: list[tuple[bool, str, str]] = [
        (bool(s.model.name.strip()), "model.name", "must not be empty"),
        (bool(s.kafka.bootstrap_servers), "kafka.bootstrap_servers", "needs at least one host:port"),
        (
            all(":" in b for b in s.kafka.bootstrap_servers),
            "kafka.bootstrap_servers",
            "entries must be host:port",
        ),
        (bool(_TOPIC.fullmatch(s.kafka.topic)), "kafka.topic", "must be 1-200 characters of [A-Za-z0-9._-]"),
        (s.kafka.poll_max_records > 0, "kafka.poll_max_records", "must be > 0"),
        (s.kafka.max_pending > 0, "kafka.max_pending", "must be > 0"),
        (
            s.model.name not in s.kafka.known_models and all(m.strip() for m in s.kafka.known_models),
            "kafka.known_models",
            f"lists the OTHER models served from the topic: not empty names, not this daemon's {s.model.name!r}",
        ),
        (
            not s.kafka.security_protocol.startswith("SASL_") or s.kafka.sasl_mechanism is not None,
            "kafka.sasl_mechanism",
            f"is required with security_protocol {s.kafka.security_protocol}",
        ),
        (
            s.kafka.sasl_mechanism not in ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")
            or not s.kafka.security_protocol.startswith("SASL_")
            or (s.kafka.sasl_plain_username is not None and s.kafka.sasl_plain_password is not None),
            "kafka.sasl_plain_username",
            f"and kafka.sasl_plain_password are required with sasl_mechanism {s.kafka.sasl_mechanism}",
        ),
        (s.policy.quorum >= 1, "policy.quorum", "must be at least 1 distinct reporter"),
        (0.0 <= s.policy.conflict_share < 1.0, "policy.conflict_share", "must be in [0, 1)"),
        (s.policy.reporter_rate_limit > 0, "policy.reporter_rate_limit", "must be > 0"),
        (s.policy.reporter_rate_window_s > 0, "policy.reporter_rate_window_s", "must be > 0"),
        (s.policy.reporter_probation_s >= 0, "policy.reporter_probation_s", "must be >= 0 (0 turns probation off)"),
        (s.policy.max_input_chars > 0, "policy.max_input_chars", "must be > 0"),
        (s.policy.max_equivalents >= 0, "policy.max_equivalents", "must be >= 0"),
        (
            s.policy.context_prefixes is None or 0 <= s.policy.context_prefixes <= 64,
            "policy.context_prefixes",
            "must be in 0..64 (0 turns it off; unset: 10 for a generator, 0 for a classifier)",
        ),
        (
            s.policy.context_chat_copies is None or 0 <= s.policy.context_chat_copies <= 64,
            "policy.context_chat_copies",
            "must be in 0..64 (0 turns it off; unset: the measured default for a generator with a chat template)",
        ),
        (s.policy.max_event_bytes > 0, "policy.max_event_bytes", "must be > 0"),
        (
            s.storage.root is None or "://" not in s.storage.root or bool(_STORAGE_URI.fullmatch(s.storage.root)),
            "storage.root",
            "must be a path, file://PATH or s3://BUCKET[/PREFIX] (bucket: 3-63 of a-z 0-9 . -)",
        ),
        (
            (s.storage.access_key_id is None) == (s.storage.secret_access_key is None),
            "storage.access_key_id",
            "and storage.secret_access_key are set together (or both left to the AWS SDK's chain)",
        ),
        (s.state.snapshot_every >= 0, "state.snapshot_every", "must be >= 0 (0: only at stops)"),
        (s.publish.interval_s > 0, "publish.interval_s", "must be > 0"),
        (s.publish.keep_versions >= 1, "publish.keep_versions", "must be >= 1 (LATEST is always kept)"),
        (0 <= s.health.port <= 65535, "health.port", "must be in 0..65535 (0 disables)"),
    ]
    for ok, key, message in rules:
        if not ok:
            section, _, name = key.partition(".")
            raise SettingsError(f"{key} = {_plain(getattr(getattr(s, section), name))!r}: {message}")


def _resolve(s: Settings, env: Mapping[str, str]) -> Settings:
    """Fill the defaults that depend on other values: state dir, storage root, database, group id."""
    home = Path(env["HOME"]) if env.get("HOME") else Path.home()
    state_dir = (s.state.dir or home / ".local" / "state" / "patchd").expanduser()
    root = s.storage.root or str(state_dir / "checkpoints")
    if "://" not in root:
        root = str(Path(root).expanduser())
    url = s.database.url or f"sqlite:///{state_dir / 'patchd.db'}"
    signing_key = s.publish.signing_key
    credentials = env.get("CREDENTIALS_DIRECTORY")  # systemd's LoadCredential= puts files here
    if signing_key is None and credentials and (Path(credentials) / "signing.key").is_file():
        signing_key = Path(credentials) / "signing.key"
    return replace(
        s,
        publish=replace(s.publish, signing_key=signing_key.expanduser() if signing_key else None),
        state=replace(s.state, dir=state_dir),
        storage=replace(s.storage, root=root, cache_dir=(s.storage.cache_dir or state_dir / "s3-cache").expanduser()),
        database=replace(s.database, url=url),
        kafka=replace(s.kafka, group_id=s.kafka.group_id or f"patchd-{s.model.name}"),
        model=replace(s.model, base=s.model.base or s.model.name),
    )


def _plain(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    if is_dataclass(value) and not isinstance(value, type):
        return {k: _plain(v) for k, v in asdict(value).items()}
    return value
