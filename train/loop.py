"""The training loop: AdamW with warmup + cosine, clipping, AMP, DDP under torchrun, checkpoints, exact resume.

`train(cfg)` takes a train.config.TrainConfig (shards, output and every setting), built by the train
stage from YAML or in a notebook in a line. Run it under `torchrun` for several processes: gloo on the
CPU, NCCL on GPUs, no code change. The loss says what it needs (its score_fields, takes_weight and
logit-scale range, train/losses/clip.py); the loop reads nothing else of it.
"""

from __future__ import annotations

import copy
import json
import math
import shutil
import signal
import tempfile
import threading
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import fsspec
import numpy as np
import torch
from fsspec.implementations.local import LocalFileSystem
from open_clip_train.scheduler import cosine_lr
from tqdm import tqdm

from train.data import (
    check_scores,
    count_samples,
    has_captions,
    keep_list_summary,
    make_pipeline,
    nonempty_shards,
)
from train.distributed import DistEnv, init_distributed
from train.evaluate import retrieval_recall
from train.losses import UnpairedLoss, build_loss, joint, teacher_pairs
from train.losses.clip import flat
from train.models import create_model, load_torch, save_checkpoint, save_torch

NOT_IN_BAR = ("step", "epoch", "lr", "skipped_samples")


class SetupError(ValueError):
    """Training cannot start as configured (model, checkpoint, loss, scores); raised before the first step."""


@dataclass
class Run:
    """One run's parts, built and checked by `setup` before the first step."""

    cfg: Any
    out: str
    env: DistEnv
    urls: list[str]
    model: torch.nn.Module
    preprocess_train: Any
    preprocess_val: Any
    tokenizer: Any
    loss_fn: torch.nn.Module
    pools: dict | None
    steps_per_epoch: int
    paired_steps: int  # stage 1: the paired budget, as a CLIP run of the same config
    total_steps: int  # + the sequential schedule's unpaired steps (stage 2)


