"""A catalog with a typo fails at start naming the file, the line and the field."""

import pytest

from dashboard.config import ConfigError, load_config, parse_config

GOOD = """
[gpu]
source = "virtual"
total_gb = 80

[models.small]
size_gb = 16
gpu_memory_gb = 18
"""


def test_demo_catalog_has_the_seed_models_on_a_virtual_gpu() -> None:
    config = load_config()
    assert {"gpt-oss-120b", "gpt-oss-20b", "deepseek-coder-33b-instruct"} <= set(config.models)
    assert 5 <= len(config.models) <= 6
    big = config.models["gpt-oss-120b"]
    assert (big.size_gb, big.gpu_memory_gb) == (183, 84)
    assert (config.models["gpt-oss-20b"].size_gb, config.models["gpt-oss-20b"].gpu_memory_gb) == (40, 20)
    assert config.models["deepseek-coder-33b-instruct"].gpu_memory_gb == 43
    assert (config.gpu.source, config.gpu.total_gb) == ("virtual", 95.9)
    assert all(m.engine == "sim" for m in config.models.values())


def test_minimal_config_gets_defaults() -> None:
    config = parse_config(GOOD)
    assert config.switching.strategy == "largest_first"
    assert config.models["small"].name == "small"


@pytest.mark.parametrize(("change", "expected"), [
    (("gpu_memory_gb = 18", 'gpu_memory_gb = "18GB"'),
     'x.toml, line 8, [models.small] gpu_memory_gb: must be a positive number, got \'18GB\''),
    (("gpu_memory_gb = 18", "gpu_mem_gb = 18"),
     "x.toml, line 8, [models.small] gpu_mem_gb: unknown field (did you mean 'gpu_memory_gb'?)"),
    (("size_gb = 16\n", ""), "missing field 'size_gb'"),
    (('source = "virtual"', 'source = "cuda"'), "line 3, [gpu] source: must be one of auto, nvml, virtual"),
    (("[models.small]", "[models.small-3.1]"), 'quote it, as in [models."small-3.1"]'),
    (("total_gb = 80", "total_gb = "), "x.toml: not valid TOML"),
    (("total_gb = 80", ""), "source = \"virtual\" needs total_gb"),
])
def test_config_errors_name_line_and_field(change: tuple[str, str], expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(GOOD.replace(*change), "x.toml")
    assert expected in str(info.value)


def test_missing_file_is_a_clear_error(tmp_path) -> None:
    with pytest.raises(ConfigError, match="cannot read the config file"):
        load_config(tmp_path / "nope.toml")


def test_preserve_models_must_name_catalog_models() -> None:
    with pytest.raises(ConfigError, match=r"preserve_models: unknown model 'ghost'"):
        parse_config(GOOD + '\n[switching]\npreserve_models = ["ghost"]\n', "x.toml")


FOUR = """
[gpu]
source = "virtual"
devices_gb = [80, 80, 48, 48]

[models.wide]
size_gb = 140
gpu_memory_gb = 150
tensor_parallel_size = 2

[models.fixed]
size_gb = 16
gpu_memory_gb = 18
gpus = [2, 3]
"""


def test_devices_gb_describes_each_gpu_and_total_gb_stays_one_device() -> None:
    config = parse_config(FOUR)
    assert config.gpu.devices_gb == (80, 80, 48, 48) and config.gpu.total_gb == 256
    assert config.models["wide"].tensor_parallel_size == 2 and config.models["wide"].gpus is None
    # A pinned set says how many GPUs the model spans.
    assert (config.models["fixed"].gpus, config.models["fixed"].tensor_parallel_size) == ((2, 3), 2)
    single = parse_config(GOOD)
    assert (single.gpu.total_gb, single.gpu.devices_gb) == (80, (80,))


@pytest.mark.parametrize(("change", "expected"), [
    (("devices_gb = [80, 80, 48, 48]", "devices_gb = [80, 80, 48, 48]\ntotal_gb = 256"),
     "[gpu] devices_gb: give either total_gb (one GPU) or devices_gb (one entry per GPU), not both"),
    (("devices_gb = [80, 80, 48, 48]", 'devices_gb = [80, "80GB"]'),
     "line 4, [gpu] devices_gb: must be a list of positive numbers, one per GPU"),
    (("devices_gb = [80, 80, 48, 48]", "devices_gb = []"), "[gpu] devices_gb: must be a list of positive numbers"),
    (("gpus = [2, 3]", "gpus = [2, 2]"), "[models.fixed] gpus: names a GPU twice"),
    (("gpus = [2, 3]", "gpus = [3, 4]"), "[models.fixed] gpus: names GPU 4, but [gpu] has 4 (indices 0 to 3)"),
    (("gpus = [2, 3]", 'gpus = "2,3"'), "[models.fixed] gpus: must be a list of GPU indices like [0, 1]"),
    (("gpus = [2, 3]", "gpus = [2, 3]\ntensor_parallel_size = 1"),
     "[models.fixed] gpus: names 2 GPU(s) but tensor_parallel_size is 1"),
    (("tensor_parallel_size = 2", "tensor_parallel_size = 8"),
     "[models.wide] tensor_parallel_size: is 8, but [gpu] has only 4 GPU(s)"),
    (("devices_gb = [80, 80, 48, 48]", ""),
     "source = \"virtual\" needs total_gb (one GPU's memory in GB) or devices_gb"),
])
def test_device_errors_name_the_field(change: tuple[str, str], expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(FOUR.replace(*change), "x.toml")
    assert expected in str(info.value)


def test_a_bare_catalog_name_is_the_embedded_catalog(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)  # no file of that name here
    config = load_config("demo-4gpu")
    assert config.gpu.devices_gb == (80, 80, 80, 80)
    assert sorted(m.tensor_parallel_size for m in config.models.values())[-1] == 2
    assert any(m.tensor_parallel_size == 1 for m in config.models.values())
    assert load_config("demo.toml").gpu.total_gb == 95.9
    (tmp_path / "demo-4gpu").write_text(GOOD)  # a file of that name here wins
    assert load_config("demo-4gpu").gpu.total_gb == 80
    with pytest.raises(ConfigError, match="cannot read the config file"):
        load_config("no-such-catalog")
