"""The model catalog and settings, read from TOML and validated with errors a person can act on."""

from __future__ import annotations

import difflib
import os
import re
import tomllib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

ENGINES = ("vllm", "sim")
RUNTIMES = ("process", "docker")
GPU_SOURCES = ("auto", "nvml", "virtual")
STRATEGIES = ("largest_first", "lru")
MODEL_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class ConfigError(ValueError):
    """A catalog that cannot be used; the message names the file, line and field."""


@dataclass(frozen=True)
class ModelSpec:
    """One model of the fixed catalog."""

    id: str
    name: str
    size_gb: float
    gpu_memory_gb: float
    engine: str = "sim"
    runtime: str = "process"
    path: str = ""
    args: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = ()
    image: str = "vllm/vllm-openai:latest"
    tensor_parallel_size: int = 1  # how many GPUs it spans; its footprint is split evenly over them
    sleep: bool = False
    pinned: bool = False
    gpus: tuple[int, ...] | None = None  # pinned to this device set (else the planner places it)


@dataclass(frozen=True)
class GpuSettings:
    """Where GPU memory figures come from; a virtual GPU has one or more devices of configured size."""

    source: str = "auto"
    total_gb: float | None = None  # all devices together (the sum of ``devices_gb``)
    devices_gb: tuple[float, ...] = ()  # one entry per device; ``total_gb`` alone means one device

    @property
    def device_count(self) -> int | None:
        """How many devices the config describes (None: known only once NVML is read)."""
        return len(self.devices_gb) or None


@dataclass(frozen=True)
class SwitchSettings:
    strategy: str = "largest_first"
    auto_unload: bool = True
    confirm_before_unload: bool = False
    preserve_models: tuple[str, ...] = ()
    stall_timeout_s: float = 120.0
    stop_timeout_s: float = 30.0
    health_interval_s: float = 2.0
    memory_release_timeout_s: float = 60.0
    host_ram_gb: float | None = None  # host RAM for sleeping models' weights (default: what is free)
    drain_timeout_s: float = 30.0  # before a stop or sleep: how long requests in flight may take to finish
    prewarm: bool = False  # while idle with room, load the model most likely asked next (never unloads for it)


@dataclass(frozen=True)
class ServerSettings:
    data_dir: str = "~/.local/share/smartswitch"
    switches_per_minute: int = 6
    max_body_bytes: int = 1_048_576
    switch_on_request: bool = False
    queue_timeout_s: float = 300.0  # how long a request may wait in the queue for its model (then 503)
    page_views_per_minute: int = 60  # dashboard pages one client may open a minute (each makes a session)


@dataclass(frozen=True)
class Config:
    models: dict[str, ModelSpec]
    gpu: GpuSettings = field(default_factory=GpuSettings)
    switching: SwitchSettings = field(default_factory=SwitchSettings)
    server: ServerSettings = field(default_factory=ServerSettings)
    source: str = "<memory>"

    @property
    def data_dir(self) -> Path:
        return Path(os.path.expanduser(self.server.data_dir))

    def model(self, model_id: str) -> ModelSpec:
        return self.models[model_id]


DEMO_CATALOG = "demo.toml"
MAX_DEVICES = 64


def demo_path() -> Path:
    """Path of the embedded default catalog."""
    return Path(str(resources.files("dashboard.catalogs").joinpath(DEMO_CATALOG)))


def embedded_catalogs() -> dict[str, Path]:
    """The catalogs shipped in ``dashboard/catalogs``, by bare name (``demo``, ``demo-4gpu``)."""
    folder = resources.files("dashboard.catalogs")
    return {Path(entry.name).stem: Path(str(entry)) for entry in folder.iterdir() if entry.name.endswith(".toml")}


def resolve_catalog(path: str | os.PathLike[str]) -> Path:
    """A file path as given, or, for a bare name that is no file here (``demo-4gpu``), the embedded catalog."""
    file = Path(path)
    if file.exists() or len(file.parts) != 1:
        return file
    return embedded_catalogs().get(file.name.removesuffix(".toml"), file)


def load_config(path: str | os.PathLike[str] | None = None) -> Config:
    """Read and validate a catalog file (the embedded demo when ``path`` is None; a bare name picks an
    embedded catalog)."""
    file = resolve_catalog(path) if path is not None else demo_path()
    try:
        text = file.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{file}: cannot read the config file ({exc.strerror})") from None
    return parse_config(text, str(file))


