"""The train stage's settings: one validated object, built from YAML by pipelines.config or in a notebook:

    from train.config import TrainConfig
    from train.loop import train
    train(TrainConfig(shards="data/demo/shards/{00000..00003}.tar", output="runs/clip", max_steps=100))

Every key is declared here; an unknown or ill-typed key is an error that names it.
"""

from __future__ import annotations

from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def option(default, help: str, **kw):
    """A config field whose help text is also its CLI --help line."""
    return Field(default, description=help, **kw)


class UnpairedConfig(Strict):
    images: Optional[str] = option(None, "shards whose images are the unpaired image pool (brace notation)")
    texts: Optional[str] = option(None, "shards whose captions are the unpaired text pool (brace notation)")
    batch_size: int = option(64, "unpaired images (and texts) per step", ge=2)
    gamma: float = option(1.0, "weight of the unpaired loss in joint training", ge=0)
    schedule: Literal["joint", "sequential"] = option(
        "joint", "joint: L_pairs + gamma * L_u every step; sequential: the run's paired budget first (as a CLIP run "
        "of the same config), then `steps` unpaired steps (the paper)")
    steps: Optional[int] = option(None, "sequential: unpaired steps after the paired budget (stage 2)", ge=1)
    pairing: Literal["topk", "teacher"] = option(
        "topk", "topk: the m largest similarities of the batch; teacher: a frozen model's argmax partners (sequential: "
        "the stage-1 model; joint: the pretrained model at step 0)")
    batching: Literal["independent", "aligned"] = option(
        "independent", "independent: each pool shuffled on its own; aligned: a step's images and texts come from the "
        "same rows of the image pool (images exported with their rejected caption), so partners share a batch, "
        "as in the MMCL authors' experiment; the loss never sees which text was whose")

    @model_validator(mode="after")
    def steps_for_sequential(self):
        if self.schedule == "sequential" and self.steps is None:
            raise ValueError("unpaired.schedule sequential trains unpaired.steps after the paired budget: set it")
        if self.schedule == "joint" and self.steps is not None:
            raise ValueError("unpaired.steps counts the sequential schedule's unpaired stage; joint has none: unset it")
        return self


class TrainConfig(Strict):
    name: str = option("clip", "run name: outputs go to <root>/runs/<name>")
    shards: Optional[str] = option(None, "training shards (brace notation, local or fsspec); default: the shard stage's")
    scores: Optional[str] = option(None, "the score stage's folder whose NNNNN.parquet joins shard NNNNN.tar; default: scores/ beside shards/ (a pipeline: its score stage's output)")
    val_shards: Optional[str] = option(None, "clean validation shards: each epoch's recall picks best.pt (the demo world's config: its val.tar)")
    output: Optional[str] = option(None, "run folder; default <root>/runs/<name> (runs/<name> outside a pipeline)")
    model: str = option("softcurate-tiny", "open_clip model name")
    pretrained: Optional[str] = option(None, "open_clip pretrained tag or local checkpoint path")
    oblique_k: int = option(1, "class tokens per tower (oblique manifold); 1 is stock CLIP", ge=1)
    loss: str = option("clip", "training objective: a name of train.losses.LOSSES (clip, softclip, oblique, mmcl)")
    loss_args: dict[str, Any] = option({}, "keyword arguments of the loss (e.g. alpha, beta for softclip)")
    unpaired: UnpairedConfig = UnpairedConfig()
    batch_size: int = option(64, "pairs per step per process", ge=2)
    epochs: int = option(10, "passes over the training samples", ge=1)
    max_steps: Optional[int] = option(None, "stop after this many steps (overrides epochs)", ge=1)
    lr: float = option(5e-4, "peak learning rate", gt=0)
    weight_decay: float = option(0.1, "AdamW weight decay (not on gains, biases, logit scale)", ge=0)
    warmup_steps: int = option(50, "linear warmup steps before the cosine decay", ge=0)
    grad_clip: Optional[float] = option(1.0, "gradient norm clip (unset: none)", gt=0)
    precision: Literal["auto", "fp32", "bf16"] = option("auto", "auto: bf16 autocast on GPU, fp32 on CPU")
    grad_checkpointing: bool = option(False, "trade compute for activation memory")
    compile: bool = option(False, "torch.compile the model")
    workers: int = option(2, "data loader worker processes per training process", ge=0)
    threads: Optional[int] = option(None, "torch CPU threads per process (unset: torch's default)", ge=1)
    device: str = option("auto", "auto: cuda when available, else cpu")
    nproc: int = option(1, "processes under torchrun (one per GPU; gloo on CPU)", ge=1)
    epoch_checkpoints: Optional[bool] = option(
        None, "also keep checkpoints/epoch_NNN.pt at each epoch's end (teacher dynamics); unset: in a pipeline, kept when "
              "the score stage will average its teacher's epochs (score.checkpoints unset, teacher_epochs not best)")
    folds: Optional[int] = option(
        None, "a teacher for the score stage: also train this many held-out teachers, each without one fold of the "
              "pairs (by key), so that every pair is scored by a teacher that never saw it (score.teacher_epochs); 1: "
              "none; unset: 2 in a pipeline whose score stage scores with this run (stages train and score, "
              "score.checkpoints unset), else 1", ge=1)
    checkpoint_every: int = option(100, "save a resumable checkpoint every this many steps", ge=1)
    log_every: int = option(10, "write metrics every this many steps", ge=1)
    resume: bool = option(True, "continue from the run folder's latest checkpoint")
    min_clean_prob: Optional[float] = option(None, "train only on pairs whose clean_prob reaches this", ge=0, le=1)
    keep_list: Optional[str] = option(None, "the curate stage's keep.parquet: train only on kept pairs, weighted by it")
    seed: Optional[int] = option(None, "unset: the config's top-level seed (0 outside a pipeline)")

    @field_validator("loss")
    @classmethod
    def known_loss(cls, name: str) -> str:
        from train.losses import LOSSES  # here, not at import: configs that name no loss never load torch

        if name not in LOSSES:
            raise ValueError(f"unknown loss {name!r}; known losses: {', '.join(sorted(LOSSES))}")
        return name
