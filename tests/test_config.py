from pathlib import Path

import pytest

from kdforge.config import ConfigError, build_config, parse_override
from kdforge.stages.demo import DemoConfig
from kdforge.stages.distill import DistillConfig
from kdforge.stages.eval import EvalConfig
from kdforge.stages.export import ExportConfig, QuantizeConfig
from kdforge.stages.generate import GenerateConfig
from kdforge.stages.label import LabelConfig
from kdforge.stages.prefs import PrefsConfig
from kdforge.stages.student import StudentConfig

CONFIGS = Path(__file__).parent.parent / "configs"
CLASSES = {"generate": GenerateConfig, "label": LabelConfig, "student": StudentConfig, "distill": DistillConfig,
           "eval": EvalConfig, "demo": DemoConfig, "export": ExportConfig, "quantize": QuantizeConfig,
           "prefs": PrefsConfig}


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
    from kdforge.config import read_run_file

    data = read_run_file(path)  # ${name} references replaced by the file's vars
    assert data, f"{path} is empty"
    for stage in data:
        assert stage in CLASSES, f"{path}: unknown section {stage}"
        build_config(CLASSES[stage], stage, [str(path)])


def test_the_demo_is_one_shipped_file():
    """configs/demo.yaml is the run file inside the package (a link), and --quick only overrides it."""
    from kdforge.stages.demo import DemoConfig, demo_file, plan

    assert (CONFIGS / "demo.yaml").resolve() == demo_file().resolve()
    cfg = build_config(DemoConfig, "demo", [str(demo_file())], flags={"out": "/tmp/x"})
    full, quick = plan(cfg), plan(cfg, quick=True, overrides=["distill.max_steps=5"])
    assert [s.name for s, _ in full] == ["generate", "label", "student", "distill", "export", "eval"]
    by_name = {s.name: c for s, c in quick}
    assert by_name["distill"].max_steps == 5 and by_name["generate"].limit == 48  # --set wins over quick
    assert by_name["eval"].students[-1] == "/tmp/x/export/model-q8_0.gguf"
    student = {s.name: c for s, c in full}["student"]
    assert (student.num_layers, student.trim_vocab, student.trim_split) == (27, "/tmp/x/generate", "train")


def test_cli_flags_come_from_config_fields():
    """A flag's type, choices and help are its config field's; an absent flag does not override the YAML."""
    from kdforge.cli import build_parser
    from kdforge.stages import all_stages

    parser = build_parser()
    for stage in all_stages():
        for name in stage.flags:
            assert name in stage.config.model_fields, f"{stage.name}: flag {name} is not a config field"
    args = build_parser(defaults=False).parse_args(["generate", "m", "--preset", "recipe", "--limit", "3"])
    assert (args.preset, args.limit, args.batch_size) == ("recipe", 3, None)
    assert "{greedy,recipe}" in parser._subparsers._group_actions[0].choices["generate"].format_help()
    assert parser.parse_args(["label", "t", "--hidden-layers", "1,3"]).hidden_layers == [1, 3]
    assert parser.parse_args(["export", "m", "--no-check"]).check is False


def test_run_file_vars_and_unknown_sections(tmp_path):
    from kdforge.stages import plan_file

    f = tmp_path / "run.yaml"
    f.write_text("vars:\n  root: r\ngenerate:\n  model: m\n  out: ${root}/g\nstudent:\n  teacher: m\n"
                 "  out: ${root}/s\n")
    plan = plan_file(str(f), ["vars.root=elsewhere"])
    assert [(s.name, c.out) for s, c in plan] == [("generate", "elsewhere/g"), ("student", "elsewhere/s")]
    f.write_text("generate:\n  model: m\n  out: ${nowhere}/g\n")
    with pytest.raises(ConfigError, match=r"\$\{nowhere\} is not defined"):
        plan_file(str(f))
    f.write_text("generat:\n  model: m\n")
    with pytest.raises(ConfigError, match="unknown section"):
        plan_file(str(f))


@pytest.mark.parametrize("stage", sorted(CLASSES))
def test_every_field_is_documented(stage):
    doc = (Path(__file__).parent.parent / "docs" / "configs.md").read_text(encoding="utf-8")
    section = doc.split(f"## `{stage}`", 1)[1].split("\n## ", 1)[0]
    for field in CLASSES[stage].model_fields:
        assert f"`{field}`" in section, f"docs/configs.md does not document {stage}.{field}"


def test_nested_set_reaches_a_nested_field_and_not_another_stage():
    """`--set distributed.strategy=fsdp` sets the nested field (it was once dropped silently as "another stage's");
    `--set student.num_layers=8` is the student stage's even though distill has a `student` field."""
    from kdforge.stages.distill import DistillConfig

    base = {"student": "s", "data": "d.jsonl", "labels": "l"}
    cfg = build_config(DistillConfig, "distill", overrides=["distributed.strategy=fsdp", "lora.r=4",
                                                           "student.num_layers=8", "distill.lr=1e-4"],
                       flags=base, sections=["student", "distill"])
    assert cfg.distributed.strategy == "fsdp" and cfg.distributed.teacher == "auto"
    assert cfg.lora.r == 4 and cfg.lora.alpha == 16.0
    assert cfg.student == "s" and cfg.lr == 1e-4