def parse_config(text: str, source: str = "<string>") -> Config:
    """Validate TOML text into a Config; raises ConfigError naming line and field."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: not valid TOML: {exc}") from None
    return _Reader(text, source).config(raw)


class _Reader:
    """Turns the raw TOML dict into typed settings, locating each error in the text."""

    def __init__(self, text: str, source: str) -> None:
        self.lines = text.splitlines()
        self.source = source

    def fail(self, table: str, key: str | None, message: str) -> ConfigError:
        line = self._line_of(table, key)
        where = f"{self.source}, line {line}" if line else self.source
        what = f"[{table}] {key}" if key else f"[{table}]"
        return ConfigError(f"{where}, {what}: {message}")

    def _line_of(self, table: str, key: str | None) -> int | None:
        header = re.compile(r"^\s*\[\s*" + r"\s*\.\s*".join(
            rf'(?:"{re.escape(part)}"|{re.escape(part)})' for part in table.split(".", 1)
        ) + r"\s*\]")
        start = next((i for i, line in enumerate(self.lines) if header.match(line)), None)
        if start is None:
            return None
        if key is None:
            return start + 1
        key_re = re.compile(rf'^\s*"?{re.escape(key)}"?\s*=')
        for i in range(start + 1, len(self.lines)):
            if self.lines[i].lstrip().startswith("["):
                break
            if key_re.match(self.lines[i]):
                return i + 1
        return start + 1

    def check_keys(self, table: str, raw: dict[str, Any], allowed: tuple[str, ...]) -> None:
        for key in raw:
            if key not in allowed:
                close = difflib.get_close_matches(key, allowed, n=1)
                hint = f" (did you mean '{close[0]}'?)" if close else f"; known fields: {', '.join(allowed)}"
                raise self.fail(table, key, f"unknown field{hint}")

    def number(self, table: str, raw: dict[str, Any], key: str, default: float | None,
               *, positive: bool = True) -> float | None:
        value = raw.get(key, default)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int | float) or (positive and value <= 0):
            kind = "a positive number" if positive else "a number"
            raise self.fail(table, key, f"must be {kind}, got {value!r}")
        return float(value)

    def boolean(self, table: str, raw: dict[str, Any], key: str, default: bool) -> bool:
        value = raw.get(key, default)
        if not isinstance(value, bool):
            raise self.fail(table, key, f"must be true or false, got {value!r}")
        return value

    def choice(self, table: str, raw: dict[str, Any], key: str, default: str, choices: tuple[str, ...]) -> str:
        value = raw.get(key, default)
        if value not in choices:
            raise self.fail(table, key, f"must be one of {', '.join(choices)}, got {value!r}")
        return str(value)

    def string(self, table: str, raw: dict[str, Any], key: str, default: str) -> str:
        value = raw.get(key, default)
        if not isinstance(value, str):
            raise self.fail(table, key, f"must be a string, got {value!r}")
        return value

    def strings(self, table: str, raw: dict[str, Any], key: str) -> tuple[str, ...]:
        value = raw.get(key, [])
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise self.fail(table, key, f"must be a list of strings, got {value!r}")
        return tuple(value)

    def table(self, raw: dict[str, Any], key: str) -> dict[str, Any]:
        value = raw.get(key, {})
        if not isinstance(value, dict):
            raise ConfigError(f"{self.source}: '{key}' must be a table like [{key}], got {value!r}")
        return value

    def config(self, raw: dict[str, Any]) -> Config:
        self.check_keys("top level", raw, ("models", "gpu", "switching", "server"))
        models_raw = self.table(raw, "models")
        if not models_raw:
            raise ConfigError(f"{self.source}: no models: add at least one [models.ID] table")
        models = {mid: self.model(mid, spec) for mid, spec in models_raw.items()}
        switching = self.switching(self.table(raw, "switching"), models)
        gpu = self.gpu(self.table(raw, "gpu"))
        self.check_placeable(models, gpu)
        return Config(
            models=models,
            gpu=gpu,
            switching=switching,
            server=self.server(self.table(raw, "server")),
            source=self.source,
        )

    def model(self, model_id: str, raw: Any) -> ModelSpec:
        table = f"models.{model_id}"
        if not MODEL_ID.match(model_id):
            raise self.fail(table, None, "a model id may use letters, digits, '.', '_' and '-' only")
        if not isinstance(raw, dict):
            raise ConfigError(f"{self.source}: models.{model_id} must be a table [models.{model_id}]")
        fields = ("name", "size_gb", "gpu_memory_gb", "engine", "runtime", "path", "args", "env",
                  "image", "tensor_parallel_size", "sleep", "pinned", "gpus")
        for key, value in raw.items():
            if isinstance(value, dict) and key not in ("env",):
                # [models.llama-3.1-8b] is read by TOML as nested tables "llama-3" -> "1-8b".
                dotted = f"{model_id}.{key}"
                raise ConfigError(f'{self.source}: model id "{dotted}" contains a dot: quote it, '
                                  f'as in [models."{dotted}"]')
        self.check_keys(table, raw, fields)
        for required in ("size_gb", "gpu_memory_gb"):
            if required not in raw:
                raise self.fail(table, None, f"missing field '{required}' (a positive number of GB)")
        engine = self.choice(table, raw, "engine", "sim", ENGINES)
        path = self.string(table, raw, "path", "")
        if engine == "vllm" and not path:
            raise self.fail(table, None, "missing field 'path' (the model directory vLLM loads)")
        env = raw.get("env", {})
        if not isinstance(env, dict) or not all(isinstance(v, str) for v in env.values()):
            raise self.fail(table, "env", f"must be a table of strings, got {env!r}")
        gpus = self.device_set(table, raw)
        # A pinned set says how many GPUs the model spans when tensor_parallel_size is left out.
        tp = raw.get("tensor_parallel_size", len(gpus) if gpus else 1)
        if isinstance(tp, bool) or not isinstance(tp, int) or tp < 1:
            raise self.fail(table, "tensor_parallel_size", f"must be a whole number >= 1, got {tp!r}")
        if gpus is not None and len(gpus) != tp:
            raise self.fail(table, "gpus", f"names {len(gpus)} GPU(s) but tensor_parallel_size is {tp}: "
                            "a model runs on exactly tensor_parallel_size GPUs")
        return ModelSpec(
            id=model_id,
            name=self.string(table, raw, "name", model_id),
            size_gb=self.number(table, raw, "size_gb", None) or 0.0,
            gpu_memory_gb=self.number(table, raw, "gpu_memory_gb", None) or 0.0,
            engine=engine,
            runtime=self.choice(table, raw, "runtime", "process", RUNTIMES),
            path=path,
            args=self.strings(table, raw, "args"),
            env=tuple(sorted(env.items())),
            image=self.string(table, raw, "image", "vllm/vllm-openai:latest"),
            tensor_parallel_size=tp,
            sleep=self.boolean(table, raw, "sleep", False),
            pinned=self.boolean(table, raw, "pinned", False),
            gpus=gpus,
        )

    def device_set(self, table: str, raw: dict[str, Any]) -> tuple[int, ...] | None:
        """``gpus = [2, 3]``: distinct device indices, or None when the planner is to choose."""
        if "gpus" not in raw:
            return None
        value = raw["gpus"]
        if (not isinstance(value, list) or not value
                or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value)):
            raise self.fail(table, "gpus", f"must be a list of GPU indices like [0, 1], got {value!r}")
        if len(set(value)) != len(value):
            raise self.fail(table, "gpus", f"names a GPU twice: {value!r}")
        return tuple(value)

    def gpu(self, raw: dict[str, Any]) -> GpuSettings:
        self.check_keys("gpu", raw, ("source", "total_gb", "devices_gb"))
        source = self.choice("gpu", raw, "source", "auto", GPU_SOURCES)
        total = self.number("gpu", raw, "total_gb", None)
        devices: tuple[float, ...] = ()
        if "devices_gb" in raw:
            value = raw["devices_gb"]
            if (not isinstance(value, list) or not value or len(value) > MAX_DEVICES or not all(
                    isinstance(v, int | float) and not isinstance(v, bool) and v > 0 for v in value)):
                raise self.fail("gpu", "devices_gb", "must be a list of positive numbers, one per GPU "
                                f"(at most {MAX_DEVICES}), like [80, 80], got {value!r}")
            if total is not None:
                raise self.fail("gpu", "devices_gb", "give either total_gb (one GPU) or devices_gb "
                                "(one entry per GPU), not both")
            devices = tuple(float(v) for v in value)
            total = sum(devices)
        elif total is not None:
            devices = (total,)
        if source == "virtual" and total is None:
            raise self.fail("gpu", None, "source = \"virtual\" needs total_gb (one GPU's memory in GB) "
                            "or devices_gb (one entry per GPU)")
        return GpuSettings(source=source, total_gb=total, devices_gb=devices)

    def check_placeable(self, models: dict[str, ModelSpec], gpu: GpuSettings) -> None:
        """Every model must have somewhere to go on the configured devices (NVML's are checked at start)."""
        count = gpu.device_count
        if count is None or gpu.source != "virtual":  # with auto, the configured sizes are only a fallback
            return
        for spec in models.values():
            table = f"models.{spec.id}"
            if spec.gpus is not None and max(spec.gpus) >= count:
                raise self.fail(table, "gpus", f"names GPU {max(spec.gpus)}, but [gpu] has {count} "
                                f"(indices 0 to {count - 1})")
            if spec.tensor_parallel_size > count:
                raise self.fail(table, "tensor_parallel_size", f"is {spec.tensor_parallel_size}, but [gpu] "
                                f"has only {count} GPU(s)")

    def switching(self, raw: dict[str, Any], models: dict[str, ModelSpec]) -> SwitchSettings:
        fields = ("strategy", "auto_unload", "confirm_before_unload", "preserve_models",
                  "stall_timeout_s", "stop_timeout_s", "health_interval_s", "memory_release_timeout_s",
                  "host_ram_gb", "drain_timeout_s", "prewarm")
        self.check_keys("switching", raw, fields)
        preserve = self.strings("switching", raw, "preserve_models")
        for model_id in preserve:
            if model_id not in models:
                raise self.fail("switching", "preserve_models", f"unknown model {model_id!r}")
        d = SwitchSettings()
        return SwitchSettings(
            strategy=self.choice("switching", raw, "strategy", d.strategy, STRATEGIES),
            auto_unload=self.boolean("switching", raw, "auto_unload", d.auto_unload),
            confirm_before_unload=self.boolean("switching", raw, "confirm_before_unload",
                                               d.confirm_before_unload),
            preserve_models=preserve,
            stall_timeout_s=self.number("switching", raw, "stall_timeout_s", d.stall_timeout_s) or 0,
            stop_timeout_s=self.number("switching", raw, "stop_timeout_s", d.stop_timeout_s) or 0,
            health_interval_s=self.number("switching", raw, "health_interval_s", d.health_interval_s) or 0,
            memory_release_timeout_s=self.number("switching", raw, "memory_release_timeout_s",
                                                 d.memory_release_timeout_s) or 0,
            host_ram_gb=self.number("switching", raw, "host_ram_gb", None, positive=False),
            drain_timeout_s=self.number("switching", raw, "drain_timeout_s", d.drain_timeout_s) or 0,
            prewarm=self.boolean("switching", raw, "prewarm", d.prewarm),
        )

    def server(self, raw: dict[str, Any]) -> ServerSettings:
        fields = ("data_dir", "switches_per_minute", "max_body_bytes", "switch_on_request", "queue_timeout_s",
                  "page_views_per_minute")
        self.check_keys("server", raw, fields)
        d = ServerSettings()
        per_minute = raw.get("switches_per_minute", d.switches_per_minute)
        if isinstance(per_minute, bool) or not isinstance(per_minute, int) or per_minute < 1:
            raise self.fail("server", "switches_per_minute", f"must be a whole number >= 1, got {per_minute!r}")
        page_views = raw.get("page_views_per_minute", d.page_views_per_minute)
        if isinstance(page_views, bool) or not isinstance(page_views, int) or page_views < 1:
            raise self.fail("server", "page_views_per_minute", f"must be a whole number >= 1, got {page_views!r}")
        max_body = raw.get("max_body_bytes", d.max_body_bytes)
        if isinstance(max_body, bool) or not isinstance(max_body, int) or max_body < 1024:
            raise self.fail("server", "max_body_bytes", f"must be a whole number >= 1024, got {max_body!r}")
        return ServerSettings(
            data_dir=self.string("server", raw, "data_dir", d.data_dir),
            switches_per_minute=per_minute,
            max_body_bytes=max_body,
            switch_on_request=self.boolean("server", raw, "switch_on_request", d.switch_on_request),
            queue_timeout_s=self.number("server", raw, "queue_timeout_s", d.queue_timeout_s) or 0,
            page_views_per_minute=page_views,
        )
