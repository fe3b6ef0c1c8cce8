"""Engines as Docker containers (docker SDK): labelled, port bound to 127.0.0.1, logs into the parser.

Identity is by label: a container is only watched, stopped or killed when it carries this
orchestrator's instance label and this model's label, whatever id the database remembered.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

import docker
from docker.errors import DockerException, ImageNotFound, NotFound
from docker.types import DeviceRequest

from dashboard.config import ModelSpec
from dashboard.engines.base import API_KEY_ENV, Engine, configured_api_key
from dashboard.engines.process import engine_args, instance_marker

LABEL_MODEL = "smartswitch.model"
LABEL_INSTANCE = "smartswitch.instance"


class DockerUnavailable(RuntimeError):
    """The Docker daemon cannot be reached or the image is missing: said so plainly."""


class NotOurContainer(DockerUnavailable):
    """The remembered container id now names a container without this engine's labels."""


def docker_client() -> docker.DockerClient:
    try:
        client = docker.from_env(timeout=30)
        client.ping()
        return client
    except DockerException as exc:
        raise DockerUnavailable(f"The Docker daemon is not reachable ({exc}). Start it (dockerd) "
                                "or set DOCKER_HOST.") from None


class DockerEngine(Engine):
    """A model served from a container; ``ref`` is the container id."""

    runtime = "docker"

    def __init__(self, spec: ModelSpec, port: int, *, instance: str, container_id: str | None = None,
                 gpu_total_gb: float | None = None, devices: tuple[int, ...] | None = None,
                 **kwargs: float) -> None:
        super().__init__(spec, port, **kwargs)
        self.instance = instance_marker(instance)
        self.container_id = container_id
        self.gpu_total_gb = gpu_total_gb  # memory of its devices together; set only for real GPUs
        self.devices = devices
        self._container: Any = None
        self._exit_seen = False
        self._logs_ended = asyncio.Event()  # Docker ends the log stream once the container's output is all sent

    @property
    def ref(self) -> str:
        return self.container_id or ""

    def labels(self) -> dict[str, str]:
        return {LABEL_MODEL: self.spec.id, LABEL_INSTANCE: self.instance}

    def container(self) -> Any:
        """This engine's container; raises NotFound when gone, NotOurContainer when the labels differ."""
        if self._container is None:
            if not self.container_id:
                raise DockerUnavailable("no container")
            container = docker_client().containers.get(self.container_id)
            labels = container.labels or {}
            if not self.instance or any(labels.get(k) != v for k, v in self.labels().items()):
                raise NotOurContainer(f"container {self.container_id[:12]} is not {self.spec.id} of this instance")
            self._container = container
        return self._container

    async def _spawn(self) -> None:
        await asyncio.to_thread(self._run_container)

    def run_options(self) -> dict[str, Any]:
        """What ``docker run`` is given for this engine (labels, loopback port, its GPUs)."""
        spec = self.spec
        # Inside the container the engine listens on all interfaces; the host side is 127.0.0.1 only.
        args = engine_args(spec, self.port, host="0.0.0.0", gpu_total_gb=self.gpu_total_gb, devices=self.devices)
        options: dict[str, Any] = {
            "command": args, "detach": True, "name": f"smartswitch-{spec.id}-{self.port}",
            "labels": self.labels(),
            "ports": {f"{self.port}/tcp": ("127.0.0.1", self.port)},
            # The engine's secret last, so the catalog's env cannot replace it (see Engine.auth_headers).
            "environment": {**dict(spec.env), "PYTHONUNBUFFERED": "1",
                            **({API_KEY_ENV: self.secret} if self.secret else {})},
        }
        if spec.engine == "vllm" and spec.path:
            options["volumes"] = {spec.path: {"bind": spec.path, "mode": "ro"}}
        if self.gpu_total_gb:
            # Exactly its devices, by NVML index; inside, the runtime shows them as 0..n-1.
            request = (DeviceRequest(device_ids=[str(d) for d in self.devices], capabilities=[["gpu"]])
                       if self.devices else DeviceRequest(count=-1, capabilities=[["gpu"]]))
            options["device_requests"] = [request]
            options["ipc_mode"] = "host"  # vLLM's workers share memory
        return options

    def _run_container(self) -> None:
        client = docker_client()
        spec = self.spec
        options = self.run_options()
        on_gpus = f" on GPU(s) {', '.join(map(str, self.devices))}" if self.devices and self.gpu_total_gb else ""
        try:
            client.images.get(spec.image)  # never pull implicitly: a switch must not start a download
            container = client.containers.create(spec.image, **options)
        except ImageNotFound:
            raise DockerUnavailable(f"The image {spec.image!r} is not on this machine: pull or build it "
                                    f"(docker pull {spec.image}).") from None
        except DockerException as exc:
            raise DockerUnavailable(f"Docker could not start {spec.id}{on_gpus}: {exc}") from None
        try:
            container.start()
        except DockerException as exc:
            # Created but never started (no GPU runtime, a port taken): nothing of it is left behind.
            with contextlib.suppress(DockerException):
                container.remove(force=True)
            raise DockerUnavailable(f"Docker could not start {spec.id}{on_gpus}: {exc}") from None
        self._container = container
        self.container_id = container.id

    async def _output(self, from_start: bool) -> AsyncIterator[str]:
        loop = asyncio.get_running_loop()
        inbox: asyncio.Queue[str | None] = asyncio.Queue()
        since = None if from_start else int(time.time())

        def follow() -> None:
            # The SDK's log stream blocks; a daemon thread hands chunks to the loop.
            try:
                for chunk in self.container().logs(stream=True, follow=True, since=since):
                    loop.call_soon_threadsafe(inbox.put_nowait, chunk.decode(errors="replace"))
            except Exception:  # the container went away: its exit is reported by _wait_exit
                pass
            finally:
                if not loop.is_closed():
                    loop.call_soon_threadsafe(inbox.put_nowait, None)

        threading.Thread(target=follow, name=f"{self.spec.id}-logs", daemon=True).start()
        while (chunk := await inbox.get()) is not None:
            yield chunk
        self._logs_ended.set()
        while True:  # no more output: stay quiet, as a process whose log ended would
            await asyncio.sleep(3600)

    async def _output_caught_up(self) -> None:
        if self._exit_seen:  # while it runs the stream never ends: nothing to wait for
            await self._logs_ended.wait()

    def _running_secret(self) -> str | None:
        try:
            env = self.container().attrs.get("Config", {}).get("Env") or []
        except (NotFound, DockerUnavailable):
            return configured_api_key(self.spec.args)
        values = dict(item.partition("=")[::2] for item in env)
        return values.get(API_KEY_ENV) or None

    def _state(self) -> dict[str, Any]:
        try:
            container = self.container()
            container.reload()
            return dict(container.attrs.get("State", {}))
        except (NotFound, DockerUnavailable):
            return {"Status": "removed", "ExitCode": None}

    def alive(self) -> bool:
        return self._state().get("Status") == "running"  # _state() only looks at a container with our labels

    async def _wait_exit(self) -> int | None:
        """Docker's own wait (no polling), on a daemon thread: a container still running never holds up exit."""
        try:
            container_id = self.container().id
        except (NotFound, DockerUnavailable):
            return None
        loop = asyncio.get_running_loop()
        ended: asyncio.Future[int | None] = loop.create_future()

        def settle(code: int | None) -> None:
            if not ended.done():
                ended.set_result(code)

        def wait() -> None:
            code: int | None = None
            try:
                # timeout=None: the request waits as long as the container runs (the client's 30 s would not).
                code = docker_client().api.wait(container_id, timeout=None).get("StatusCode")
            except Exception:  # removed meanwhile or daemon gone: over, with no code to tell
                code = None
            finally:
                with contextlib.suppress(RuntimeError):  # the loop closed meanwhile: nobody is waiting
                    loop.call_soon_threadsafe(settle, code)

        threading.Thread(target=wait, name=f"{self.spec.id}-wait", daemon=True).start()
        code = await ended
        self._exit_seen = True
        return code

    def pids(self) -> tuple[int, ...]:
        try:
            top = self.container().top()
            column = top["Titles"].index("PID")
            return tuple(int(row[column]) for row in top["Processes"])
        except Exception:  # stopped or removed: no processes
            return ()

    async def _terminate(self, timeout: float) -> None:
        def stop() -> None:
            try:
                container = self.container()
                container.stop(timeout=int(max(timeout, 1)))
                container.remove(force=True)
            except (NotFound, DockerUnavailable):
                pass
        await asyncio.to_thread(stop)

    async def _kill(self) -> None:
        def kill() -> None:
            with contextlib.suppress(NotFound, DockerUnavailable):
                self.container().remove(force=True)  # force: SIGKILL, then remove
        await asyncio.to_thread(kill)

    # _kill_rest: nothing to do, a container ends with its main process.


def sweep(instance: str, keep: set[str]) -> list[str]:
    """Remove this instance's labelled containers that nobody adopted; returns their model ids."""
    marker = instance_marker(instance)
    if not marker:
        return []
    try:
        client = docker_client()
    except DockerUnavailable:
        return []
    removed = []
    for container in client.containers.list(all=True, filters={"label": f"{LABEL_INSTANCE}={marker}"}):
        if container.id not in keep:
            container.remove(force=True)
            removed.append(container.labels.get(LABEL_MODEL, "?"))
    return removed
