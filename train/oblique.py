"""Multi-token oblique CLIP towers (docs/METHODS.md section 2; Sun, arXiv 2209.02127).

An oblique model embeds an image or a caption as K tokens, each projected by ONE shared matrix to
D/K dims and L2-normalised on its own: a point on OB(D/K, K) = (S^{D/K-1})^K. Two points compare by
`sum_k <u_k, v_k>`, in [-K, K]. K = 1 is stock CLIP.

`make_oblique(model, k)` changes a stock open_clip CLIP (ViT or ModifiedResNet image tower, open_clip
text tower) in place by swapping its class to a subclass and adding a few parameters; the open_clip
modules and their weights stay as they are:

- image tower, ViT: the stock class token is token 0; K-1 new learned class tokens follow it, each
  with a new learned positional row, before the patch tokens. The K outputs after `ln_post` go
  through `proj`, now width x D/K (the first D/K columns of the stock one).
- image tower, ModifiedResNet: its attention pool asks K queries instead of one. Query 0 is the
  stock one (the spatial mean at positional row 0); queries 1..K-1 are new learned vectors. All
  attend over the stock keys (the mean and the spatial tokens; the new queries are not keys, so
  token 0 is stock), and the K outputs go through `c_proj`, now width x D/K (its first D/K rows).
- text tower: the stock pooled token (the EOT token for CLIP's tokenizer) is token 0: under the
  causal mask it already sees the whole caption. K-1 new learned tokens are appended AFTER the full
  context (no caption token is dropped) with an attention mask in which they see every caption
  token up to and including the EOT (not the padding after it) and each other, while caption tokens
  never see them, so every caption token (and token 0) is computed exactly as in stock open_clip.
  Outputs go through `ln_final` and `text_projection`, now width x D/K.

So with K = 1 nothing is added and the model is stock open_clip; `make_oblique(model, 1)` returns
the model unchanged (its features stay (N, D); `oblique_similarity` takes those as K = 1).

Topology (`make_oblique(model, k, topology)`, the loss's: train/losses/oblique.py). "oblique": the
encoders return (N, K, D/K), each token normalised on its own. "sphere" (the matched control): the
same K tokens concatenated into (N, D) and normalised once, so every consumer (validation,
evaluation) sees a D-dim unit vector and compares as stock CLIP does.

Checkpoints (`save_oblique` / `load_oblique`) are a dict {format, oblique_k, topology, model_name,
state_dict} (no topology: "oblique") loaded with torch.load(weights_only=True). A stock open_clip loader refuses them (unexpected keys
for the new tokens, size mismatch for the projections); that refusal is deliberate.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from open_clip.model import CLIP
from open_clip.modified_resnet import AttentionPool2d, ModifiedResNet
from open_clip.transformer import VisionTransformer, _expand_token, text_global_pool
from torch import nn

from train.models import create_model, load_torch, save_torch

CHECKPOINT_FORMAT = "softcurate-oblique-v1"
TOPOLOGIES = ("oblique", "sphere")
# The image tower's new tokens (K-1 rows), ViT and ModifiedResNet: a bare state dict's K is read from them.
IMAGE_TOKENS = ("visual.extra_class_embedding", "visual.attnpool.extra_query_embedding")


# ---------------------------------------------------------------------------------------------
# Image tower
# ---------------------------------------------------------------------------------------------
class ObliqueVisionTransformer(VisionTransformer):
    """open_clip's ViT with K class tokens: [cls_0, extra_1..extra_{K-1}, patches] -> (N, K, D/K).

    Set by `make_oblique` through a class swap; adds `extra_class_embedding` and
    `extra_positional_embedding` (K-1, width) and the attribute `oblique_k`.
    """

    def _embeds(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x).flatten(2).transpose(1, 2)  # [N, grid**2, width]
        x = torch.cat([_expand_token(self.class_embedding, x.shape[0]).to(x.dtype), x], dim=1)
        x = x + self.positional_embedding.to(x.dtype)
        # open_clip's PatchDropout keeps token 0 only, so the extra class tokens go in after it.
        x = self.patch_dropout(x)
        extra = (self.extra_class_embedding + self.extra_positional_embedding).to(x.dtype)
        x = torch.cat([x[:, :1], extra.unsqueeze(0).expand(x.shape[0], -1, -1), x[:, 1:]], dim=1)
        return self.ln_pre(x)

    def forward(self, x: torch.Tensor):
        k = self.oblique_k
        x = self.ln_post(self.transformer(self._embeds(x)))  # LayerNorm is per token: pool order is moot
        pooled = x[:, :k] @ self.proj  # one shared projection for all K tokens: [N, K, D/K]
        if self.output_tokens:
            return pooled, x[:, k:]
        return pooled

    def forward_intermediates(self, *args, **kwargs):
        raise NotImplementedError("forward_intermediates assumes one class token; not available on an oblique tower")

    def lock(self, unlocked_groups: int = 0, freeze_bn_stats: bool = False):
        super().lock(unlocked_groups, freeze_bn_stats)
        # The extra tokens belong to open_clip's first group, with class_embedding.
        for p in (self.extra_class_embedding, self.extra_positional_embedding):
            p.requires_grad = self.class_embedding.requires_grad

    @torch.jit.ignore
    def no_weight_decay(self):
        return super().no_weight_decay() | {"extra_class_embedding", "extra_positional_embedding"}


def _oblique_vit(visual: VisionTransformer, k: int) -> None:
    width = visual.class_embedding.shape[-1]
    ref = visual.class_embedding
    scale = width ** -0.5  # open_clip's class_embedding init is scale * randn(width)
    new = {"device": ref.device, "dtype": ref.dtype}
    visual.extra_class_embedding = nn.Parameter(scale * torch.randn(k - 1, width, **new))
    # Start each extra row at the class position (they are class tokens too), noise breaks the tie.
    class_row = visual.positional_embedding.detach()[0]
    visual.extra_positional_embedding = nn.Parameter(
        class_row.expand(k - 1, width).clone() + 0.1 * scale * torch.randn(k - 1, width, **new))
    visual.proj = nn.Parameter(visual.proj.detach()[:, : visual.proj.shape[1] // k].clone())
    visual.output_dim = visual.proj.shape[1]
    visual.oblique_k = k
    visual.__class__ = ObliqueVisionTransformer


class ObliqueAttentionPool2d(AttentionPool2d):
    """open_clip's ResNet attention pool with K queries over the same keys -> (N, K, D/K).

    Query 0 is stock: the spatial mean at positional row 0. Queries 1..K-1 are learned vectors, like
    the ViT's extra class tokens (a token at a fixed position is token + position in one vector).
    They do not add the mean: it grows with the features (norm ~14 against a query's ~1 after 150
    steps on the demo world), and queries that share it attend alike: the K tokens are then copies
    (token-to-token cosine 1.000 there, against 0.958 with learned queries and 0.967 for the ViT).
    Keys and values are stock (the mean token and the spatial tokens); the queries are not keys, so
    token 0 is stock open_clip's through the first D/K columns of `c_proj`. Set by `make_oblique`
    through a class swap; adds `extra_query_embedding` (K-1, width) and the attribute `oblique_k`.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(x.shape[0], x.shape[1], x.shape[2] * x.shape[3]).permute(2, 0, 1)  # NCHW -> (HW)NC
        x = torch.cat([x.mean(dim=0, keepdim=True), x], dim=0)  # (HW+1)NC
        x = x + self.positional_embedding[:, None, :].to(x.dtype)  # (HW+1)NC
        n = x.shape[1]
        # F.multi_head_attention_forward's attention, written out so that the learned queries, the same
        # for every image, are projected once rather than once per image.
        extra = self.q_proj(self.extra_query_embedding.to(x.dtype))[:, None, :].expand(-1, n, -1)
        q = torch.cat([self.q_proj(x[:1]), extra], dim=0)  # KNC: stock's one query, then the learned ones

        def heads(t):  # LNC -> (N*heads)L(C/heads), as multi_head_attention_forward splits them
            return t.reshape(t.shape[0], n * self.num_heads, -1).transpose(0, 1)

        out = F.scaled_dot_product_attention(heads(q), heads(self.k_proj(x)), heads(self.v_proj(x)))
        out = out.transpose(0, 1).reshape(q.shape[0], n, -1)  # KNC
        return self.c_proj(out).transpose(0, 1)  # N K D/K


