"""vLLM server output -> typed signals: a pure, defensive parser (formats drift between versions)."""

from __future__ import annotations

import re
from collections.abc import Iterable

from dashboard.engines import signals as sig

# `(APIServer pid=9438) INFO 11-28 18:03:52 [api_utils.py:347] message` — every part optional.
PREFIX = re.compile(
    r"^\s*(?:\((?P<proc>[\w:.-]+)(?: pid=\d+)?\)\s+)?"
    r"(?:(?P<level>DEBUG|INFO|WARNING|ERROR|CRITICAL)\s+\d\d-\d\d \d\d:\d\d:\d\d(?:\.\d+)?\s+"
    r"\[(?P<where>[^\]]*)\]\s?)?"
)
NUMBER = r"([0-9][0-9,]*(?:\.[0-9]+)?)"
UNIT_BYTES = {"gib": 1024**3, "gb": 10**9, "mib": 1024**2, "mb": 10**6, "tib": 1024**4, "tb": 10**12}

PATTERNS: list[tuple[re.Pattern[str], str]] = [
    (re.compile(r"Starting to load model"), "load_started"),
    (re.compile(rf"Checkpoint size:\s*{NUMBER}\s*(GiB|GB|MiB|MB|TiB|TB)", re.I), "checkpoint"),
    (re.compile(r"Loading [\w\s-]*checkpoint shards:.*?\|\s*(\d+)/(\d+)"), "shards"),
    (re.compile(rf"Loading weights took\s+{NUMBER}\s*s"), "weights"),
    (re.compile(rf"Model loading took\s+{NUMBER}\s*(GiB|GB)"), "model_memory"),
    (re.compile(rf"Loading model weights took\s+{NUMBER}\s*(GiB|GB)"), "model_memory"),
    (re.compile(rf"Available KV cache memory:\s*{NUMBER}\s*(GiB|GB)"), "kv_gib"),
    (re.compile(rf"(?:GPU|CPU|XPU|TPU)? ?KV cache size:\s*{NUMBER}\s*tokens"), "kv_tokens"),
    (re.compile(r"Capturing CUDA graphs?"), "graphs_start"),
    (re.compile(rf"Graph capturing finished in\s+{NUMBER}\s*secs?(?:, took\s+{NUMBER}\s*(GiB|GB))?"),
     "graphs_done"),
    (re.compile(rf"init engine \(profile, create kv cache, warmup model\) took\s+{NUMBER}\s*s"), "initialized"),
    (re.compile(r"Starting vLLM (?:API )?server on|Application startup complete\."), "server_up"),
]

FATAL = re.compile(
    r"OutOfMemoryError|CUDA out of memory|out of memory|"
    r"^Value error, |"
    r"EngineCore failed to start|Engine core initialization failed|EngineCore encountered a fatal error|"
    r"EngineDeadError|"
    r"^(?:[A-Za-z_][\w.]*\.)?[A-Z]\w*(?:Error|Exception): "
)
# Lines that mention errors without being one (config dumps, warnings). A client that went away mid-answer
# (a timed-out health probe, a closed tab) leaves a traceback in the engine's log: the engine goes on serving.
NOT_FATAL = re.compile(r"with config:|non-default args|^\[W\d|Warning|deprecat|"
                       r"BrokenPipeError|ConnectionResetError|ConnectionAbortedError|ClientDisconnect", re.I)
# Lines that never explain a failure: shutdown chatter, leak reports, the ASCII banner, links.
TAIL_NOISE = re.compile(r"^\[shutdown\]|^- |^nanobind|^See https?:|^For further information|"
                        r"resource_tracker|^INFO:|[█▄▀]")
TRACEBACK_NOISE = re.compile(r'^\s*(File "|\^+\s*$|Traceback \(most recent call last\)|warnings\.warn)|^\s{2,}\S')


def split_prefix(line: str) -> tuple[str, str | None]:
    """The line after the vLLM prefix (indentation kept), and the log level when there was one."""
    match = PREFIX.match(line)
    if match is None or not match.group(0).strip():
        return line.rstrip(), None
    return line[match.end():].rstrip(), match.group("level")


def strip_prefix(line: str) -> tuple[str, str | None]:
    """The message without the vLLM prefix or indentation, and the log level."""
    body, level = split_prefix(line)
    return body.strip(), level


def milestone_key(line: str) -> str | None:
    """The log statement a line came from (``Worker default_loader.py:501``), or None without a prefix."""
    match = PREFIX.match(line)
    if match is None or not match.group("where"):
        return None
    return f"{match.group('proc') or ''} {match.group('where')}".strip()


def _number(text: str) -> float:
    return float(text.replace(",", ""))


def parse_line(line: str) -> sig.EngineSignal | None:
    """One log line (no trailing newline) -> the signal it carries, or None."""
    message, level = strip_prefix(line)
    if not message:
        return None
    for pattern, kind in PATTERNS:
        match = pattern.search(message)
        if match is None:
            continue
        groups = match.groups()
        match kind:
            case "load_started":
                return sig.LoadStarted()
            case "checkpoint":
                return sig.CheckpointSize(int(_number(groups[0]) * UNIT_BYTES[groups[1].lower()]))
            case "shards":
                return sig.ShardProgress(int(groups[0]), int(groups[1]))
            case "weights":
                return sig.WeightsLoaded(_number(groups[0]))
            case "model_memory":
                return sig.ModelMemory(_number(groups[0]))
            case "kv_gib":
                return sig.KVCache(gib=_number(groups[0]))
            case "kv_tokens":
                return sig.KVCache(tokens=int(_number(groups[0])))
            case "graphs_start":
                return sig.GraphCapture(finished=False)
            case "graphs_done":
                return sig.GraphCapture(finished=True, gib=_number(groups[1]) if groups[1] else None)
            case "initialized":
                return sig.EngineInitialized(_number(groups[0]))
            case "server_up":
                return sig.ServerUp()
    if level in ("WARNING", "DEBUG", "INFO") or NOT_FATAL.search(message):
        return None
    if message.startswith("Value error, "):  # pydantic's reason, indented under the ValidationError
        return sig.EngineError(message.split(" [type=", 1)[0])
    if TRACEBACK_NOISE.match(split_prefix(line)[0]):
        return None
    if FATAL.search(message):
        return sig.EngineError(message)
    return None


def split_lines(buffer: str) -> tuple[list[str], str]:
    """Complete lines of accumulated output (split on \\n and tqdm's \\r) and the unfinished rest."""
    parts = re.split(r"\r\n|\r|\n", buffer)
    return [p for p in parts[:-1]], parts[-1]


def meaningful_tail(lines: Iterable[str], n: int = 5) -> tuple[str, ...]:
    """The last ``n`` lines that explain a failure: no blanks, traceback frames or warnings."""
    kept: list[str] = []
    for line in lines:
        body, level = split_prefix(line)
        message = body.strip()
        if message.startswith("Value error, "):
            kept.append(message.split(" [type=", 1)[0])
            continue
        if not message or level in ("WARNING", "DEBUG") or TRACEBACK_NOISE.match(body):
            continue
        if NOT_FATAL.search(message) or TAIL_NOISE.search(message):
            continue
        kept.append(message)
    return tuple(kept[-n:])
