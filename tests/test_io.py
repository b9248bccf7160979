"""pipelines/io.py on local disk: atomic writes, claiming an output folder, the finished shards.
(The same on S3: tests/test_object_store.py.)"""

import json

import pytest

from pipelines.config import ConfigError, load_config
from pipelines.io import atomic_open, atomic_write, finished_shards, prepare_output, read_json, write_json


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "deep" / "er" / "x.bin"
    atomic_write(str(path), b"old")
    with pytest.raises(RuntimeError):
        with atomic_open(str(path)) as f:
            f.write(b"half of the new")
            raise RuntimeError("killed")
    assert path.read_bytes() == b"old"
    assert sorted(p.name for p in path.parent.iterdir()) == ["x.bin"]
    atomic_write(str(path), "new é")
    assert path.read_bytes() == "new é".encode()


def test_prepare_output_resumes_the_same_identity_and_refuses_another(tmp_path):
    out = str(tmp_path / "scores")
    prepare_output(out, "score", identity={"teacher": "a", "shards": ["00000.tar"]})
    write_json(f"{out}/_summary.json", {"done": True})
    (tmp_path / "scores" / "00000.parquet").write_bytes(b"kept")
    prepare_output(out, "score", identity={"teacher": "a", "shards": ["00000.tar"]})
    assert (tmp_path / "scores" / "00000.parquet").read_bytes() == b"kept"
    assert read_json(f"{out}/_summary.json") is None  # it marks a finished run: gone until this one finishes
    with pytest.raises(ConfigError, match=r"another teacher \(see its _state.json\); set score.overwrite=true"):
        prepare_output(out, "score", identity={"teacher": "b", "shards": ["00000.tar"]})
    prepare_output(out, "score", overwrite=True, identity={"teacher": "b", "shards": ["00000.tar"]})
    assert [p.name for p in (tmp_path / "scores").iterdir()] == ["_state.json"]
    assert read_json(f"{out}/_state.json") == {"teacher": "b", "shards": ["00000.tar"]}


def test_prepare_output_checks_only_the_identitys_keys(tmp_path):
    """A state file with more keys than the identity (counts, say) does not make a folder foreign."""
    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "_input.json").write_text(json.dumps({"digest": "d", "samples_per_shard": 10, "rows": 12}))
    prepare_output(str(tmp_path / "shards"), "shard", identity={"digest": "d", "samples_per_shard": 10}, state="_input.json")
    with pytest.raises(ConfigError, match="another digest and samples_per_shard"):
        prepare_output(str(tmp_path / "shards"), "shard", identity={"digest": "e", "samples_per_shard": 20},
                       state="_input.json")


def test_finished_shards_are_those_the_shard_summary_lists(tmp_path):
    config = load_config(None, [f"root={tmp_path}"])
    with pytest.raises(ConfigError, match="holds no complete shards; run the shard stage first"):
        finished_shards(config)
    write_json(str(tmp_path / "shards" / "_summary.json"), {"shards": ["00000.tar", "00002.tar"]})
    assert finished_shards(config) == [f"{tmp_path}/shards/00000.tar", f"{tmp_path}/shards/00002.tar"]
