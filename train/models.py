"""open_clip models by name with a pretrained tag or a local checkpoint, and the device to run on.

`softcurate-tiny` (train/model_configs/) is a ViT small enough to train on 2 CPU cores in minutes;
it is registered with open_clip on import, so every open_clip entry point knows it by name.
"""

from __future__ import annotations

from pathlib import Path

import open_clip
import torch

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
    local checkpoint path, which loads with weights_only=True.
    """
    if name not in open_clip.list_models():
        raise ValueError(f"unknown model '{name}'; open_clip knows {len(open_clip.list_models())} models, "
                         f"e.g. softcurate-tiny, ViT-B-32, RN50")
    if pretrained and Path(pretrained).suffix in (".pt", ".bin", ".safetensors") and not Path(pretrained).exists():
        raise FileNotFoundError(f"checkpoint not found: {pretrained}")
    try:
        model, preprocess_train, preprocess_val = open_clip.create_model_and_transforms(
            name, pretrained=pretrained, device=device, weights_only=True)
    except (RuntimeError, AssertionError) as err:  # open_clip's load_state_dict / pos-embed checks
        if not pretrained:
            raise
        raise ValueError(f"checkpoint {pretrained} does not fit model {name}: {str(err).splitlines()[0]}") from err
    return model, preprocess_train, preprocess_val, open_clip.get_tokenizer(name)


def save_checkpoint(model: torch.nn.Module, path: str | Path) -> None:
    """A plain open_clip state dict: `open_clip.create_model_and_transforms(name, pretrained=path)` loads it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(model.state_dict(), tmp)
    tmp.replace(path)  # a killed save never leaves a checkpoint that looks complete
