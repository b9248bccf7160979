"""The evaluate stage: zero-shot and retrieval for any open_clip or oblique checkpoint, dot product and DN.

Data: the demo world's clean test split (zero-shot colour and shape on its one-object images,
retrieval on every pair), any WebDataset with a label field and a class-name list, or an image
folder per class (zero-shot only). DN's means come from `dn_samples` unlabeled samples of the
world's validation split (or of the evaluation data), one draw per seed; the table reports the
mean and the spread over seeds.
"""

from __future__ import annotations

import os
from pathlib import Path

import fsspec
import torch

from pipelines.config import Config, ConfigError, expand_globs, join
from pipelines.manifest import record_stage, write_json
from train.evaluate import (
    TEMPLATES,
    batched_encode,
    class_embeddings,
    dn_means,
    read_folder,
    read_split,
    retrieval,
    with_dn,
    zero_shot,
)

WORLD_TASKS = {  # the demo world's labels, prompted the way its captions speak
    "colour": ("a photo of a {} thing.", "an image showing a {} object.", "a picture of something {}."),
    "shape": ("a photo of a {}.", "an image showing a {}.", "a picture of a {}."),
}


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
        fs, p = fsspec.core.url_to_fs(path)  # local or in the object store
        if not fs.exists(p):
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
              "oblique_k": int(getattr(model, "oblique_k", 1)), "dn_lambda": cfg.dn_lambda,
              "dn_samples": cfg.dn_samples, "dn_seeds": cfg.dn_seeds, "zero_shot": {}}
    world_test = join(config.world_dir(), "test.tar") if config.world is not None else None
    if cfg.folder:
        images, labels, classnames = read_folder(cfg.folder, preprocess)
        image = batched_encode(model, device, images=images)
        means = seeded_means(image, None, cfg)
        classes = class_embeddings(model, tokenizer, classnames, templates, device)
        result["zero_shot"]["folder"] = with_dn(zero_shot, means, image=image, classes=classes,
                                                labels=torch.tensor(labels), lam=cfg.dn_lambda)
        result["data"] = cfg.folder
        return result
    data = cfg.data or world_test
    if not data or (data == world_test and not os.path.exists(world_test)):
        raise ConfigError("evaluate: set evaluate.data (WebDataset urls) or evaluate.folder; no demo world test split here")
    from train.data import expand_urls

    split = read_split(expand_urls(data), preprocess, tokenizer, None if data == world_test else cfg.label_field)
    image = batched_encode(model, device, images=split["images"])
    text = batched_encode(model, device, texts=split["texts"]) if all(t is not None for t in split["texts"]) else None
    dn_source = cfg.dn_data or (join(config.world_dir(), "val.tar") if data == world_test else None)
    means = seeded_means(image, text, cfg, model, preprocess, tokenizer, device, dn_source)
    if text is not None:
        result["retrieval"] = with_dn(retrieval, means, image=image, text=text, lam=cfg.dn_lambda)
    if data == world_test:
        for task, task_templates in WORLD_TASKS.items():
            result["zero_shot"][task] = world_task(model, tokenizer, device, image, split["metas"], task, task_templates,
                                                   means, cfg)
    elif cfg.classnames:
        classnames = read_classnames(cfg.classnames)
        labels = label_indices(split["labels"], classnames, cfg.label_field)
        classes = class_embeddings(model, tokenizer, classnames, templates, device)
        result["zero_shot"][cfg.label_field] = with_dn(zero_shot, means, image=image, classes=classes,
                                                       labels=torch.tensor(labels), lam=cfg.dn_lambda)
    result["data"] = data
    result["pairs"] = len(image)
    return result


def world_task(model, tokenizer, device, image, metas, task, templates, means, cfg) -> dict:
    """Zero-shot on the world's one-object test images (with several objects the label is ambiguous),
    from the split's features already encoded for retrieval."""
    from pipelines.world import VOCAB

    one = [i for i, meta in enumerate(metas) if len(meta["objects"]) == 1]
    classnames = list(VOCAB[task])
    classes = class_embeddings(model, tokenizer, classnames, templates, device)
    labels = torch.tensor([classnames.index(metas[i][task]) for i in one])
    return {**with_dn(zero_shot, means, image=image[one], classes=classes, labels=labels, lam=cfg.dn_lambda),
            "images": len(one), "classes": len(classnames)}


def seeded_means(image, text, cfg, model=None, preprocess=None, tokenizer=None, device=None, source=None) -> list:
    """One (mu_v, mu_t) per seed, from `dn_samples` unlabeled samples of `source` (or of the evaluation data)."""
    if source:
        from train.data import expand_urls

        unlabeled = read_split(expand_urls(source), preprocess, tokenizer)
        image = batched_encode(model, device, images=unlabeled["images"])
        text = batched_encode(model, device, texts=unlabeled["texts"])
    if text is None:  # an image folder: no captions, DN centres the images only
        text = torch.zeros_like(image[:1])
    return [dn_means(image, text, cfg.dn_samples, seed) for seed in range(cfg.dn_seeds)]


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
    raise ConfigError(f"evaluate: label {label!r} of evaluate.label_field={field} is neither a class index "
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
    print(f"\nevaluate {result['checkpoint']} ({result['model']}, K={result['oblique_k']}; DN lambda "
          f"{result['dn_lambda']}, means from {result['dn_samples']} samples, mean +- std over {result['dn_seeds']} seeds)")
    print(f"  {'metric':<28} {'dot':>7} {'DN':>16}")
    for task, scores in result["zero_shot"].items():
        for k in ("top1", "top5"):
            print(f"  {'zero-shot ' + task + ' ' + k:<28} {scores['dot'][k]:>7.3f} "
                  f"{scores['dn'][k]:>8.3f} +- {scores['dn_std'][k]:.3f}")
    for k, dot in result.get("retrieval", {}).get("dot", {}).items():
        dn, std = result["retrieval"]["dn"][k], result["retrieval"]["dn_std"][k]
        print(f"  {'retrieval ' + k:<28} {dot:>7.3f} {dn:>8.3f} +- {std:.3f}")
