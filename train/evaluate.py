"""Evaluation: zero-shot classification and image-text retrieval, each with the dot product and with
Distribution Normalization (docs/METHODS.md section 4; Zhou et al., NeurIPS 2023).

Features are kept as (N, K, d), K tokens of d dims each normalised on its own (K = 1 for stock
CLIP, K > 1 for oblique towers), so one code path scores both: sim(u, v) = sum_k <u_k, v_k>.
A sphere-topology model (train/oblique.py) returns its K tokens as one (N, D) vector: K = 1 here.

    DN retrieval:  (v - lam mu_v) . (t - lam mu_t)         on normalised features, no re-normalisation
    DN zero-shot:  normalise(v - lam mu_v) . normalise(c - lam mu_t)   c: a class's mean prompt embedding
"""

from __future__ import annotations

import io
import json

import torch
import torch.nn.functional as F
import webdataset as wds
from PIL import Image

from curate.teacher import IMAGE_EXTS

TEMPLATES = ("a photo of a {}.", "a picture of a {}.", "an image of a {}.", "a {}.")


def tokens(features: torch.Tensor) -> torch.Tensor:
    """(N, D) or (N, K, d) -> (N, K, d) with every token L2-normalised."""
    features = features.unsqueeze(1) if features.dim() == 2 else features
    return F.normalize(features.float(), dim=-1)


def similarity(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return torch.einsum("nkd,mkd->nm", u, v)


@torch.no_grad()
def retrieval_recall(image_features: torch.Tensor, text_features: torch.Tensor, ks=(1, 5, 10)) -> dict:
    """R@k both ways for aligned pairs (row i of each is pair i); a tie counts against the true partner."""
    image_features = image_features.unsqueeze(1) if image_features.dim() == 2 else image_features
    text_features = text_features.unsqueeze(1) if text_features.dim() == 2 else text_features
    sim = similarity(image_features, text_features)
    true = sim.diagonal()
    i2t_rank = (sim >= true[:, None]).sum(1) - 1  # texts scoring at least as high as the true one, itself excluded
    t2i_rank = (sim >= true[None, :]).sum(0) - 1
    return {f"{name}_R@{k}": (rank < k).float().mean().item()
            for name, rank in (("i2t", i2t_rank), ("t2i", t2i_rank)) for k in ks}


@torch.no_grad()
def encode(model, images: torch.Tensor | None = None, texts: torch.Tensor | None = None, device="cpu") -> torch.Tensor:
    if images is not None:
        return tokens(model.encode_image(images.to(device), normalize=True)).cpu()
    return tokens(model.encode_text(texts.to(device), normalize=True)).cpu()


@torch.no_grad()
def class_embeddings(model, tokenizer, classnames: list[str], templates, device="cpu") -> torch.Tensor:
    """(C, K, d): each class's prompts embedded, averaged over templates, re-normalised per token."""
    rows = [encode(model, texts=tokenizer([t.format(name) for t in templates]), device=device).mean(0)
            for name in classnames]
    return tokens(torch.stack(rows))


def sample_means(image: torch.Tensor, text: torch.Tensor, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Means of n seeded samples of each modality's (normalised) features: DN's only statistics."""
    pick = torch.randperm(len(image), generator=torch.Generator().manual_seed(seed))[:n]
    return image[pick].mean(0), text[torch.randperm(len(text), generator=torch.Generator().manual_seed(seed + 1))[:n]].mean(0)


def zero_shot(image: torch.Tensor, classes: torch.Tensor, labels: torch.Tensor, ks=(1, 5),
              means: tuple[torch.Tensor, torch.Tensor] | None = None, lam: float = 0.5) -> dict:
    """Top-k accuracy of classifying each image as its most similar class embedding (with DN when `means`)."""
    if means is not None:
        image, classes = tokens(image - lam * means[0]), tokens(classes - lam * means[1])
    top = similarity(image, classes).topk(min(max(ks), classes.shape[0]), dim=1).indices
    return {f"top{k}": (top[:, :k] == labels[:, None]).any(1).float().mean().item() for k in ks}


def retrieval(image: torch.Tensor, text: torch.Tensor, means: tuple[torch.Tensor, torch.Tensor] | None = None,
              lam: float = 0.5, ks=(1, 5, 10)) -> dict:
    if means is not None:
        image, text = image - lam * means[0], text - lam * means[1]
    return retrieval_recall(image, text, ks)


def with_dn(metric, means: list[tuple[torch.Tensor, torch.Tensor]], **kw) -> dict:
    """A metric with the dot product, and with DN for each seed's means: mean and std over seeds."""
    runs = [metric(means=m, **kw) for m in means]
    stacked = {k: torch.tensor([r[k] for r in runs]) for k in runs[0]}
    return {"dot": metric(means=None, **kw), "dn": {k: v.mean().item() for k, v in stacked.items()},
            "dn_std": {k: v.std(unbiased=True).item() if len(runs) > 1 else 0.0 for k, v in stacked.items()}}


def read_split(urls, preprocess, tokenizer) -> dict:
    """Images, tokenised captions and each sample's json (with a .cls file's label as its "cls") of a WebDataset split."""
    images, texts, metas = [], [], []
    for sample in wds.DataPipeline(wds.SimpleShardList(urls), wds.tarfile_to_samples()):
        meta = json.loads(sample["json"]) if "json" in sample else {}
        if "cls" in sample:
            meta.setdefault("cls", int(sample["cls"]))
        data = next(sample[ext] for ext in IMAGE_EXTS if ext in sample)
        with Image.open(io.BytesIO(data)) as image:
            images.append(preprocess(image.convert("RGB")))
        texts.append(tokenizer([sample["txt"].decode("utf-8")])[0] if "txt" in sample else None)
        metas.append(meta)
    return {"images": torch.stack(images), "texts": texts, "metas": metas}


def read_folder(path: str, preprocess) -> tuple[torch.Tensor, list[int], list[str]]:
    """An image folder per class (torchvision's ImageFolder): images, label indices, class names."""
    from torchvision.datasets import ImageFolder

    folder = ImageFolder(path, transform=preprocess)
    images, labels = zip(*(folder[i] for i in range(len(folder))))
    return torch.stack(images), list(labels), folder.classes


def batched_encode(model, device, images: torch.Tensor | None = None, texts: list | None = None, batch: int = 256):
    if images is not None:
        return torch.cat([encode(model, images=images[i:i + batch], device=device) for i in range(0, len(images), batch)])
    stacked = torch.stack(texts)
    return torch.cat([encode(model, texts=stacked[i:i + batch], device=device) for i in range(0, len(stacked), batch)])
