"""`softcurate`: one subcommand per stage, and `run` to chain the stages a config lists.

Stage options are generated from the config models, so `--help` documents every key and a CLI
option is only another way to write `--set section.key=value`.
"""

from __future__ import annotations

import argparse
import importlib
import subprocess
import sys
import typing

from pydantic import BaseModel

from pipelines.config import (
    AuditConfig,
    CompareConfig,
    Config,
    ConfigError,
    CurateConfig,
    EvaluateConfig,
    ScoreConfig,
    ShardConfig,
    TrainConfig,
    load_config,
)
from pipelines.urllist import InputError
from pipelines.world import serving

RENAMED = {"input.path": "input"}  # `--input urls.tsv` reads better than `--path`
INLINE = {"input"}  # sub-sections whose options need no prefix (`--format`, not `--input-format`)


def stage(name: str):
    """`pipelines.<name>.run_<name>`, imported when the stage runs (so `--help` never imports torch); a demo
    config's world is served on loopback while the shard stage downloads its list."""
    def run(config: Config) -> dict:
        run_stage = getattr(importlib.import_module(f"pipelines.{name}"), f"run_{name}")
        if name != "shard":
            return run_stage(config)
        with serving(config) as served:
            return run_stage(served)

    return run


STAGES = {name: stage(name) for name in ("world", "shard", "train", "score", "audit", "curate", "evaluate", "compare")}


def model_options(parser: argparse.ArgumentParser, model: type[BaseModel], section: str, prefix: str = "") -> None:
    """One option per field of `model` (recursing into sub-models), stored under its dotted key."""
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        inner = typing.get_args(field.annotation)
        if typing.get_origin(field.annotation) is dict or (inner and isinstance(inner[0], type) and issubclass(inner[0], BaseModel)):
            continue  # free-form mappings (loss_args) and lists of sections (curate.policy) only through --set
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            model_options(parser, field.annotation, section, prefix=f"{key}.")
            continue
        flag = "--" + RENAMED.get(key, name if prefix.rstrip(".") in INLINE else key).replace("_", "-").replace(".", "-")
        kind = field.annotation
        args = [a for a in typing.get_args(kind) if a is not type(None)]
        base = args[0] if args and typing.get_origin(kind) is typing.Union else kind
        kw: dict = {"dest": f"{section}.{key}", "default": argparse.SUPPRESS,
                    "help": f"{field.description} (default: {field.default})"}
        if base is bool:
            kw["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(base) is typing.Literal:
            kw["choices"] = typing.get_args(base)
        elif typing.get_origin(base) is list:
            kw["nargs"] = "*"
        elif base in (int, float):
            kw["type"] = base
        if "choices" not in kw and base is not bool:
            kw["metavar"] = "N" if base is int else "X" if base is float else name.upper()
        parser.add_argument(flag, **kw)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="softcurate", description="Noise curation and soft labels for CLIP-style image-text data.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help: str, config_required: bool = True) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help)
        p.add_argument("config", nargs=None if config_required else "?", help="YAML config (e.g. configs/demo.yaml)")
        p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config key, e.g. --set shard.processes=4 (repeatable)")
        p.add_argument("--root", dest="root", default=argparse.SUPPRESS,
                       help="dataset root (a local path or fsspec url); overrides the config's root")
        p.add_argument("--truth", dest="truth", default=argparse.SUPPRESS, metavar="TABLE",
                       help="a labels table (Parquet or CSV: key, url or row, and noisy): score, audit and compare "
                            "then report how well each score finds the noisy pairs")
        return p

    command("run", "run the stages the config lists (its `stages` key), in order")
    world = command("world", "build the demo world: images, captions with known noise, clean val/test splits")
    world.add_argument("--serve", action="store_true", help="then serve it on loopback until Ctrl-C")
    shard = command("shard", "turn a url list into WebDataset shards (img2dataset on Dask)", config_required=False)
    model_options(shard, ShardConfig, "shard")
    train = command("train", "train an open_clip model (CLIP, SoftCLIP, oblique, MMCL) on shards", config_required=False)
    model_options(train, TrainConfig, "train")
    score = command("score", "score every pair with a teacher: embeddings, noise scores, clean_prob, neighbours",
                    config_required=False)
    model_options(score, ScoreConfig, "score")
    audit = command("audit", "the noise audit report: audit/index.html, summary.json, figures", config_required=False)
    model_options(audit, AuditConfig, "audit")
    curate = command("curate", "apply a selection policy: keep-list, and with --export curated shards and unpaired pools",
                     config_required=False)
    model_options(curate, CurateConfig, "curate")
    evaluate = command("evaluate", "zero-shot and retrieval of checkpoints, with the dot product and with DN",
                       config_required=False)
    model_options(evaluate, EvaluateConfig, "evaluate")
    compare = command("compare", "train the compare rows (students) with one budget and evaluate them side by side",
                      config_required=False)
    model_options(compare, CompareConfig, "compare")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    values = {k: v for k, v in vars(args).items() if "." in k or k in ("root", "truth")}
    try:
        config = load_config(args.config, args.overrides, values)
        stages = config.stages if args.command == "run" else [args.command]
        for stage in stages:
            result = STAGES[stage](config)
            if result.get("incomplete_shards"):
                print(f"softcurate {stage}: {len(result['incomplete_shards'])} shard(s) did not complete; "
                      "re-run the same command to retry them", file=sys.stderr)
                return 1
        if args.command == "world" and args.serve:
            serve_forever(config)
    except (ConfigError, InputError) as err:
        print(f"softcurate {args.command}: error: {err}", file=sys.stderr)
        return 2
    except subprocess.CalledProcessError as err:  # torchrun lost a rank: its own log says which and why
        print(f"softcurate {args.command}: error: {' '.join(map(str, err.cmd[:6]))} ... exited with status "
              f"{err.returncode}; re-run the same command to resume from the last checkpoint", file=sys.stderr)
        return 1
    except KeyboardInterrupt as stop:
        print(f"softcurate {args.command}: {stop or 'interrupted; re-run the same command to resume'}", file=sys.stderr)
        return 130
    return 0


def serve_forever(config: Config) -> None:
    import threading

    from pipelines.world import write_url_list
    from pipelines.world_server import serve_world

    with serve_world(config.world_dir(), config.world.host, config.world.port, config.world.timeout_delay) as base:
        tsv, parquet = write_url_list(config.world_dir(), base)
        print(f"serving {config.world_dir()} at {base}; url list {tsv} (Ctrl-C stops)")
        threading.Event().wait()


if __name__ == "__main__":
    sys.exit(main())
