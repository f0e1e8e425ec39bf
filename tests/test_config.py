"""Config: typed recipes, dotted overrides, and one-line errors naming the key (exit code 2 in the CLI)."""

import pytest

from jaxfound.cli import main
from jaxfound.config import CONFIG_DIR, load_config, parse_override
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
    assert cfg.train.steps == 40 and cfg.train.lr == 0.005 and cfg.data.path == "corpus.txt" and cfg.model.remat


@pytest.mark.parametrize("override, message", [
    ("train.stepz=3", "unknown key 'train.stepz'"),
    ("trian.steps=3", "unknown section 'trian'"),
    ("train.steps=many", "'train.steps' must be int"),
    ("model.arch=lstm", "allowed: bert, gpt"),
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


def test_cli_bad_config_exits_2_with_one_line(capsys):
    assert main(["pretrain", "train.stepz=3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "train.stepz" in err[0]


def test_merge_recipes_parse():
    import yaml

    from jaxfound.fusion.plan import parse_recipe

    recipes = sorted(CONFIG_DIR.glob("merge_*.yaml"))
    assert recipes
    for path in recipes:
        recipe = parse_recipe(yaml.safe_load(path.read_text()), str(path))
        assert recipe is not None and path.read_text().startswith("#")
