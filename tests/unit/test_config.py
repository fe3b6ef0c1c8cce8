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
