from pathlib import Path

import pytest
import yaml

from pipelines.config import ConfigError, dump_config, load_config, save_config, validate

ROW_FILES = ("rows.yaml", "rows_patterns.yaml", "sweep.yaml", "ablations.yaml", "ablations_patterns.yaml")  # the efficacy rows: train settings, not whole configs
CONFIGS = sorted(p for p in (Path(__file__).resolve().parents[1] / "configs").rglob("*.yaml") if p.name not in ROW_FILES)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_validate(path):
    config = load_config(path)
    assert config.stages


@pytest.mark.parametrize("name", ROW_FILES)
def test_efficacy_rows_are_valid_train_settings(name):
    """The efficacy rows files are not whole configs: each row, once the benchmark has given it a teacher's
    scores and the oracle its shards, must validate as a compare row; their teachers as whole configs."""
    import importlib.util

    root = Path(__file__).resolve().parents[1]
    spec_file = importlib.util.spec_from_file_location("efficacy", root / "bench" / "efficacy.py")
    efficacy = importlib.util.module_from_spec(spec_file)
    spec_file.loader.exec_module(efficacy)
    spec = yaml.safe_load((root / "configs" / "efficacy" / name).read_text())
    scores = {t: {"output": f"/w/scores_{t}", "checkpoints": [f"/t/{t}.pt"]} for t in spec.get("teachers", {})}
    plan = efficacy.with_oracle_shards(efficacy.expand_rows(spec["rows"], scores), lambda kind: f"/w/{kind}/shards/00000.tar")
    config = load_config(None, [], {"compare.rows": plan, "compare.budget": spec["budget"]})
    assert list(config.compare.rows) == list(plan) and set(spec["gap"].values()) <= set(plan)
    for row in plan.values():
        if row.get("curate"):
            load_config(None, [], {"curate.policy": row["curate"]})
    for teacher in spec.get("teachers", {}).values():
        assert "train" in load_config(root / teacher["config"]).stages


@pytest.mark.parametrize("table, others", [("rows.yaml", ("sweep.yaml", "ablations.yaml")),
                                          ("rows_patterns.yaml", ("ablations_patterns.yaml",))])
def test_rows_files_of_one_world_declare_its_tables_teachers(table, others):
    """A seed's rows are bound to one build of the world's inputs, the digest of every declared teacher's
    scores: a rows file declaring other teachers than its world's table could add no row to a seed it trained."""
    root = Path(__file__).resolve().parents[1] / "configs" / "efficacy"
    teachers = {name: yaml.safe_load((root / name).read_text()).get("teachers") for name in (table, *others)}
    assert teachers[table] and all(t == teachers[table] for t in teachers.values()), teachers


