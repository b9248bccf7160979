"""The evaluate stage: zero-shot and retrieval for any open_clip or oblique checkpoint, dot product and DN.

Data: any WebDataset (retrieval on every pair with a caption; zero-shot tasks over the samples that
carry each task's label field, with a class-name list), or an image folder per class (zero-shot
only). The demo world's config supplies its clean test split and two tasks, colour and shape on its
one-object images. DN's means come from `dn_samples` unlabeled samples of `dn_data` (or of the
evaluation data), one draw per seed; the table reports the mean and the spread over seeds.
"""

from __future__ import annotations

from pathlib import Path

import torch

from pipelines.config import Config, ConfigError, ZeroShotTask, expand_globs, join
from pipelines.io import exists, record_stage, write_json
from train.evaluate import (
    TEMPLATES,
    batched_encode,
    class_embeddings,
    read_folder,
    read_split,
    retrieval,
    sample_means,
    with_dn,
    zero_shot,
)


def run_evaluate(config: Config) -> dict:
    cfg = config.evaluate
    checkpoints = resolve_checkpoints(config)
    results = []
    for checkpoint in checkpoints:
        result = evaluate_checkpoint(config, checkpoint)
        write_json(join(config.eval_dir(), result_name(checkpoint) + ".json"), result)
        results.append(result)
        print_table(result)
    record_stage(config, "evaluate", {"output": config.eval_dir(), "checkpoints": checkpoints})
    return {"results": results, "dn_lambda": cfg.dn_lambda}


def result_name(checkpoint: str) -> str:
    """runs/<run>/checkpoints/best.pt -> <run>_best; any other path -> its file name without suffix."""
    parts = Path(checkpoint).parts
    return f"{parts[-3]}_{Path(checkpoint).stem}" if len(parts) >= 3 and parts[-2] == "checkpoints" else Path(checkpoint).stem


def resolve_checkpoints(config: Config) -> list[str]:
    found = expand_globs(config.evaluate.checkpoints or [join(config.run_dir(), "checkpoints", "best.pt")],
                         "evaluate.checkpoints")
    for path in found:
        if not exists(path):  # local or in the object store
            raise ConfigError(f"evaluate: no checkpoint at {path}")
    return found


def load(name: str, checkpoint: str, device):
    """An open_clip checkpoint, or an oblique one (its header says so)."""
    from train.models import create_model, load_torch
    from train.oblique import CHECKPOINT_FORMAT, load_oblique

    payload = load_torch(checkpoint, map_location="cpu", weights_only=True)
    try:
        if isinstance(payload, dict) and payload.get("format") == CHECKPOINT_FORMAT:
            model, _, preprocess, tokenizer = load_oblique(payload.get("model_name") or name, checkpoint,
                                                           payload["oblique_k"], device)
        else:
            model, _, preprocess, tokenizer = create_model(name, checkpoint, device)
    except (ValueError, FileNotFoundError) as err:
        raise ConfigError(f"evaluate: {err}") from None
    return model.eval(), preprocess, tokenizer


def evaluate_checkpoint(config: Config, checkpoint: str) -> dict:
    from train.models import pick_device

    cfg = config.evaluate
    device = pick_device(cfg.device)
    model, preprocess, tokenizer = load(cfg.model or config.train.model, checkpoint, device)
    templates = cfg.templates or TEMPLATES
    result = {"checkpoint": checkpoint, "model": cfg.model or config.train.model,
              "oblique_k": int(getattr(model, "oblique_k", 1)), "topology": getattr(model, "oblique_topology", "oblique"),
              "dn_lambda": cfg.dn_lambda,
              "dn_samples": cfg.dn_samples, "dn_seeds": cfg.dn_seeds, "zero_shot": {}}
    if cfg.folder:
        images, labels, classnames = read_folder(cfg.folder, preprocess)
        image = batched_encode(model, device, images=images)
        means = seeded_means(image, None, cfg)
        classes = class_embeddings(model, tokenizer, classnames, templates, device)
        result["zero_shot"]["folder"] = with_dn(zero_shot, means, image=image, classes=classes,
                                                labels=torch.tensor(labels), lam=cfg.dn_lambda)
        result["data"] = cfg.folder
        return result
    if not cfg.data:
        raise ConfigError("evaluate: set evaluate.data (WebDataset urls) or evaluate.folder")
    from train.data import expand_urls

    urls = expand_urls(cfg.data)
    if absent := [u for u in urls if not exists(u)]:
        raise ConfigError(f"evaluate: no evaluation data at {absent[0]}" + (f" (and {len(absent) - 1} more)" if len(absent) > 1 else ""))
    split = read_split(urls, preprocess, tokenizer)
    image = batched_encode(model, device, images=split["images"])
    text = batched_encode(model, device, texts=split["texts"]) if all(t is not None for t in split["texts"]) else None
    means = seeded_means(image, text, cfg, model, preprocess, tokenizer, device, cfg.dn_data)
    if text is not None:
        result["retrieval"] = with_dn(retrieval, means, image=image, text=text, lam=cfg.dn_lambda)
    for name, task in zero_shot_tasks(cfg).items():
        result["zero_shot"][name] = task_result(model, tokenizer, device, image, split["metas"], task, means, cfg)
    result["data"] = cfg.data
    result["pairs"] = len(image)
    return result


