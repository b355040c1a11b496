"""Logging: structlog key/value events, JSON lines on stdout (journald-friendly), a console view on a TTY.

One call, `configure_logging(cfg)`, sets up both structlog (our own events) and the stdlib root logger
(pyasic, aiomqtt and asyncio log there) so every line has the same shape:

    {"event": "tick", "level": "info", "component": "controller", "timestamp": "2025-01-01T00:00:00.000Z",
     "site_id": "demo", "tick": 8123, "n": 8123, "target_kw": 41200.0, ...}

- Per-component levels: `logging: {level: info, levels: {drivers: warning, mqtt: debug}}`; a component named
  `drivers.pyasic` follows `drivers` unless it has its own entry. Stdlib records use their logger name.
- pyasic logs on the ROOT logger (drivers/asic/vendor.py), so its records are recognised by their source path and
  kept only from WARNING up, whatever the configured level.
- Secrets never reach the log: a processor replaces values whose key names a secret (password, token, key,
  signature, ...) and hides passwords in URLs. A field named just `key` is hidden only when its value looks like
  key material: alarm and dispatch names stay readable.
- `site_id`, `tick` and `dispatch_id` travel in contextvars (`bind_context`), so any line logged while
  handling a tick or a dispatch carries them without passing them around.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Mapping, MutableMapping
from typing import Any, TextIO, cast

import structlog
import structlog.tracebacks
from structlog.typing import EventDict, FilteringBoundLogger, Processor, WrappedLogger

from hashflex.agent.config import LoggingConfig

LEVELS: dict[str, int] = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
    "critical": logging.CRITICAL,
}
REDACTED = "***"
_PYASIC_PATH = re.compile(r"[/\\]pyasic[/\\]")
# Libraries that log one line per request (pyasic's HTTP calls through httpx): kept from WARNING up unless
# `logging.levels` names them, or a 200-miner site's log is 90 % request lines.
_CHATTY_LIBRARIES = ("pyasic", "httpx", "httpcore")
# a name part that marks a secret value (checked on lowercase, split at non-alphanumerics and camelCase)
_SECRET_PARTS = frozenset(
    {
        "password",
        "passwd",
        "passphrase",
        "pwd",
        "secret",
        "token",
        "key",
        "apikey",
        "privkey",
        "signature",
        "credential",
        "credentials",
        "authorization",
        "cookie",
        "private",
    }
)
# ...unless the name ends like this: a key *file*, a key *id* or the list of public *keys* is not itself secret
_NOT_SECRET_SUFFIXES = frozenset({"file", "files", "path", "paths", "dir", "id", "ids", "keys", "count", "name"})
_URL_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<user>[^/\s:@]*):(?P<password>[^/\s@]+)@")
_CAMEL = re.compile(r"(?<=[a-z0-9])(?=[A-Z])")
_HANDLER_MARK = "_hashflex_handler"


# ------------------------------------------------------------------------------------------------ redaction
def is_secret_name(name: str) -> bool:
    """True for names like `password`, `mqtt_password`, `apiKey`, `private_key`, `signature`."""
    parts = [p for p in re.split(r"[^a-z0-9]+", _CAMEL.sub("_", name).lower()) if p]
    if not parts or parts[-1] in _NOT_SECRET_SUFFIXES:
        return False
    return any(p in _SECRET_PARTS for p in parts)


# A field named plainly `key` is as often a name (an alarm's, a dispatch's, a sort key) as a secret: it is hidden
# only when its value looks like key material (PEM, a long base64 or hex token), never when it is a lowercase name
# such as `store_unavailable` or `cannot_meet:PDU-3`. Qualified names (`private_key`, `api_key`) are always hidden.
_NAME_LIKE = re.compile(r"^[a-z][a-z0-9_]*(?::[A-Za-z0-9._-]+)*$")  # a lowercase kind, then `:`-separated ids
_HEX_TOKEN = re.compile(r"^[0-9a-fA-F]{32,}$")


def _hides(name: str, value: Any) -> bool:
    """True when the value under `name` must not reach the log."""
    if value is None or not is_secret_name(name):
        return False
    if name.lower() != "key":
        return True
    return not (isinstance(value, str) and len(value) <= 64 and _NAME_LIKE.match(value) and not _HEX_TOKEN.match(value))


def redact(value: Any, *, _depth: int = 0) -> Any:
    """A copy of `value` with secret-named entries replaced by `***` and URL passwords hidden."""
    if _depth > 6:
        return value
    if isinstance(value, Mapping):
        deeper = _depth + 1
        return {
            k: REDACTED if isinstance(k, str) and _hides(k, v) else redact(v, _depth=deeper) for k, v in value.items()
        }
    if isinstance(value, list | tuple):
        return type(value)(redact(v, _depth=_depth + 1) for v in value)
    if isinstance(value, str) and "@" in value:
        return _URL_USERINFO.sub(lambda m: f"{m['scheme']}{m['user']}:{REDACTED}@", value)
    return value


def redact_processor(_logger: WrappedLogger, _method: str, event_dict: EventDict) -> EventDict:
    for key, value in event_dict.items():
        if key.startswith("_") or key in ("event", "level", "timestamp", "component"):
            if key == "event" and isinstance(value, str):
                event_dict[key] = redact(value)
            continue
        event_dict[key] = REDACTED if _hides(key, value) else redact(value)
    return event_dict


# -------------------------------------------------------------------------------------- per-component levels
class ComponentLevels:
    """The level that applies to a component: its own entry, else its nearest dotted parent's, else the default."""

    def __init__(self, default: int, levels: Mapping[str, int]) -> None:
        self.default = default
        self.levels = dict(levels)
        self._cache: dict[str, int] = {}

    @property
    def floor(self) -> int:
        """The lowest level any component may log at: the fast filter in front of everything else."""
        return min([self.default, *self.levels.values()])

    def names(self, component: str) -> bool:
        """True when `logging.levels` has an entry for the component or one of its dotted parents."""
        name = component
        while name:
            if name in self.levels:
                return True
            name = name.rpartition(".")[0]
        return False

    def level_for(self, component: str | None) -> int:
        if not component:
            return self.default
        cached = self._cache.get(component)
        if cached is not None:
            return cached
        name, level = component, self.default
        while name:
            if name in self.levels:
                level = self.levels[name]
                break
            name = name.rpartition(".")[0]
        self._cache[component] = level
        return level

    def processor(self, _logger: WrappedLogger, _method: str, event_dict: EventDict) -> EventDict:
        level = LEVELS.get(str(event_dict.get("level", "info")), logging.INFO)
        if level < self.level_for(event_dict.get("component")):
            raise structlog.DropEvent
        return event_dict


