"""Every recipe file loads through the real loader; halo.yaml is the built-in default; overrides and errors."""
from pathlib import Path

import pytest

from salaconvert.distill.recipe import RECIPES_DIR, Recipe, load_recipe
from salaconvert.errors import InputError

ALL = sorted(RECIPES_DIR.rglob("*.yaml"))


def test_the_recipes_folder_is_found_and_has_the_promised_files():
    names = {str(p.relative_to(RECIPES_DIR)) for p in ALL}
    assert {"halo.yaml", "halo-stage1.yaml", "debug/tiny.yaml", "debug/demo-cpu.yaml"} <= names


@pytest.mark.parametrize("path", ALL, ids=lambda p: str(p.relative_to(RECIPES_DIR)))
def test_every_recipe_loads_and_validates(path):
    by_path = load_recipe(str(path))
    by_name = load_recipe(str(path.relative_to(RECIPES_DIR).with_suffix("")))
    assert by_path.to_dict() == by_name.to_dict()
    assert any(by_path.stage(n).enabled for n in (1, 2, 3))
    assert load_recipe(_write(by_path)).to_dict() == by_path.to_dict()


def _write(recipe: Recipe) -> str:
    """A resolved recipe written out and read back is the same recipe (what --resume relies on)."""
    import tempfile

    f = Path(tempfile.mkdtemp()) / "resolved.yaml"
    f.write_text(recipe.to_yaml())
    return str(f)


def test_halo_yaml_is_the_builtin_default():
    assert load_recipe("halo").to_dict() == Recipe().to_dict()
    assert load_recipe(None).stage(1).num_steps() == -(-320_000_000 // (64 * 512))


def test_set_overrides_nested_fields_with_yaml_values():
    r = load_recipe("debug/tiny", ["stage2.lr=3e-5", "stage1.steps=2", "stage3.enabled=true", "data.shuffle=false"])
    assert r.stage2.lr == 3e-5 and r.stage1.steps == 2 and r.stage3.enabled and not r.data.shuffle


@pytest.mark.parametrize("override, words", [
    (["stage2.lrr=1"], "unknown key"),
    (["stage1.steps=many"], "stage1.steps"),
    (["stage1.trainable=everything"], "trainable"),
    (["stage2.micro_batch_size=3"], "micro_batch_size"),
    (["noequals"], "key=value"),
])
def test_bad_recipes_fail_with_one_line_naming_the_field(override, words):
    with pytest.raises(InputError, match=words) as e:
        load_recipe("debug/tiny", override)
    assert "\n" not in str(e.value)


def test_unknown_recipe_name_is_an_input_error():
    with pytest.raises(InputError, match="no such file"):
        load_recipe("no-such-recipe")


def test_fields_a_recipe_leaves_out_keep_that_stages_halo_defaults():
    halo, one = load_recipe("halo"), load_recipe("halo-stage1")
    assert one.stage1.micro_batch_size == halo.stage1.micro_batch_size == 4
    assert one.stage2.lr == halo.stage2.lr == 1e-4 and not one.stage2.enabled
    assert load_recipe("debug/tiny").stage3.trainable == "all" == halo.stage3.trainable