def _oblique_resnet(visual: ModifiedResNet, k: int) -> None:
    pool = visual.attnpool
    ref = pool.positional_embedding
    width = ref.shape[-1]
    # Initialised as open_clip initialises the pool's positional rows and the ViT's class token.
    pool.extra_query_embedding = nn.Parameter(
        width ** -0.5 * torch.randn(k - 1, width, device=ref.device, dtype=ref.dtype))
    proj = pool.c_proj
    narrow = nn.Linear(proj.in_features, proj.out_features // k).to(device=proj.weight.device, dtype=proj.weight.dtype)
    with torch.no_grad():
        narrow.weight.copy_(proj.weight[: narrow.out_features])
        narrow.bias.copy_(proj.bias[: narrow.out_features])
    pool.c_proj = narrow
    pool.oblique_k = k
    pool.__class__ = ObliqueAttentionPool2d
    visual.output_dim = narrow.out_features


def _oblique_visual(visual: nn.Module, k: int) -> None:
    if isinstance(visual, ModifiedResNet):
        _oblique_resnet(visual, k)
    else:
        _oblique_vit(visual, k)


# ---------------------------------------------------------------------------------------------
# Text tower and the model
# ---------------------------------------------------------------------------------------------
def _project(x: torch.Tensor, projection) -> torch.Tensor:
    if projection is None:
        return x
    return projection(x) if isinstance(projection, nn.Linear) else x @ projection


class ObliqueCLIP(CLIP):
    """open_clip's CLIP whose encoders return (N, K, D/K); forward is CLIP's own.

    Set by `make_oblique` through a class swap; adds `text_extra_class_embedding` (K-1, width) and
    the attributes `oblique_k` and `oblique_topology`.
    """

    def encode_image(self, image: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        return self._features(self.visual(image), normalize)

    def _pooled_position(self, text: torch.Tensor) -> torch.Tensor:
        """Index of the token stock open_clip pools (EOT for CLIP's tokenizer): the caption's end."""
        if self.text_pool_type == "argmax":
            return text.argmax(dim=-1)
        if self.text_pool_type == "eos":
            return (text == self.text_eos_id).int().argmax(dim=-1)
        return torch.full((text.shape[0],), text.shape[1] - 1, device=text.device)  # 'last'

    def _text_attn_mask(self, text: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Additive mask [N*heads, L+E, L+E] for the caption plus E = K-1 appended class tokens."""
        n, length = text.shape
        e = self.text_extra_class_embedding.shape[0]
        mask = torch.zeros(n, length + e, length + e, dtype=dtype, device=text.device)
        if self.attn_mask is not None:  # caption tokens keep stock (causal) attention among themselves
            mask[:, :length, :length] = self.attn_mask[:length, :length].to(dtype)
        mask[:, :length, length:] = float("-inf")  # ...and never see the class tokens
        # Class tokens see the caption through its end and each other, not the padding after it.
        beyond_end = torch.arange(length, device=text.device)[None, :] > self._pooled_position(text)[:, None]
        mask[:, length:, :length] = torch.zeros(n, length, dtype=dtype, device=text.device).masked_fill(
            beyond_end, float("-inf")).unsqueeze(1)
        return mask.repeat_interleave(self.transformer.resblocks[0].attn.num_heads, dim=0)

    def encode_text(self, text: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        cast_dtype = self.transformer.get_cast_dtype()
        length = text.shape[1]
        x = self.token_embedding(text).to(cast_dtype) + self.positional_embedding.to(cast_dtype)
        extra = self.text_extra_class_embedding.to(cast_dtype)
        x = torch.cat([x, extra.unsqueeze(0).expand(x.shape[0], -1, -1)], dim=1)
        x = self.ln_final(self.transformer(x, attn_mask=self._text_attn_mask(text, x.dtype)))
        token0 = text_global_pool(x[:, :length], text, self.text_pool_type, eos_token_id=self.text_eos_id)
        tokens = _project(torch.cat([token0.unsqueeze(1), x[:, length:]], dim=1), self.text_projection)
        return self._features(tokens, normalize)

    def _features(self, tokens: torch.Tensor, normalize: bool) -> torch.Tensor:
        """(N, K, D/K) tokens, each normalised on its own (oblique); or their (N, D) concatenation, normalised once (sphere)."""
        if self.oblique_topology == "sphere":
            tokens = tokens.flatten(1)
        return F.normalize(tokens, dim=-1) if normalize else tokens

    def get_logits(self, image, text):
        sim = oblique_similarity(self.encode_image(image, normalize=True), self.encode_text(text, normalize=True))
        image_logits = self.logit_scale.exp() * sim
        if self.logit_bias is not None:
            image_logits = image_logits + self.logit_bias
        return image_logits, image_logits.T

    def forward_intermediates(self, *args, **kwargs):
        raise NotImplementedError("forward_intermediates assumes one class token; not available on an oblique model")

    def lock_text_tower(self, unlocked_layers: int = 0, freeze_layer_norm: bool = True):
        super().lock_text_tower(unlocked_layers, freeze_layer_norm)
        # The appended tokens are input embeddings: they follow token_embedding.
        self.text_extra_class_embedding.requires_grad = self.token_embedding.weight.requires_grad

    @torch.jit.ignore
    def no_weight_decay(self):
        # A ModifiedResNet names no such parameters of its own; its new query rows are tokens too.
        pool = {"visual.attnpool.extra_query_embedding"} if isinstance(self.visual, ModifiedResNet) else set()
        return super().no_weight_decay() | {"text_extra_class_embedding"} | pool


def _oblique_text(model: CLIP, k: int) -> None:
    if model.text_pool_type not in ("argmax", "eos", "last"):
        raise ValueError(f"text pool_type '{model.text_pool_type}' has no caption-end token to be class token 0")
    ref = model.token_embedding.weight
    # Initialised like open_clip's token embeddings (std 0.02). No separate positional rows: a learned
    # token at a fixed position already is token + position in one vector.
    model.text_extra_class_embedding = nn.Parameter(
        0.02 * torch.randn(k - 1, ref.shape[1], device=ref.device, dtype=ref.dtype))
    proj = model.text_projection
    if isinstance(proj, nn.Linear):
        narrow = nn.Linear(proj.in_features, proj.out_features // k, bias=proj.bias is not None)
        narrow.to(device=proj.weight.device, dtype=proj.weight.dtype)
        with torch.no_grad():
            narrow.weight.copy_(proj.weight[: narrow.out_features])
            if proj.bias is not None:
                narrow.bias.copy_(proj.bias[: narrow.out_features])
        model.text_projection = narrow
    else:
        model.text_projection = nn.Parameter(proj.detach()[:, : proj.shape[1] // k].clone())


# ---------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------
def _check_image_tower(visual: nn.Module) -> int:
    """The image tower's output width, if make_oblique knows how to give it K tokens."""
    if type(visual) is ModifiedResNet and type(visual.attnpool) is AttentionPool2d:
        return visual.attnpool.c_proj.out_features
    if type(visual) is VisionTransformer and visual.attn_pool is None and visual.pool_type == "tok":
        if visual.proj is None:
            raise ValueError("make_oblique needs both towers' projections (the shared per-token projection)")
        return visual.proj.shape[1]
    raise ValueError("make_oblique needs open_clip's ViT image tower with class-token pooling (no attentional "
                     f"pool, pool_type 'tok') or its ModifiedResNet, got {type(visual).__name__}")


def _check_convertible(model: CLIP, k: int, topology: str = "oblique") -> None:
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"oblique K must be a positive integer, got {k!r}")
    if topology not in TOPOLOGIES:
        raise ValueError(f"oblique topology must be one of {', '.join(TOPOLOGIES)}, got {topology!r}")
    if getattr(model, "oblique_k", 1) != 1 or isinstance(model, ObliqueCLIP):
        raise ValueError(f"model is already oblique with K={model.oblique_k}")
    if type(model) is not CLIP:
        raise ValueError(f"make_oblique needs an open_clip CLIP with open_clip's own text tower, "
                         f"got {type(model).__name__}")
    image_dim = _check_image_tower(model.visual)
    if model.text_projection is None:
        raise ValueError("make_oblique needs both towers' projections (the shared per-token projection)")
    text_dim = (model.text_projection.out_features if isinstance(model.text_projection, nn.Linear)
                else model.text_projection.shape[1])
    if image_dim % k or text_dim % k:
        raise ValueError(f"embed_dim {image_dim} is not divisible by K={k}")


def _to_oblique(model: CLIP, k: int, topology: str = "oblique") -> CLIP:
    """The conversion itself, for any K >= 1 (K = 1 adds empty parameters and matches stock)."""
    _check_convertible(model, k, topology)
    _oblique_visual(model.visual, k)
    _oblique_text(model, k)
    model.oblique_k, model.oblique_topology = k, topology
    model.__class__ = ObliqueCLIP
    return model


def make_oblique(model: CLIP, k: int, topology: str = "oblique") -> CLIP:
    """Make a stock open_clip CLIP a K-token oblique model in place (see the module docstring).

    encode_image / encode_text then return (N, K, D/K), each token unit-norm with normalize=True
    (topology "sphere": their (N, D) concatenation, unit-norm), and forward returns (image_features,
    text_features, logit_scale) with those shapes. K and the topology are stored as `model.oblique_k`
    and `model.oblique_topology`. K = 1 returns the model unchanged (stock CLIP, features (N, D)).
    """
    if k == 1:
        _check_convertible(model, 1, topology)
        model.oblique_k = 1
        return model
    return _to_oblique(model, k, topology)


def oblique_similarity(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """(N, K, d) x (M, K, d) -> (N, M): sum_k <u_k, v_k>, token k against token k only.

    Equal to the inner product of the flattened (N, K*d) vectors; in [-K, K] for unit tokens.
    (N, D) inputs are taken as K = 1, so stock features work too.
    """
    u = u.unsqueeze(1) if u.dim() == 2 else u
    v = v.unsqueeze(1) if v.dim() == 2 else v
    if u.dim() != 3 or u.shape[1:] != v.shape[1:]:
        raise ValueError(f"oblique features must be (N, K, d) with equal K and d, got {tuple(u.shape)} "
                         f"and {tuple(v.shape)}")
    return torch.einsum("nkd,mkd->nm", u, v)


def save_oblique(model: nn.Module, path: str | Path, model_name: str | None = None) -> None:
    """Write {format, oblique_k, topology, model_name, state_dict}; `load_oblique` reads it back.

    Stock open_clip (`create_model_and_transforms(name, pretrained=path)`) refuses this file: the
    extra class tokens are unexpected keys and the projections are D/K wide. That is deliberate.
    """
    model = getattr(model, "module", model)  # a DDP wrapper saves its inner model's names
    payload = {"format": CHECKPOINT_FORMAT, "oblique_k": int(getattr(model, "oblique_k", 1)),
               "topology": getattr(model, "oblique_topology", "oblique"), "model_name": model_name,
               "state_dict": model.state_dict()}
    save_torch(payload, path)  # a killed save never leaves a checkpoint that looks complete (local or object store)


def load_oblique(name: str, path: str | Path, k: int, device: str | torch.device = "cpu"):
    """(model, train transform, eval transform, tokenizer), like `train.models.create_model`, for an
    oblique checkpoint written by `save_oblique`; loaded with torch.load(weights_only=True).

    Only this loader reads oblique checkpoints: stock open_clip refuses them. Raises ValueError for
    a checkpoint that is not oblique (a stock one loads with `create_model(name, pretrained=path)`),
    for a different K, or for a different model name when the checkpoint records one. A bare
    state dict of an oblique model (no header) is accepted too, its K read from its class tokens.
    The model gets the checkpoint's topology (none recorded: "oblique").
    """
    try:
        payload = load_torch(path, map_location=device, weights_only=True)  # local or an fsspec url
    except FileNotFoundError:
        raise FileNotFoundError(f"checkpoint not found: {path}") from None
    tokens = next((key for key in IMAGE_TOKENS if isinstance(payload, dict) and key in payload), None)
    if tokens is not None:
        # A bare state dict of an oblique model (e.g. a plain save_checkpoint): K is its token count.
        payload = {"format": CHECKPOINT_FORMAT, "oblique_k": payload[tokens].shape[0] + 1, "state_dict": payload}
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not an oblique checkpoint (no '{CHECKPOINT_FORMAT}' header); a stock "
                         f"open_clip checkpoint loads with train.models.create_model(name, pretrained=path)")
    if payload["oblique_k"] != k:
        raise ValueError(f"{path}: checkpoint has K={payload['oblique_k']}, asked for K={k}")
    if payload.get("model_name") not in (None, name):
        raise ValueError(f"{path}: checkpoint is a '{payload['model_name']}' model, asked for '{name}'")
    model, preprocess_train, preprocess_val, tokenizer = create_model(name, device=device)
    model = make_oblique(model, k, payload.get("topology", "oblique"))
    model.load_state_dict(payload["state_dict"])  # strict: any other mismatch names its keys
    return model, preprocess_train, preprocess_val, tokenizer