class _StdlibFilter(logging.Filter):
    """Records from the stdlib side: pyasic (root logger, recognised by path) from WARNING up; others by name."""

    def __init__(self, levels: ComponentLevels) -> None:
        super().__init__()
        self.levels = levels

    def filter(self, record: logging.LogRecord) -> bool:
        name = "pyasic" if _PYASIC_PATH.search(record.pathname or "") else record.name
        record.hashflex_component = name
        level = self.levels.level_for(name)
        if name.partition(".")[0] in _CHATTY_LIBRARIES and not self.levels.names(name):
            level = max(logging.WARNING, level)
        return record.levelno >= level


def _component_from_record(_logger: WrappedLogger, _method: str, event_dict: EventDict) -> EventDict:
    record = event_dict.get("_record")
    if record is not None:
        event_dict.setdefault("component", getattr(record, "hashflex_component", record.name))
    return event_dict


# ------------------------------------------------------------------------------------------------- set-up
def configure_logging(
    cfg: LoggingConfig | None = None, *, force_json: bool | None = None, stream: TextIO | None = None
) -> None:
    """Set up structlog and the stdlib root logger. Safe to call again (tests, reload).

    `force_json`: True/False overrides `cfg.format`; None follows it ("auto" = console on a TTY, else JSON).
    `stream`: where lines go (default stdout, which journald captures under systemd).
    """
    cfg = cfg or LoggingConfig()
    # the process's own stdout and stderr are looked up at each line (`_Current`); any other stream is kept
    if stream is None or stream is sys.stdout:
        out = cast(TextIO, _Current("stdout"))  # (it has what loggers use of a stream)
    elif stream is sys.stderr:
        out = cast(TextIO, _Current("stderr"))
    else:
        out = stream
    if force_json is not None:
        as_json = force_json
    elif cfg.format == "auto":
        as_json = not _isatty(out)
    else:
        as_json = cfg.format == "json"
    levels = ComponentLevels(LEVELS[cfg.level], {k: LEVELS[v] for k, v in cfg.levels.items()})
    timestamper = structlog.processors.TimeStamper(fmt="iso", utc=True)
    renderer: Processor
    tail: list[Processor]
    # Tracebacks without frame locals: a local holding a password or a key would otherwise reach the log in
    # clear (the redaction above sees keys of the event, not the locals inside a rendered traceback).
    if as_json:
        renderer = structlog.processors.JSONRenderer(separators=(",", ":"))
        tracebacks = structlog.processors.ExceptionRenderer(
            structlog.tracebacks.ExceptionDictTransformer(show_locals=False)
        )
        tail = [tracebacks, renderer]
    else:
        renderer = structlog.dev.ConsoleRenderer(
            colors=_isatty(out),
            sort_keys=False,
            exception_formatter=structlog.dev.RichTracebackFormatter(show_locals=False),
        )
        tail = [renderer]

    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            levels.processor,
            timestamper,
            structlog.processors.StackInfoRenderer(),
            redact_processor,
            *tail,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(levels.floor),
        logger_factory=structlog.PrintLoggerFactory(file=out),
        # not cached: a reconfiguration (tests, SIGHUP) reaches loggers created at import time
        cache_logger_on_first_use=False,
    )

    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[
            structlog.contextvars.merge_contextvars,
            _component_from_record,
            structlog.stdlib.add_log_level,
            timestamper,
        ],
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, redact_processor, *tail],
    )
    handler = logging.StreamHandler(out)
    handler.setFormatter(formatter)
    handler.addFilter(_StdlibFilter(levels))
    setattr(handler, _HANDLER_MARK, True)
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, _HANDLER_MARK, False)]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(min(levels.floor, logging.WARNING))