def train(cfg) -> dict:
    env = init_distributed(cfg.device)
    torch.manual_seed(seed_of(cfg))  # same initial weights on every rank (DDP also broadcasts rank 0's)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    run = setup(cfg, env)
    model, out = run.model, run.out
    scale_range = logit_scale_range(model, run.loss_fn)
    optimizer = make_optimizer(model, cfg.lr, cfg.weight_decay)
    ddp = torch.nn.parallel.DistributedDataParallel(model) if env.world_size > 1 else model
    if cfg.compile:
        ddp = torch.compile(ddp)
    # Stage 2 restarts the schedule (its own warmup and cosine over unpaired.steps) rather than sharing one
    # cosine with stage 1: stage 1 then sees exactly the LR curve of the CLIP baseline it must equal.
    paired_lr = cosine_lr(optimizer, cfg.lr, cfg.warmup_steps, run.paired_steps)
    unpaired_lr = cosine_lr(optimizer, cfg.lr, cfg.warmup_steps, run.total_steps - run.paired_steps)

    def schedule(step: int) -> float:
        return paired_lr(step) if step < run.paired_steps else unpaired_lr(step - run.paired_steps)

    best = {"val_recall": -1.0, "teacher_recall": -1.0, "epoch_end": 0, "epoch": None}  # carried in the checkpoint so resume keeps the best
    uses_teacher = bool(run.pools) and cfg.unpaired.pairing == "teacher"
    # joint: the teacher is the (pretrained, setup checks) model at step 0; sequential: made when stage 2 begins
    teacher = frozen_copy(model) if uses_teacher and cfg.unpaired.schedule == "joint" else None
    step, saved_teacher = load_state(f"{out}/checkpoints/latest.pt", model, optimizer, best) if cfg.resume else (0, None)
    if saved_teacher is not None:  # the teacher the run had, not a copy of the resumed model
        teacher = teacher or frozen_copy(model)
        teacher.load_state_dict(saved_teacher)
    # killed between an epoch's last step and the end of its validation: that epoch's end is done again
    epoch_end_pending = bool(step) and at_epoch_end(run, step) and best["epoch_end"] != step
    log = MetricLog(out, step, enabled=env.is_main, redo_validation=epoch_end_pending)
    unpaired = UnpairedStreams(cfg, run.pools, run.preprocess_train, run.tokenizer, env, run.steps_per_epoch) \
        if run.pools else None
    autocast = torch.autocast(env.device.type, dtype=torch.bfloat16, enabled=use_bf16(cfg.precision, env.device))
    skipped = 0

    def end_epoch() -> None:
        """Epoch checkpoint and validation, marked in the state so a resumed run neither skips nor repeats them.
        The end of stage 1 is an epoch end; stage 2 begins there, and its teacher is the model of that step."""
        nonlocal teacher
        if cfg.epoch_checkpoints and env.is_main:  # the teacher's training dynamics, for the score stage
            export(model, cfg.model, f"{out}/checkpoints/epoch_{math.ceil(step / run.steps_per_epoch):03d}.pt")
        validate(run, log, step, best, teacher)
        if step == run.paired_steps < run.total_steps:
            # best.pt from here on is chosen among stage-2 models: stage 1 is what the CLIP baseline trains
            best.update(val_recall=-1.0, teacher_recall=-1.0)
            teacher = frozen_copy(model) if uses_teacher else None
        best["epoch_end"] = step
        if env.is_main:
            log.sync()
            save_state(f"{out}/checkpoints/latest.pt", model, optimizer, step, best, teacher)

    if epoch_end_pending:
        end_epoch()
    bar = tqdm(total=run.total_steps, initial=step, disable=not env.is_main, unit="step", dynamic_ncols=True,
               mininterval=1.0)
    stop = install_stop_handlers()
    try:
        while step < run.total_steps:
            stage_end = run.paired_steps if step < run.paired_steps else run.total_steps
            epoch, skip, batches = stage_epoch(run, unpaired, step)
            tick = time.perf_counter()
            for i, batch in enumerate(batches):
                if i < skip:  # resume: replay the epoch's order, skip what was already trained on
                    continue
                if i >= run.steps_per_epoch or step >= stage_end:
                    break
                lr = schedule(step)
                skipped += batch["skipped"]
                terms = train_step(run, ddp, optimizer, batch, autocast, scale_range, unpaired, teacher)
                step += 1
                now = time.perf_counter()
                rate, tick = cfg.batch_size * env.world_size / (now - tick), now
                row = {"step": step, "epoch": epoch, "lr": lr, "logit_scale": model.logit_scale.exp().item(),
                       "samples_per_s": rate, "skipped_samples": skipped, **{k: v.item() for k, v in terms.items()}}
                log.write(row, every=cfg.log_every)
                bar.update(1)
                bar.set_postfix({k: f"{v:.3g}" for k, v in row.items() if k not in NOT_IN_BAR})
                if env.is_main and (step % cfg.checkpoint_every == 0 or step == run.total_steps):
                    log.sync()  # metrics first: a kill between the two leaves them ahead, and resume trims them
                    save_state(f"{out}/checkpoints/latest.pt", model, optimizer, step, best, teacher)
                if stop.is_set():
                    raise KeyboardInterrupt
            if at_epoch_end(run, step):
                end_epoch()
    except (KeyboardInterrupt, RuntimeError) as err:
        # Stopped between steps (Ctrl-C, SIGTERM, or the data workers killed with us): the state is consistent.
        if not (stop.is_set() or isinstance(err, KeyboardInterrupt)):
            raise
        if env.is_main:
            log.sync()
            save_state(f"{out}/checkpoints/latest.pt", model, optimizer, step, best, teacher)
        log.close()
        raise KeyboardInterrupt(f"stopped at step {step}; checkpoint saved, re-run to resume") from None
    bar.close()
    if env.is_main:
        export(model, cfg.model, f"{out}/checkpoints/final.pt")
    log.close()
    env.barrier()
    return {"steps": step, "steps_per_epoch": run.steps_per_epoch, "skipped_samples": skipped,
            "best_val_recall": best["val_recall"], "best_epoch": best["epoch"], "final_checkpoint": f"{out}/checkpoints/final.pt", "last": log.last}


def seed_of(cfg) -> int:
    return cfg.seed if cfg.seed is not None else 0


