"""Engine command lines: the model id is visible in `ps`, engines bind to 127.0.0.1, the GPU share is planned.

Engines carry a marker (instance, model) in their environment and are known by ``pid@create_time``.
"""

from dashboard.config import ModelSpec
from dashboard.engines.process import (
    INSTANCE_ENV,
    MODEL_ENV,
    engine_args,
    engine_command,
    engine_env,
    make_ref,
    parse_ref,
)

VLLM = ModelSpec(id="gpt-oss-20b", name="GPT-OSS-20B", size_gb=40, gpu_memory_gb=20, engine="vllm",
                 path="/models/gpt-oss-20b", args=("--max-model-len", "8192"), sleep=True, tensor_parallel_size=2)


def test_vllm_command_names_model_binds_loopback_and_takes_its_planned_share() -> None:
    command = engine_command(VLLM, 8100, gpu_total_gb=80)
    assert command[1:3] == ["-m", "vllm.entrypoints.openai.api_server"]
    text = " ".join(command)
    assert "--served-model-name gpt-oss-20b" in text and "--host 127.0.0.1" in text and "--port 8100" in text
    assert "--gpu-memory-utilization 0.250" in text
    assert "--tensor-parallel-size 2" in text and "--enable-sleep-mode" in text
    assert text.endswith("--max-model-len 8192")


def test_without_a_real_gpu_no_utilization_flag_is_passed() -> None:
    assert "--gpu-memory-utilization" not in engine_args(VLLM, 8100)


def test_sim_command_declares_size_and_footprint() -> None:
    sim = ModelSpec(id="m", name="M", size_gb=16, gpu_memory_gb=18, args=("--load-seconds", "5"))
    command = engine_command(sim, 9000)
    assert command[1:3] == ["-m", "dashboard.engines.sim"]
    assert command[3:] == ["--model-id", "m", "--host", "127.0.0.1", "--port", "9000", "--size-gb", "16",
                           "--gpu-memory-gb", "18", "--load-seconds", "5"]


def test_engines_carry_their_instance_and_model_and_never_an_inherited_marker(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv(INSTANCE_ENV, "/somewhere/else")  # e.g. a server started from inside an engine's shell
    sim = ModelSpec(id="m", name="M", size_gb=16, gpu_memory_gb=18, env=((MODEL_ENV, "forged"),))
    env = engine_env(sim, instance=str(tmp_path / "data"))
    assert env[INSTANCE_ENV] == str((tmp_path / "data").resolve()) and env[MODEL_ENV] == "m"
    unmarked = engine_env(ModelSpec(id="m", name="M", size_gb=16, gpu_memory_gb=18))
    assert INSTANCE_ENV not in unmarked and MODEL_ENV not in unmarked


def test_only_a_ref_with_a_start_time_can_confirm_a_process() -> None:
    assert parse_ref(make_ref(4242, 1795929538.931)) == (4242, 1795929538.93)
    for unconfirmable in ("4242", "pending", "", None, "x@1.0", "42@soon"):
        assert parse_ref(unconfirmable) is None