def zero_shot_tasks(cfg) -> dict[str, ZeroShotTask]:
    """evaluate.tasks, or the one task that label_field and classnames describe."""
    if cfg.tasks or not cfg.classnames:
        return cfg.tasks
    return {cfg.label_field: ZeroShotTask(label_field=cfg.label_field, classnames=cfg.classnames)}


def task_result(model, tokenizer, device, image, metas: list[dict], task: ZeroShotTask, means, cfg) -> dict:
    """Zero-shot over the samples that carry the task's label, from the split's features already encoded."""
    classnames = task.classnames if isinstance(task.classnames, list) else read_classnames(task.classnames)
    labelled = [(i, label) for i, meta in enumerate(metas) if (label := json_field(meta, task.label_field)) is not None]
    if not labelled:
        raise ConfigError(f"evaluate: no sample of evaluate.data has the label field {task.label_field!r}")
    rows = [i for i, _ in labelled]
    labels = torch.tensor(label_indices([label for _, label in labelled], classnames, task.label_field))
    classes = class_embeddings(model, tokenizer, classnames, task.templates or cfg.templates or TEMPLATES, device)
    return {**with_dn(zero_shot, means, image=image[rows], classes=classes, labels=labels, lam=cfg.dn_lambda),
            "images": len(rows), "classes": len(classnames)}


def json_field(meta: dict, field: str):
    """meta[a][b] for "a.b"; None where a key is missing."""
    for part in field.split("."):
        meta = meta.get(part) if isinstance(meta, dict) else None
    return meta


def seeded_means(image, text, cfg, model=None, preprocess=None, tokenizer=None, device=None, source=None) -> list:
    """One (mu_v, mu_t) per seed, from `dn_samples` unlabeled samples of `source` (or of the evaluation data)."""
    if source:
        from train.data import expand_urls

        unlabeled = read_split(expand_urls(source), preprocess, tokenizer)
        image = batched_encode(model, device, images=unlabeled["images"])
        text = batched_encode(model, device, texts=unlabeled["texts"])
    if text is None:  # an image folder: no captions, DN centres the images only
        text = torch.zeros_like(image[:1])
    return [sample_means(image, text, cfg.dn_samples, seed) for seed in range(cfg.dn_seeds)]


def label_indices(labels: list, classnames: list[str], field: str) -> list[int]:
    """Each label as a class index: an int, or an integer in string form (CSV columns arrive as strings),
    is an index; any other string is a class name. When every string label is a class name, strings are
    read as names, since class names may be numbers themselves."""
    names = {name: i for i, name in enumerate(classnames)}
    as_names = all(lab in names for lab in labels if isinstance(lab, str))
    return [label_index(lab, names, as_names, field) for lab in labels]


def label_index(label, names: dict[str, int], as_names: bool, field: str) -> int:
    index = as_integer(label)
    if isinstance(label, str) and label in names and (as_names or index is None):
        return names[label]
    if index is not None and 0 <= index < len(names):
        return index
    raise ConfigError(f"evaluate: label {label!r} of the label field {field} is neither a class index "
                      f"(0 to {len(names) - 1}) nor one of the {len(names)} class names")


def as_integer(label) -> int | None:
    if isinstance(label, int) and not isinstance(label, bool):
        return label
    try:
        return int(label) if isinstance(label, str) else None
    except ValueError:
        return None


def read_classnames(path: str) -> list[str]:
    with open(path, encoding="utf-8") as f:
        return [line.strip() for line in f if line.strip()]


def print_table(result: dict) -> None:
    print(f"\nevaluate {result['checkpoint']} ({result['model']}, K={result['oblique_k']}{' sphere' if result['topology'] == 'sphere' else ''}; DN lambda "
          f"{result['dn_lambda']}, means from {result['dn_samples']} samples, mean +- std over {result['dn_seeds']} seeds)")
    print(f"  {'metric':<28} {'dot':>7} {'DN':>16}")
    for task, scores in result["zero_shot"].items():
        for k in ("top1", "top5"):
            print(f"  {'zero-shot ' + task + ' ' + k:<28} {scores['dot'][k]:>7.3f} "
                  f"{scores['dn'][k]:>8.3f} +- {scores['dn_std'][k]:.3f}")
    for k, dot in result.get("retrieval", {}).get("dot", {}).items():
        dn, std = result["retrieval"]["dn"][k], result["retrieval"]["dn_std"][k]
        print(f"  {'retrieval ' + k:<28} {dot:>7.3f} {dn:>8.3f} +- {std:.3f}")
