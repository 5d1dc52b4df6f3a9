"""``watch``'s configuration: the command line over ``/etc/espfix-inspect/watch.conf``.

The file is ``key = value`` lines (``#`` comments, blank lines ignored); its keys are the
fields of :class:`WatchConfig`.  Every value is checked where it is read, and a bad one
names the file and the line.  ``SIGHUP`` re-reads it (``inspector.watch``); a bad file
then keeps the old configuration.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

from .errors import InspectError
from .fileio import open_regular, read_bounded
from .target import KCORE_PATH

__all__ = ["WatchConfig", "FILE_KEYS", "read_config", "build_config", "DEFAULT_CONFIG"]

DEFAULT_CONFIG = "/etc/espfix-inspect/watch.conf"
#: watch.conf is a handful of key = value lines.
MAX_CONFIG = 1 << 20


@dataclass
class WatchConfig:
    """What one watch runs with.  Keys of the config file are these field names."""
    interval: float = 10.0
    count: int | None = None            # rounds to run (interval rounds; None = forever)
    core: str = KCORE_PATH
    symbols: str | None = None
    textfile: str | None = None         # node_exporter textfile-collector directory
    json: bool = False
    frames: bool = True                 # compare ministack frames between rounds
    hotplug: str = "auto"               # auto (uevents, else poll), poll, off

    def changes(self, other: WatchConfig) -> dict[str, list]:
        return {f.name: [getattr(self, f.name), getattr(other, f.name)] for f in fields(self)
                if getattr(self, f.name) != getattr(other, f.name)}


FILE_KEYS = ("interval", "core", "symbols", "textfile", "json", "frames", "hotplug")
_TRUE, _FALSE = ("yes", "true", "on", "1"), ("no", "false", "off", "0")


def _check_value(key: str, value: str, where: str):
    if key == "interval":
        try:
            v = float(value)
        except ValueError:
            v = -1.0
        if not 0.1 <= v <= 86400:
            raise InspectError(f"{where}: interval = {value!r} is not a number of seconds "
                               "in 0.1..86400", "fix the value")
        return v
    if key in ("json", "frames"):
        if value.lower() in _TRUE:
            return True
        if value.lower() in _FALSE:
            return False
        raise InspectError(f"{where}: {key} = {value!r} is not yes or no", "fix the value")
    if key == "hotplug":
        if value not in ("auto", "poll", "off"):
            raise InspectError(f"{where}: hotplug = {value!r}", "use auto, poll or off")
        return value
    if key in ("symbols", "textfile"):
        return value or None
    if key == "core":
        if not value:
            raise InspectError(f"{where}: core is empty", "give a path, e.g. /proc/kcore")
        return value
    raise InspectError(f"{where}: unknown key {key!r}", f"use {', '.join(FILE_KEYS)}")


def build_config(config_path: str | None, overrides: dict, count: int | None = None) -> WatchConfig:
    """The config file's values (if any) under *overrides* (the command line's)."""
    values = read_config(config_path) if config_path is not None else {}
    values.update(overrides)
    return replace(WatchConfig(count=count), **values)


def read_config(path: str) -> dict:
    """Parse a ``key = value`` file (``#`` comments, blank lines ignored) into
    checked values.  Raises InspectError naming the file and line."""
    fix = "create it (see contrib/watch.conf) or drop --config"
    try:
        with open_regular(path, "config file", fix) as f:
            lines = read_bounded(f, path, "config file", MAX_CONFIG).decode("utf-8").splitlines()
    except PermissionError:
        raise InspectError(f"permission denied reading config file {path}",
                           "make it readable for this user") from None
    except (OSError, UnicodeDecodeError) as e:
        raise InspectError(f"cannot read config file {path}: {getattr(e, 'strerror', e)}",
                           "make it a readable UTF-8 text file") from None
    out: dict = {}
    for n, raw in enumerate(lines, 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        key, sep, value = line.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not key:
            raise InspectError(f"{path}:{n}: expected key = value, got {raw.strip()!r}",
                               "fix the line")
        out[key] = _check_value(key, value, f"{path}:{n}")
    return out
