from pathlib import Path

import pytest

from kdforge.config import (
    ConfigError,
    DemoConfig,
    DistillConfig,
    EvalConfig,
    GenerateConfig,
    LabelConfig,
    StudentConfig,
    build_config,
    parse_override,
)
from kdforge.export.config import ExportConfig, QuantizeConfig

CONFIGS = Path(__file__).parent.parent / "configs"
CLASSES = {"generate": GenerateConfig, "label": LabelConfig, "student": StudentConfig, "distill": DistillConfig,
           "eval": EvalConfig, "demo": DemoConfig, "export": ExportConfig, "quantize": QuantizeConfig}


def test_override_parsing():
    assert parse_override("distill.lr=1e-4") == ("distill.lr", 1e-4)
    assert parse_override("batch_size=8") == ("batch_size", 8)
    assert parse_override("model=embedded:smollm2-135m-instruct") == ("model", "embedded:smollm2-135m-instruct")
    assert parse_override("layers=[0, 3]") == ("layers", [0, 3])
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_override("nonsense")


def test_yaml_flags_and_set_precedence(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("generate:\n  model: a\n  batch_size: 4\n  max_new_tokens: 10\ndistill:\n  lr: 0.1\n")
    cfg = build_config(GenerateConfig, "generate", [str(f)], ["generate.max_new_tokens=20", "distill.lr=3"],
                       flags={"batch_size": 8, "seed": None})
    assert (cfg.model, cfg.batch_size, cfg.max_new_tokens, cfg.seed) == ("a", 8, 20, 0)


def test_unknown_field_names_field_and_source(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("distill:\n  teacher: t\n  student: s\n  data: d\n  temprature: 3\n")
    with pytest.raises(ConfigError) as e:
        build_config(DistillConfig, "distill", [str(f)])
    assert "distill.temprature: unknown field" in str(e.value) and str(f) in str(e.value)


def test_bad_value_and_missing_field():
    with pytest.raises(ConfigError, match=r"generate.batch_size: .*greater than 0"):
        build_config(GenerateConfig, "generate", overrides=["model=x", "batch_size=-1"])
    with pytest.raises(ConfigError, match=r"generate.model: required"):
        build_config(GenerateConfig, "generate")


def test_yaml_syntax_error_has_line(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("generate:\n  model: a\n  batch_size: [1\n")
    with pytest.raises(ConfigError, match=r"bad.yaml line \d+"):
        build_config(GenerateConfig, "generate", [str(f)])


def test_recipe_preset_and_sampling_rule():
    cfg = GenerateConfig(model="m", preset="recipe")
    assert cfg.do_sample and cfg.temperature == 0.7 and cfg.top_p == 0.9
    with pytest.raises(ValueError, match="num_samples > 1 needs sampling"):
        GenerateConfig(model="m", num_samples=2)


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_validate(path):
    from kdforge.config import read_yaml

    data = read_yaml(path)
    assert data, f"{path} is empty"
    for stage in data:
        assert stage in CLASSES, f"{path}: unknown section {stage}"
        build_config(CLASSES[stage], stage, [str(path)])


@pytest.mark.parametrize("stage", sorted(CLASSES))
def test_every_field_is_documented(stage):
    doc = (Path(__file__).parent.parent / "docs" / "configs.md").read_text(encoding="utf-8")
    section = doc.split(f"## `{stage}`", 1)[1].split("\n## ", 1)[0]
    for field in CLASSES[stage].model_fields:
        assert f"`{field}`" in section, f"docs/configs.md does not document {stage}.{field}"
