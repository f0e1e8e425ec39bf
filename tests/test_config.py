"""Config: typed recipes, dotted overrides, and one-line errors naming the key (exit code 2 in the CLI)."""

import pytest

from jaxfound.cli import main
from jaxfound.config import CONFIG_DIR, VERB_KEYS, Config, load_config, parse_override, to_dict
from jaxfound.errors import JaxfoundError


def test_default_recipe_loads_with_required_keys():
    cfg = load_config()
    assert cfg.model.arch == "bert" and cfg.train.task == "mlm"
    for section, key in [("run", "dir"), ("train", "steps"), ("train", "log_every"), ("train", "seed"),
                         ("train", "batch_size"), ("checkpoint", "every"), ("mesh", "data"), ("mesh", "fsdp"),
                         ("mesh", "tensor"), ("data", "path")]:
        assert hasattr(getattr(cfg, section), key)


def test_overrides_are_typed():
    cfg = load_config(None, ["train.steps=40", "train.lr=5e-3", "data.path=corpus.txt", "model.remat=true"])
    assert cfg.train.steps == 40 and cfg.train.lr == 0.005 and cfg.data.path == "corpus.txt"
    assert cfg.model.remat == "full"  # an earlier config's boolean, read as a policy


@pytest.mark.parametrize("override, message", [
    ("train.stepz=3", "unknown key 'train.stepz'"),
    ("trian.steps=3", "unknown section 'trian'"),
    ("train.steps=many", "'train.steps' must be int"),
    ("model.arch=lstm", "allowed: bert, roberta, gpt, llama"),
    ("train.steps", "expected section.key=value"),
])
def test_bad_override_names_the_key(override, message):
    with pytest.raises(JaxfoundError, match=message):
        load_config(None, [override])


def test_bad_yaml_names_file_and_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  steps: 3\n  lr: [1,\n")
    with pytest.raises(JaxfoundError, match=r"bad.yaml:\d+: invalid YAML"):
        load_config(bad)


def test_parse_override_reads_yaml_scalars():
    assert parse_override("mesh.data=-1") == (["mesh", "data"], -1)
    assert parse_override("data.path=none") == (["data", "path"], "none")
    assert parse_override("data.tokenizer=null") == (["data", "tokenizer"], None)


def test_every_recipe_is_valid():
    recipes = sorted(p for p in CONFIG_DIR.glob("*.yaml") if not p.name.startswith("merge_"))  # merge: mergekit
    assert recipes
    for path in recipes:
        load_config(path)
        assert path.read_text().startswith("#"), f"{path.name} should open with the command that runs it"


PRETRAIN_RECIPES = sorted(p.name for p in CONFIG_DIR.glob("*.yaml") if p.name.endswith(("_mlm.yaml", "_clm.yaml")))
FINETUNE_RECIPES = ["ner_conll03.yaml", "cls_tiny.yaml", "sft_smollm2_lora.yaml"]


def test_every_recipe_has_a_verb():
    recipes = {p.name for p in CONFIG_DIR.glob("*.yaml") if not p.name.startswith("merge_")}
    assert PRETRAIN_RECIPES and recipes == set(PRETRAIN_RECIPES) | set(FINETUNE_RECIPES)


@pytest.mark.parametrize("name, verb", [(n, v) for n in PRETRAIN_RECIPES for v in ("pretrain", "bench")]
                         + [(n, "finetune") for n in FINETUNE_RECIPES])
def test_recipe_loads_for_its_verb(name, verb):
    load_config(CONFIG_DIR / name, verb=verb)


def test_verb_keys_name_real_keys():
    sections = to_dict(Config())
    for verb, table in VERB_KEYS.items():
        assert set(table) == set(sections), verb
        for section, keys in table.items():
            assert set(keys) <= set(sections[section]), (verb, section)
    # bench measures a recipe's own model: everything pretrain takes but model.init
    assert VERB_KEYS["bench"] == {**VERB_KEYS["pretrain"],
                                  "model": tuple(k for k in VERB_KEYS["pretrain"]["model"] if k != "init")}


def test_finetune_rejects_train_steps_naming_verb_and_keys():
    with pytest.raises(JaxfoundError) as e:
        load_config(CONFIG_DIR / "ner_conll03.yaml", ["train.steps=300"], verb="finetune")
    msg = str(e.value)
    assert "\n" not in msg and "ner_conll03.yaml + overrides" in msg
    assert "'train.steps'" in msg and "`jaxfound finetune`" in msg and "epochs" in msg


@pytest.mark.parametrize("recipe, override, verb", [
    ("ner_conll03.yaml", "train.steps=300", "finetune"),
    ("ner_conll03.yaml", "train.eval_every=5", "finetune"),
    ("ner_conll03.yaml", "data.path=corpus.txt", "finetune"),
    ("bert_tiny_mlm.yaml", "train.epochs=2", "pretrain"),
    ("bert_tiny_mlm.yaml", "model.init=x", "bench"),
    ("bert_tiny_mlm.yaml", "train.freeze=trunk", "bench"),
    ("bert_tiny_mlm.yaml", "data.train=x.txt", "bench"),
])
def test_key_the_verb_ignores_is_an_error(recipe, override, verb):
    key = override.partition("=")[0]
    with pytest.raises(JaxfoundError, match=f"key '{key}' is not used by `jaxfound {verb}`"):
        load_config(CONFIG_DIR / recipe, [override], verb=verb)
    load_config(CONFIG_DIR / recipe, [override])  # verb=None: the union config takes every key


def test_verb_check_reads_the_file_not_the_defaults(tmp_path):
    recipe = tmp_path / "ft.yaml"
    recipe.write_text("train:\n  task: pos\n  steps: 10\n")
    with pytest.raises(JaxfoundError, match=r"ft.yaml: key 'train.steps' .*train keys it takes: task, epochs"):
        load_config(recipe, verb="finetune")
    assert load_config(recipe).train.task == "pos"  # defaults (train.steps=300 for finetune) are never checked
    assert load_config(CONFIG_DIR / "ner_conll03.yaml", ["train.task=chunk"], verb="finetune").train.task == "chunk"


def test_unknown_key_and_verb():
    with pytest.raises(JaxfoundError, match="unknown key 'train.stepz'"):
        load_config(CONFIG_DIR / "ner_conll03.yaml", ["train.stepz=3"], verb="finetune")
    with pytest.raises(KeyError):
        load_config(None, verb="serve")


def test_cli_bad_config_exits_2_with_one_line(capsys):
    assert main(["pretrain", "train.stepz=3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "train.stepz" in err[0]


def test_merge_recipes_parse():
    import yaml

    from jaxfound.fusion.recipe import parse_recipe

    recipes = sorted(CONFIG_DIR.glob("merge_*.yaml"))
    assert recipes
    for path in recipes:
        recipe = parse_recipe(yaml.safe_load(path.read_text()), str(path))
        assert recipe is not None and path.read_text().startswith("#")


def test_cli_finetune_refuses_train_steps_it_would_ignore(capsys):
    """`finetune train.steps=300` once trained 3 epochs (321 steps) silently; now it names the keys finetune takes."""
    from jaxfound.cli import main

    assert main(["finetune", "train.steps=300"]) == 2
    err = capsys.readouterr().err
    assert "key 'train.steps' is not used by `jaxfound finetune`" in err and "epochs" in err