def setup(cfg, env: DistEnv) -> Run:
    """Model, loss and data, each checked against the others: whatever cannot work fails here, before step 1."""
    try:
        urls = nonempty_shards(cfg.shards)
        model, preprocess_train, preprocess_val, tokenizer = create_model(cfg.model, cfg.pretrained, env.device)
        loss_fn = build_loss(cfg.loss, rank=env.rank, world_size=env.world_size, **cfg.loss_args)
        if cfg.oblique_k > 1:
            from train.oblique import make_oblique
            model = make_oblique(model, cfg.oblique_k, loss_fn.topology).to(env.device)
        if needs_scores(loss_fn, cfg):
            check_scores(urls, [*loss_fn.score_fields.values(), *(["clean_prob"] if cfg.min_clean_prob is not None else [])],
                         cfg.scores)
        samples = kept_pairs(cfg.keep_list, cfg.loss, loss_fn) if cfg.keep_list else count_samples(urls)
        pools = unpaired_pools(cfg.unpaired)
        if pools and cfg.unpaired.pairing == "teacher" and cfg.unpaired.schedule == "joint" and not cfg.pretrained:
            raise ValueError("unpaired.pairing teacher under the joint schedule pairs with the model at step 0, which "
                             "needs trained weights: set train.pretrained, or use schedule sequential (its teacher is "
                             "the stage-1 model)")
    except (ValueError, TypeError, KeyError, RuntimeError, FileNotFoundError) as err:
        raise SetupError(str(err).splitlines()[0] if str(err) else repr(err)) from err
    if cfg.grad_checkpointing:
        model.set_grad_checkpointing(True)
    steps_per_epoch = max(1, samples // (cfg.batch_size * env.world_size))
    paired_steps = cfg.max_steps or cfg.epochs * steps_per_epoch
    unpaired_steps = cfg.unpaired.steps if pools and cfg.unpaired.schedule == "sequential" else 0
    return Run(cfg, (cfg.output or f"runs/{cfg.name}").rstrip("/"), env, urls, model, preprocess_train, preprocess_val,
               tokenizer, loss_fn, pools, steps_per_epoch, paired_steps, paired_steps + unpaired_steps)


def kept_pairs(keep_list: str, loss: str, loss_fn) -> int:
    kept, pairs, weighted = keep_list_summary(keep_list)
    if kept == 0:
        raise ValueError(f"{keep_list} keeps none of its {pairs} pairs; loosen the curate policy")
    if weighted and not loss_fn.takes_weight:
        raise ValueError(f"{keep_list} weights its pairs, but the {loss} loss takes no weights")
    return kept


def logit_scale_range(model, loss_fn) -> tuple[float, float]:
    """The loss's range for log s (the loop clamps to it after each step); s starts at the loss's init, if it sets one."""
    if loss_fn.logit_scale_init is not None:
        with torch.no_grad():
            model.logit_scale.fill_(math.log(loss_fn.logit_scale_init))
    return math.log(loss_fn.logit_scale_min), math.log(loss_fn.logit_scale_max)


def at_epoch_end(run: Run, step: int) -> bool:
    """Every steps_per_epoch steps of each stage, and at each stage's end."""
    in_stage = step - run.paired_steps if step > run.paired_steps else step
    return in_stage % run.steps_per_epoch == 0 or step in (run.paired_steps, run.total_steps)


def stage_epoch(run: Run, unpaired, step: int):
    """(epoch, batches of it already trained on, its batches) for the epoch that holds `step`.

    Stage 1: the paired loader's epochs, each batch with an unpaired one under the joint schedule.
    Stage 2: rounds of steps_per_epoch unpaired batches, numbered on after stage 1's epochs.
    """
    if step >= run.paired_steps:
        round_, skip = divmod(step - run.paired_steps, run.steps_per_epoch)
        return (math.ceil(run.paired_steps / run.steps_per_epoch) + round_, skip,
                ({"unpaired": pair, "skipped": 0} for pair in unpaired.round(round_, stage=2)))
    epoch, skip = divmod(step, run.steps_per_epoch)
    if unpaired is None or run.cfg.unpaired.schedule == "sequential":
        return epoch, skip, epoch_loader(run, epoch)
    batches = zip(epoch_loader(run, epoch), unpaired.round(epoch))  # drawn in step: a resumed epoch replays both
    return epoch, skip, ({**pairs, "unpaired": pair} for pairs, pair in batches)


def epoch_loader(run: Run, epoch: int) -> torch.utils.data.DataLoader:
    """One epoch's batches. The augmentations' random state (the loader workers' seeds, or this process's
    own with workers=0) is a function of seed, epoch and rank, not of what ran before: a run resumed at
    any step replays it."""
    cfg = run.cfg
    torch.manual_seed(epoch_seed(seed_of(cfg), epoch, run.env.rank))
    pipeline = make_pipeline(run.urls, run.preprocess_train, run.tokenizer, cfg.batch_size, seed=seed_of(cfg), epoch=epoch,
                             batches_per_worker=math.ceil(run.steps_per_epoch / max(1, cfg.workers)),
                             min_clean_prob=cfg.min_clean_prob, require_scores=needs_scores(run.loss_fn, cfg),
                             keep_list=cfg.keep_list, score_columns=tuple(run.loss_fn.score_fields.values()),
                             scores=cfg.scores)
    return torch.utils.data.DataLoader(pipeline, batch_size=None, num_workers=cfg.workers,
                                       pin_memory=run.env.device.type == "cuda")


def train_step(run: Run, ddp, optimizer, batch, autocast, scale_range, unpaired, teacher) -> dict:
    """One optimiser step on one batch: pairs (with an unpaired batch under the joint schedule), or an
    unpaired batch alone (stage 2); returns the loss terms (detached by the caller's .item())."""
    model, device = run.model, run.env.device
    model.train()
    with autocast:
        if "image" in batch:
            image_features, text_features, logit_scale = ddp(batch["image"].to(device, non_blocking=True),
                                                             batch["text"].to(device, non_blocking=True))
            terms = call_loss(run.loss_fn, image_features, text_features, logit_scale, batch, device)
            if "unpaired" in batch:  # encoded around DDP, whose one forward per step was the pairs'
                images, texts = (x.to(device, non_blocking=True) for x in batch["unpaired"])
                u, w = model.encode_image(images, normalize=True), model.encode_text(texts, normalize=True)
                terms = joint(terms, unpaired.loss(u, w, logit_scale, teacher, images, texts), unpaired.cfg.gamma)
        else:  # stage 2: through DDP's forward, so the gradients are averaged over ranks
            images, texts = (x.to(device, non_blocking=True) for x in batch["unpaired"])
            u, w, logit_scale = ddp(images, texts)
            terms = joint(None, unpaired.loss(u, w, logit_scale, teacher, images, texts), unpaired.cfg.gamma)
    optimizer.zero_grad(set_to_none=True)
    terms["loss"].backward()
    if run.cfg.grad_clip:
        torch.nn.utils.clip_grad_norm_(model.parameters(), run.cfg.grad_clip)
    optimizer.step()
    with torch.no_grad():
        model.logit_scale.clamp_(*scale_range)
    return terms


def install_stop_handlers() -> threading.Event:
    """Ctrl-C and SIGTERM ask for a stop at the next step boundary, where the checkpoint is consistent."""
    stop = threading.Event()
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
    return stop


def export(model, name: str, path: str) -> None:
    """Stock models as plain open_clip state dicts; oblique ones in our format (train.oblique.load_oblique)."""
    if getattr(model, "oblique_k", 1) > 1:
        from train.oblique import save_oblique
        save_oblique(model, path, model_name=name)
    else:
        save_checkpoint(model, path)


def make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW with no decay on gains, biases, the logit scale and class tokens, as open_clip_train does."""
    tokens = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()

    def no_decay(name, p):
        return p.ndim < 2 or "bias" in name or "logit_scale" in name or name in tokens

    exclude = [p for n, p in model.named_parameters() if no_decay(n, p)]
    decay = [p for n, p in model.named_parameters() if not no_decay(n, p)]
    return torch.optim.AdamW([{"params": exclude, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}],
                             lr=lr, betas=(0.9, 0.98), eps=1e-6)


def use_bf16(precision: str, device: torch.device) -> bool:
    return precision == "bf16" or (precision == "auto" and device.type == "cuda")


def needs_scores(loss_fn, cfg) -> bool:
    return bool(loss_fn.score_fields) or cfg.min_clean_prob is not None


def call_loss(loss_fn, image_features, text_features, logit_scale, batch: dict, device) -> dict:
    """The loss with the batch fields it declares (its score_fields, and the keep-list's weight if it takes one)."""
    extras = {arg: batch[column].to(device) for arg, column in loss_fn.score_fields.items()}
    if loss_fn.takes_weight and "weight" in batch:
        extras["weight"] = batch["weight"].to(device)
    return loss_fn(image_features, text_features, logit_scale, **extras)


def unpaired_pools(cfg) -> dict | None:
    """The pools' shards, checked before the first step: None when the run has no unpaired data."""
    if cfg.batching == "aligned":
        if not cfg.images:
            raise ValueError("unpaired.batching aligned draws from train.unpaired.images: set it")
        images = nonempty_shards(cfg.images)
        if not has_captions(images[0]):
            raise ValueError(f"unpaired.batching aligned needs pool images that carry their caption (txt); {images[0]} "
                             "has none: re-export the pools with `softcurate curate --export`")
        return {"images": images}
    if not (cfg.images or cfg.texts):
        if cfg.schedule == "sequential":
            raise ValueError("unpaired.schedule sequential trains on the unpaired pools after the pairs: set "
                             "train.unpaired.images and train.unpaired.texts")
        return None
    if not (cfg.images and cfg.texts):
        raise ValueError("unpaired training needs both train.unpaired.images and train.unpaired.texts")
    return {"images": nonempty_shards(cfg.images), "texts": nonempty_shards(cfg.texts)}


class UnpairedStreams:
    """MMCL's unpaired images and texts, in rounds of steps_per_epoch batches, and their pseudo-paired loss.

    independent: two streams, each pool shuffled on its own. aligned: one stream of the image pool's rows
    with their captions, so a batch holds its images' partners; the unpaired loss pairs by similarity
    (top-K or the teacher's argmax) and never by position, so this hides the correspondence as the
    authors' experiment does (docs/METHODS.md section 5). A round is drawn with a seed of (seed, round)
    as a paired epoch is, so a resumed run replays it."""

    def __init__(self, cfg, pools: dict, preprocess, tokenizer, env, steps_per_round: int):
        self.cfg, self.env, self.pools, self.seed = cfg.unpaired, env, pools, seed_of(cfg)
        self.preprocess, self.tokenizer, self.steps_per_round = preprocess, tokenizer, steps_per_round
        self.unpaired_loss = UnpairedLoss()

    def round(self, index: int, stage: int = 1):
        """Round `index`'s (images, texts) batches. In stage 2 (no paired loader) it seeds the
        augmentations itself; in stage 1 the paired epoch has, and both are drawn in step."""
        if stage == 2:
            torch.manual_seed(epoch_seed(self.seed + 1, index, self.env.rank))
        stream = partial(make_pipeline, preprocess=self.preprocess, tokenizer=self.tokenizer,
                         batch_size=self.cfg.batch_size, seed=self.seed + 1, epoch=index,
                         batches_per_worker=self.steps_per_round)
        if "texts" in self.pools:
            images, texts = stream(self.pools["images"], modality="image"), stream(self.pools["texts"], modality="text")
            return ((i["image"], t["text"]) for i, t in zip(images, texts))
        return ((r["image"], r["text"]) for r in stream(self.pools["images"], modality="pair", complete_only=True))

    def loss(self, image_features, text_features, logit_scale, teacher, images, texts) -> dict:
        """L_u of the batch's features, pseudo-paired by top-K or by the frozen teacher's argmax partners."""
        pairs = None
        if teacher is not None:
            with torch.no_grad():
                pairs = teacher_pairs(flat(teacher.encode_image(images, normalize=True)) @
                                      flat(teacher.encode_text(texts, normalize=True)).T)
        return self.unpaired_loss(flat(image_features), flat(text_features), logit_scale, pairs=pairs)


def frozen_copy(model) -> torch.nn.Module:
    return copy.deepcopy(model).eval().requires_grad_(False)


@torch.no_grad()
def validate(run: Run, log, step: int, best: dict, teacher) -> None:
    """Mean image<->text R@1 on the clean validation split; keep the best checkpoint (rank 0). MMCL's
    teacher, if any, is replaced by the model when the model's recall beats the teacher's by 10%."""
    model, env = run.model, run.env
    if not run.cfg.val_shards:
        env.barrier()
        return
    replace = False
    if env.is_main:
        score = val_recall(run, model, log, step)
        if score > best["val_recall"]:
            best["val_recall"], best["epoch"] = score, math.ceil(step / run.steps_per_epoch)  # best.pt's epoch_NNN.pt
            export(model, run.cfg.model, f"{run.out}/checkpoints/best.pt")
        if teacher is not None:
            if best["teacher_recall"] < 0:  # a new teacher: its own recall, measured once
                best["teacher_recall"] = val_recall(run, teacher)
            replace = score > 1.1 * best["teacher_recall"]
            if replace:
                best["teacher_recall"] = score
    if teacher is not None and env.agree(replace):  # every rank replaces its copy, or none does
        teacher.load_state_dict(model.state_dict())
    env.barrier()


def val_recall(run: Run, model, log=None, step: int = 0) -> float:
    model.eval()
    image_features, text_features = [], []
    for batch in make_pipeline(run.cfg.val_shards, run.preprocess_val, run.tokenizer, 256):
        image_features.append(flat(model.encode_image(batch["image"].to(run.env.device), normalize=True)).float())
        text_features.append(flat(model.encode_text(batch["text"].to(run.env.device), normalize=True)).float())
    recall = retrieval_recall(torch.cat(image_features), torch.cat(text_features), ks=(1,))
    score = (recall["i2t_R@1"] + recall["t2i_R@1"]) / 2
    if log is not None:
        log.write({"step": step, "val_recall@1": score, **{f"val_{k}": v for k, v in recall.items()}}, every=1)
    return score


def save_state(path: str, model, optimizer, step: int, best: dict, teacher=None) -> None:
    # a kill during the save leaves the previous checkpoint intact (save_torch: rename locally, one put in a store)
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step, "best": best}
    if teacher is not None:  # MMCL's frozen teacher: a resumed run pairs with the same one
        state["teacher"] = teacher.state_dict()
    save_torch(state, path)


def load_state(path: str, model, optimizer, best: dict) -> tuple[int, dict | None]:
    """The step to resume at and the saved teacher's state dict (None without one); (0, None) without a checkpoint."""
    try:
        state = load_torch(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        return 0, None
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    best.update(state.get("best", {}))
    return int(state["step"]), state.get("teacher")


def epoch_seed(seed: int, epoch: int, rank: int) -> int:
    return int(np.random.SeedSequence([seed, epoch, rank]).generate_state(1, np.uint64)[0])


def kept_row(row: dict, resumed_step: int, redo_validation: bool) -> bool:
    """Rows up to the checkpoint, but not its step's validation when the resumed run validates again."""
    return row["step"] < resumed_step or (row["step"] == resumed_step and not (redo_validation and "val_recall@1" in row))


def whole_row(line: str) -> bool:
    """False for the last line of a run killed in the middle of writing it."""
    try:
        return isinstance(json.loads(line), dict)
    except ValueError:
        return False


class MetricLog:
    """metrics.jsonl and TensorBoard on rank 0; a resumed run drops rows past its checkpoint.

    An object store has no appends: there both go to a local staging folder that `sync` uploads,
    each file in one put, at every checkpoint and at the end (what resume needs is then in the store).
    """

    def __init__(self, out: str, resumed_step: int, enabled: bool, redo_validation: bool = False):
        self.enabled, self.last = enabled, {}
        if not enabled:
            return
        self.store, self.store_path = fsspec.core.url_to_fs(out)
        self.staged = not isinstance(self.store, LocalFileSystem)
        out = Path(tempfile.mkdtemp(prefix="softcurate-run-") if self.staged else out)
        if self.staged and self.store.exists(f"{self.store_path}/metrics.jsonl"):  # resuming: the rows so far
            self.store.get_file(f"{self.store_path}/metrics.jsonl", str(out / "metrics.jsonl"))
        self.local = out
        out.mkdir(parents=True, exist_ok=True)
        self.path = out / "metrics.jsonl"
        kept = [line for line in (self.path.read_text().splitlines() if self.path.exists() else [])
                if whole_row(line) and kept_row(json.loads(line), resumed_step, redo_validation)]
        tmp = self.path.with_suffix(".tmp")  # a kill during this rewrite keeps the old rows
        tmp.write_text("".join(line + "\n" for line in kept))
        tmp.replace(self.path)
        self.file = self.path.open("a")
        from torch.utils.tensorboard import SummaryWriter
        self.tb = SummaryWriter(str(out / "tensorboard"), purge_step=resumed_step + 1)

    def write(self, row: dict, every: int) -> None:
        if not self.enabled:
            return
        self.last.update(row)
        if row["step"] % every == 0:
            self.file.write(json.dumps(row, sort_keys=True) + "\n")
            self.file.flush()
            for k, v in row.items():
                if k != "step":
                    self.tb.add_scalar(k, v, row["step"])

    def sync(self) -> None:
        if self.enabled and self.staged:
            self.file.flush()
            self.tb.flush()
            self.upload()

    def upload(self) -> None:
        for path in sorted(self.local.rglob("*")):
            if path.is_file() and path.suffix != ".tmp":
                self.store.put_file(str(path), f"{self.store_path}/{path.relative_to(self.local).as_posix()}")

    def close(self) -> None:
        if self.enabled:
            self.file.close()
            self.tb.close()
            if self.staged:
                self.upload()
                shutil.rmtree(self.local, ignore_errors=True)