def test_unknown_key_is_named_with_a_suggestion(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("shard:\n  thread: 4\n")
    with pytest.raises(ConfigError, match=r"unknown key 'shard.thread' \(did you mean 'threads'\?\)") as err:
        load_config(path)
    assert str(path) in str(err.value)


def test_unknown_nested_key_lists_known_keys():
    with pytest.raises(ConfigError, match=r"'world.noise.typo'.*swapped_caption"):
        load_config(None, ["world.noise.typo=0.1"])


def test_ill_typed_key_is_named():
    with pytest.raises(ConfigError, match=r"key 'shard.processes'.*integer.*'many'"):
        load_config(None, ["shard.processes=many"])
    with pytest.raises(ConfigError, match=r"key 'world.noise.swapped_caption'.*less than or equal to 1"):
        load_config(None, ["world.noise.swapped_caption=1.5"])
    with pytest.raises(ConfigError, match=r"key 'stages.0'"):
        load_config(None, ["stages=[shrad]"])


def test_overrides_are_typed_and_nested():
    config = load_config(None, ["shard.processes=5", "world.n_train=123", "shard.input.extra_cols=[a, b]"])
    assert config.shard.processes == 5 and isinstance(config.shard.processes, int)
    assert config.world.n_train == 123
    assert config.shard.input.extra_cols == ["a", "b"]


def test_override_syntax_errors():
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        load_config(None, ["shard.processes"])
    with pytest.raises(ConfigError, match="'seed' is a value, not a section"):
        load_config(None, ["seed=1", "seed.x=1"])


def test_bad_yaml_and_missing_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("shard: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(tmp_path / "nope.yaml")
    listy = tmp_path / "list.yaml"
    listy.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(listy)


def test_resolved_config_round_trips(tmp_path):
    config = load_config(None, ["world.n_train=7", "shard.max_image_area=1e6"])
    path = tmp_path / "resolved.yaml"
    save_config(config, str(path))
    again = validate(yaml.safe_load(path.read_text()))
    assert again == config
    assert dump_config(again) == path.read_text()


def test_a_compare_row_is_checked_as_train_settings():
    with pytest.raises(ConfigError, match=r"row bad: key 'loss'"):
        load_config(None, [], {"compare.rows": {"bad": {"loss": "clipp"}}})
    with pytest.raises(ConfigError, match=r"row raw: pairs must be 'curated'"):
        load_config(None, [], {"compare.rows": {"raw": {"loss": "clip", "pairs": "raw"}}})
    with pytest.raises(ConfigError, match="baseline 'clip' is not another row"):
        load_config(None, [], {"compare.rows": {"raw": {"loss": "clip"}, "soft": {"loss": "softclip", "baseline": "clip"}}})
    config = load_config(None, [], {"compare.rows": {"ok": {"loss": "softclip", "curate": [{"kind": "clean_prob", "min": 0.5}]}},
                                    "compare.budget": {"max_steps": 10}})
    assert config.compare_dir().endswith("/compare")


def test_the_world_fills_only_what_the_config_leaves_unset(tmp_path):
    """A demo config gets the world's splits, zero-shot tasks and labels table; what the user set is kept, and a
    config without a world gets none of them (the stages never look for one)."""
    world = load_config(None, [f"root={tmp_path}"], {"world.n_train": 10})
    assert world.train.val_shards == f"{tmp_path}/world/val.tar" and world.evaluate.data == f"{tmp_path}/world/test.tar"
    assert world.evaluate.dn_data == f"{tmp_path}/world/val.tar" and world.truth == f"{tmp_path}/world/truth.parquet"
    assert sorted(world.evaluate.tasks) == ["colour", "shape"]
    assert world.evaluate.tasks["shape"].label_field == "zero_shot.shape" and "circle" in world.evaluate.tasks["shape"].classnames
    own = load_config(None, [f"root={tmp_path}", "train.val_shards=mine.tar", "evaluate.data=eval.tar", "truth=labels.csv"],
                      {"world.n_train": 10})
    assert (own.train.val_shards, own.evaluate.data, own.evaluate.dn_data, own.truth) == ("mine.tar", "eval.tar", None, "labels.csv")
    assert not load_config(None, ["world.n_val=0"], {"world.n_train": 10}).train.val_shards  # no split, no default
    plain = load_config(None, [f"root={tmp_path}"])
    assert (plain.train.val_shards, plain.evaluate.data, plain.evaluate.tasks, plain.truth) == (None, None, {}, None)


def test_a_pipelines_own_teacher_is_scored_held_out_unless_told_otherwise():
    """train.folds unset: 2 where the score stage scores with the train stage's run (cross-fitting by default),
    1 where it scores with other checkpoints or runs apart; a value given is kept."""
    own = ["stages=[world, shard, train, score]"]
    assert load_config(None, own).train.folds == 2
    assert load_config(None, [*own, "train.folds=1"]).train.folds == 1
    assert load_config(None, [*own, "train.folds=3"]).train.folds == 3
    assert load_config(None, [*own, "score.checkpoints=[runs/pretrained/best.pt]"]).train.folds == 1
    assert load_config(None, ["stages=[shard, train]"]).train.folds == 1
    assert load_config(None, ["stages=[score]"]).train.folds == 1
