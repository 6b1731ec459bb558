import pytest
import torch
from transformers import AutoModelForCausalLM

from kdforge.models.student import build_layer_student, uniform_layers

from .conftest import make_tiny


def test_uniform_layers_keep_first_and_last():
    assert uniform_layers(30, 8) == [0, 4, 8, 12, 17, 21, 25, 29]
    assert uniform_layers(4, 4) == [0, 1, 2, 3]
    assert uniform_layers(10, 2) == [0, 9]
    with pytest.raises(ValueError):
        uniform_layers(4, 5)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_student_with_all_layers_gives_teacher_logits_exactly(arch):
    teacher = make_tiny(arch, 300, layers=3)
    student = build_layer_student(teacher, [0, 1, 2])
    ids = torch.randint(0, 300, (2, 17))
    with torch.no_grad():
        assert torch.equal(teacher(ids).logits, student(ids).logits)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_depth_pruned_student_saves_and_loads_in_plain_transformers(arch, tmp_path):
    teacher = make_tiny(arch, 300, layers=4)
    student = build_layer_student(teacher, [0, 3])
    student.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.config.num_hidden_layers == 2
    # Layer 1 of the student is teacher layer 3.
    torch.testing.assert_close(loaded.model.layers[1].mlp.up_proj.weight, teacher.model.layers[3].mlp.up_proj.weight)
    ids = torch.randint(0, 300, (1, 9))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, student(ids).logits)
    if arch == "llama":
        assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
