"""open_clip models by name with a pretrained tag or a local checkpoint, and the device to run on.

`softcurate-tiny` (train/model_configs/) is a ViT small enough to train on 2 CPU cores in minutes;
it is registered with open_clip on import, so every open_clip entry point knows it by name.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import tempfile
from pathlib import Path

import fsspec
import open_clip
import torch
from fsspec.implementations.local import LocalFileSystem

from train.files import atomic_path

CONFIG_DIR = Path(__file__).with_name("model_configs")
open_clip.add_model_config(CONFIG_DIR)


def pick_device(requested: str = "auto") -> torch.device:
    """The GPU when there is one (or the one asked for), else the CPU: no code change between machines."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


def create_model(name: str, pretrained: str | None = None, device: str | torch.device = "cpu"):
    """(model, train transform, eval transform, tokenizer) for an open_clip model.

    `pretrained` is an open_clip tag (e.g. laion2b_s34b_b79k, fetched by open_clip itself) or a
    checkpoint path (local, or an fsspec url such as s3://, copied locally first), which loads with
    weights_only=True.
    """
    if name not in open_clip.list_models():
        raise ValueError(f"unknown model '{name}'; open_clip knows {len(open_clip.list_models())} models, "
                         f"e.g. softcurate-tiny, ViT-B-32, RN50")
    if pretrained and Path(pretrained).suffix in (".pt", ".bin", ".safetensors"):
        fs, p = fsspec.core.url_to_fs(pretrained)
        if not fs.exists(p):
            raise FileNotFoundError(f"checkpoint not found: {pretrained}")
    try:
        with local_copy(pretrained) as local, fresh_model_notice_silenced(not pretrained):  # open_clip reads local files only
            model, preprocess_train, preprocess_val = open_clip.create_model_and_transforms(
                name, pretrained=local, device=device, weights_only=True)
    except (RuntimeError, AssertionError) as err:  # open_clip's load_state_dict / pos-embed checks
        if not pretrained:
            raise
        raise ValueError(f"checkpoint {pretrained} does not fit model {name}: {str(err).splitlines()[0]}") from err
    return model, preprocess_train, preprocess_val, open_clip.get_tokenizer(name)


def fresh_model_notice(record: logging.LogRecord) -> bool:
    """A logging filter: False for open_clip's warning that a model built without weights starts random."""
    return not record.getMessage().startswith("No pretrained weights loaded for model")


@contextlib.contextmanager
def fresh_model_notice_silenced(fresh: bool):
    """Without `pretrained` a random start is what was asked for: drop that one warning, keep every other."""
    root = logging.getLogger()  # open_clip logs through the root logger
    if fresh:
        root.addFilter(fresh_model_notice)
    try:
        yield
    finally:
        root.removeFilter(fresh_model_notice)


def save_checkpoint(model: torch.nn.Module, path: str | Path) -> None:
    """A plain open_clip state dict: `open_clip.create_model_and_transforms(name, pretrained=path)` loads it."""
    save_torch(model.state_dict(), path)


def save_torch(obj, path: str | Path) -> None:
    """torch.save to a local path or an fsspec url, so that a killed save never leaves a file that looks
    complete (atomic_path: a rename locally, one put in an object store)."""
    with atomic_path(str(path)) as local:
        torch.save(obj, local)  # to a file name, which torch names the archive inside after: the same bytes anywhere


def load_torch(path: str | Path, **kw):
    """torch.load (pass weights_only=True) from a local path or an fsspec url; FileNotFoundError when missing."""
    fs, p = fsspec.core.url_to_fs(str(path))
    if isinstance(fs, LocalFileSystem):
        return torch.load(p, **kw)
    return torch.load(io.BytesIO(fs.cat_file(p)), **kw)


@contextlib.contextmanager
def local_copy(path: str | None):
    """A local path to read `path` from: itself when local (or a pretrained tag), else a temporary download."""
    fs, p = fsspec.core.url_to_fs(path) if path else (None, None)
    if fs is None or isinstance(fs, LocalFileSystem):
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="softcurate-") as tmp:
        local = os.path.join(tmp, os.path.basename(p))  # the suffix tells open_clip the format
        fs.get_file(p, local)
        yield local