class _Current:
    """Whatever `sys.stdout` (or `sys.stderr`) is when a line is written, not when logging was configured: a
    command run with its output captured (a test's CliRunner, an embedding program) replaces it for a while and
    then closes its stand-in, and a logger holding that object raised "I/O operation on closed file" at its next
    line, whoever logged it."""

    def __init__(self, name: str) -> None:
        self.name = name

    def _stream(self) -> TextIO:
        stream: TextIO = getattr(sys, self.name)
        return stream

    def write(self, text: str) -> int:
        return self._stream().write(text)

    def flush(self) -> None:
        self._stream().flush()

    def isatty(self) -> bool:
        return self._stream().isatty()


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def get_logger(component: str, **initial: Any) -> FilteringBoundLogger:
    """A logger whose lines carry `component=`; its level comes from `logging.levels` (dotted parents apply)."""
    logger: FilteringBoundLogger = structlog.get_logger(component=component, **initial)
    return logger


# ----------------------------------------------------------------------------------------- context (contextvars)
def bind_context(**values: Any) -> None:
    """Bind e.g. site_id=…, tick=…, dispatch_id=… to every line logged from this task/context onwards."""
    structlog.contextvars.bind_contextvars(**values)


def unbind_context(*keys: str) -> None:
    structlog.contextvars.unbind_contextvars(*keys)


def clear_context() -> None:
    structlog.contextvars.clear_contextvars()


bound_context = structlog.contextvars.bound_contextvars  # `with bound_context(dispatch_id=d.id): ...`


def context() -> MutableMapping[str, Any]:
    return structlog.contextvars.get_contextvars()
