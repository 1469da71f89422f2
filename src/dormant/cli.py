"""The `dormant` command: thin, parses into configs and calls the library."""
from __future__ import annotations

import argparse
import ast
import json
import shlex
import sys
from dataclasses import fields
from typing import Any, Sequence

from .experiments.compare import WorkerDiedError
from .experiments.config import _MAPPINGS, ConfigError, ExperimentConfig, load_config_file
from .train.loop import COMPILE_MODES, MEMORY_FORMATS, PRECISIONS


def _parse_mapping(text: str) -> dict[str, Any]:
    """``"width=512,depth=4"`` -> ``{"width": 512, "depth": 4}`` (values as Python literals;
    ``true``/``false`` in any case are booleans too, as in the YAML config files)."""
    out: dict[str, Any] = {}
    for item in filter(None, (s.strip() for s in _split_top(text))):
        key, sep, val = item.partition("=")
        if not sep:
            raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {item!r}")
        if val.strip().lower() in ("true", "false"):
            out[key.strip()] = val.strip().lower() == "true"
            continue
        try:
            out[key.strip()] = ast.literal_eval(val.strip())
        except (ValueError, SyntaxError):
            out[key.strip()] = val.strip()
    return out


def _split_top(text: str) -> list[str]:
    """Split on commas outside brackets, so ``widths=[300,100]`` stays whole."""
    parts, depth, cur = [], 0, ""
    for ch in text:
        if ch in "[({":
            depth += 1
        elif ch in "])}":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    return parts + [cur]


_EXAMPLES = {"model_args": "depth=3,width=512", "method_args": "factor=0.05,every=1",
             "dataset_args": "train_size=10000", "schedule_args": "warmup=1,final=0.01",
             "activation_args": "tau=1.0,m=1.0", "init_args": "sparsity=0.85,v_prime=0.7"}


def _registries() -> dict:
    from .activations import ACTIVATIONS
    from .criteria import CRITERIA
    from .data import DATASETS
    from .methods import METHODS
    from .models import INITS, MODELS
    from .schedules import SCHEDULES
    from .train.loop import OPTIMIZERS
    return {"dataset": DATASETS, "model": MODELS, "activation": ACTIVATIONS, "init": INITS,
            "optimizer": OPTIMIZERS, "schedule": SCHEDULES, "method": METHODS,
            "criterion": CRITERIA}


_MEANING = {"monitor_every": "watch every N-th training step (dynamic DNR, gradient norm; the "
                             "epoch-end probe pass is always exact); "}
_CHOICES = {"precision": PRECISIONS, "memory_format": MEMORY_FORMATS,   # fixed value sets
            "compile": COMPILE_MODES}


def _add_config_flags(p: argparse.ArgumentParser) -> None:
    """One flag per ExperimentConfig field; only flags given on the command line override."""
    g = p.add_argument_group("experiment config (override the preset/config file)")
    defaults, regs = ExperimentConfig(), _registries()
    for f in fields(ExperimentConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.name in _MAPPINGS:
            g.add_argument(flag, type=_parse_mapping, default=None, metavar="K=V,...",
                           help=f"options for the {f.name.split('_')[0]}, "
                                f"e.g. {_EXAMPLES.get(f.name, 'key=value')}")
        else:
            typ = {"int": int, "float": float}.get(str(f.type), str)
            names = regs[f.name].names() if f.name in regs else _CHOICES.get(f.name, ())
            choices = f"; one of: {', '.join(names)}" if names else ""
            g.add_argument(flag, type=typ, default=None,
                           help=f"{_MEANING.get(f.name, '')}default: "
                                f"{getattr(defaults, f.name)}{choices}")


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    return {f.name: getattr(args, f.name) for f in fields(ExperimentConfig)
            if getattr(args, f.name, None) is not None}


def _base_config(args) -> ExperimentConfig:
    from .experiments import PRESETS
    if args.preset and args.config:
        raise ConfigError("give --preset or --config, not both")
    if args.preset:
        cfg = PRESETS.get(args.preset)()
        if not isinstance(cfg, ExperimentConfig):
            raise ConfigError(f"preset {args.preset!r} is a comparison; use `dormant compare "
                              f"--preset {args.preset}`")
    elif args.config:
        cfg = ExperimentConfig.from_dict(load_config_file(args.config))
    else:
        cfg = ExperimentConfig()
    return cfg.override(**_overrides(args))


# -- commands ------------------------------------------------------------------------------
def cmd_list(args) -> int:
    from .experiments import PRESETS
    from .pruning import PRUNERS
    named = _registries()
    regs = {"datasets": named["dataset"], "models": named["model"], "methods": named["method"],
            "presets": PRESETS, "activations": named["activation"],
            "criteria": named["criterion"], "pruners": PRUNERS,
            "schedules": named["schedule"], "inits": named["init"],
            "optimizers": named["optimizer"]}
    for what in args.what or list(regs):
        if what not in regs:
            raise ConfigError(f"cannot list {what!r}; choose from {', '.join(regs)}")
        print(f"{what}:")
        for name, doc in regs[what].describe().items():
            print(f"  {name:<20} {doc}")
            if args.verbose and what == "methods" and name != "none":
                print(_options_table(name, indent="      "))
    return 0


def _options_table(method: str, indent: str = "  ") -> str:
    """Every option of `method`: name, type and range, default, help."""
    from .methods import describe_options
    rows = [("option", "type", "default", "help")] + describe_options(method)
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    return "\n".join(indent + "  ".join(c.ljust(w) for c, w in zip(r[:3], widths)) + "  " + r[3]
                     for r in rows)


def cmd_help(args) -> int:
    from .methods import METHODS
    cls = METHODS.get(args.method)
    if cls is None:
        print("none: plain training (the baseline); no options")
        return 0
    print(f"{args.method}: {METHODS.describe()[args.method]}")
    print(f"in Python: dormant.methods.build({args.method!r}, option=value, ...); on the "
          f"command line: --method {args.method} --method-args option=value,...\n")
    print(_options_table(args.method))
    return 0


def _distributed() -> int:
    """Under torchrun (WORLD_SIZE > 1): join the process group (gloo on CPU, nccl on CUDA);
    returns this process's rank (0 outside torchrun)."""
    import os

    import torch
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0
    if not torch.distributed.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        torch.distributed.init_process_group(backend)
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return torch.distributed.get_rank()


def torch_distributed_on() -> bool:
    import torch
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def cmd_run(args) -> int:
    from .experiments import run_experiment
    cfg = _base_config(args).validate()
    rank = _distributed()
    say = print if rank == 0 else (lambda *a, **k: None)
    res = run_experiment(cfg, args.root, show_progress=not args.no_progress, log=say,
                         epoch_log=lambda line: say(line, flush=True),
                         tensorboard=args.tensorboard, fsdp=args.fsdp)
    if rank != 0:
        return 0
    f = res["final"]
    print(json.dumps({k: f[k] for k in ("epoch", "test_acc", "val_acc", "dead_fraction",
                                        "dead_units", "dynamic_dnr") if k in f}, indent=2))
    print(f"run directory: {res['run_dir']}")
    return 0


def cmd_compare(args) -> int:
    from .experiments import PRESETS, CompareSpec, run_compare
    if bool(args.preset) == bool(args.config):
        raise ConfigError("give exactly one of --preset NAME or --config FILE "
                          f"(presets: {', '.join(PRESETS.names())})")
    if args.preset:
        spec = PRESETS.get(args.preset)()
        if not isinstance(spec, CompareSpec):
            raise ConfigError(f"preset {args.preset!r} is a single run; use `dormant run --preset`")
    else:
        spec = CompareSpec.from_dict(load_config_file(args.config))
    spec.base = spec.base.override(**_overrides(args))
    if args.seeds:
        try:
            spec.seeds = [int(s) for s in args.seeds.split(",")]
        except ValueError:
            raise ConfigError(f"--seeds: expected comma-separated integers, e.g. 0,1,2; got "
                              f"{args.seeds!r}") from None
    rank = _distributed()
    if args.jobs > 1 and torch_distributed_on():
        raise ConfigError("under torchrun every rank trains each run together: use --jobs 1")
    run_compare(spec, args.root, args.out if rank == 0 else None,
                show_progress=not args.no_progress and rank == 0, jobs=args.jobs,
                tensorboard=args.tensorboard, log=print if rank == 0 else (lambda *a: None),
                command=args.command_line)
    if args.out and rank == 0:
        try:
            from .report.html import write_report
            print(f"report: {write_report(args.out, args.root)}")
        except ImportError as err:        # matplotlib not installed: the table is enough
            print(f"(no HTML report: {err})")
    return 0


def cmd_doctor(args) -> int:
    from .criteria import CRITERIA
    from .diagnose import diagnose
    from .experiments import load_run
    CRITERIA.get(args.criterion)        # unknown criteria are refused with the list
    if args.tau is not None and args.criterion != "dormant":
        raise ConfigError(f"--tau applies to --criterion dormant only (got --criterion "
                          f"{args.criterion})")
    cfg, model, data = load_run(args.run_dir)
    params = {"tau": args.tau or 0.0} if args.criterion == "dormant" else {}
    report = diagnose(model, data.split(args.split), criterion=args.criterion, eps=args.eps,
                      **params)
    print(f"{args.run_dir}: {cfg.model} on {cfg.dataset} ({args.split} split)")
    if args.sites:
        from .sites import find_sites, format_sites
        print(format_sites(find_sites(model, data.train.inputs[:2])) + "\n")
    print(report)
    return 0


def cmd_report(args) -> int:
    from .report import load_comparison, plot_curves
    from .report.html import write_report
    cmp = load_comparison(args.out, args.root)
    keys = [k.strip() for k in args.metrics.split(",") if k.strip()]
    have = sorted({k for _, hist in cmp.runs for row in hist for k, v in row.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool)})
    unknown = [k for k in keys if k not in have]
    if unknown:
        raise ConfigError(f"unknown metric(s) {unknown}; the runs have: {', '.join(have)}")
    path = plot_curves(cmp, keys, args.plot or f"{args.out}/curves.png")
    print(f"saved {path}")
    print(f"report: {write_report(args.out, args.root)}")
    return 0


def cmd_download(args) -> int:
    from .data import fashion_mnist
    if args.dataset != "fashion-mnist":
        raise ConfigError(f"only fashion-mnist is downloadable; {args.dataset!r} is built in "
                          "or unknown")
    print(f"saved to {fashion_mnist.download(args.dest)}")
    return 0


def cmd_scan(args) -> int:
    import torch

    from .scanning import scan
    for flag, value in (("--seq-len", args.seq_len), ("--batch-size", args.batch_size),
                        ("--max-tokens", args.max_tokens or 1)):
        if value < 1:
            raise ConfigError(f"{flag} must be >= 1, got {value}")
    report = scan(args.model, args.data, seq_len=args.seq_len, batch_size=args.batch_size,
                  max_tokens=args.max_tokens, device=args.device,
                  dtype=getattr(torch, args.dtype), rare=args.rare,
                  expert_share=args.expert_share,
                  progress=lambda line: print(line, file=sys.stderr, flush=True))
    print(report)
    if args.out:
        folder = report.save(args.out)
        print(f"saved {folder / 'scan.json'} (removal plan: dormant.compact(model, probe, "
              f"plan='{folder / 'scan.json'}')) and {folder / 'scan.html'}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dormant", description="Find, revive and remove dead (dormant) neurons.",
        epilog="Examples: dormant list | dormant help synaptic-stripping | dormant compare --preset dying-relu | "
               "dormant run --dataset fashion-mnist --model lenet300 --epochs 5 | "
               "dormant doctor runs/<run-dir> | dormant report results/ | "
               "dormant scan <hf-model-dir> --data tokens.npy --out scan/")
    sub = p.add_subparsers(dest="command", required=True)

    kinds = ("datasets, models, methods, presets, activations, criteria, pruners, schedules, "
             "inits, optimizers")
    q = sub.add_parser("list", help=kinds)
    q.add_argument("what", nargs="*", help=f"{kinds} (default: all)")
    q.add_argument("-v", "--verbose", action="store_true",
                   help="with methods: every option's type, default and help")
    q.set_defaults(func=cmd_list)

    q = sub.add_parser("help", help="a method's options: type, range, default, help")
    q.add_argument("method", help="a method name (see `dormant list methods`)")
    q.set_defaults(func=cmd_help)

    for name, func, hlp in (("run", cmd_run, "train one experiment (resumes if interrupted)"),
                            ("compare", cmd_compare, "variants x seeds -> mean ± std table")):
        q = sub.add_parser(name, help=hlp)
        q.add_argument("--preset", help="a named preset (see `dormant list presets`)")
        q.add_argument("--config", help="a YAML/JSON file (compare: base, variants, seeds)")
        q.add_argument("--root", default="runs", help="where run directories go (default: runs)")
        q.add_argument("--no-progress", action="store_true", help="no progress bars")
        q.add_argument("--tensorboard", metavar="DIR",
                       help="also write TensorBoard logs (scalars per epoch, per-unit activity "
                            "histograms) to DIR/<run name>; needs the tensorboard package")
        if name == "compare":
            q.add_argument("--seeds", help="comma-separated seeds, e.g. 0,1,2")
            q.add_argument("--out", help="folder for compare.md/.csv/.json")
            q.add_argument("--jobs", type=int, default=1,
                           help="experiments run at once, in separate processes (default: 1)")
        else:
            q.add_argument("--fsdp", action="store_true",
                           help="under torchrun: shard the model over the ranks with FSDP2 "
                                "(fully_shard) instead of replicating it (DDP); methods that "
                                "remove units (demp, structured) refuse it")
        _add_config_flags(q)
        q.set_defaults(func=func)

    q = sub.add_parser("doctor", help="which units of a trained run are dead")
    q.add_argument("run_dir")
    q.add_argument("--split", default="test", choices=["train", "val", "test"])
    q.add_argument("--criterion", default="never_active")
    q.add_argument("--eps", type=float, default=0.0)
    q.add_argument("--tau", type=float, default=None,
                   help="threshold for --criterion dormant (default 0)")
    q.add_argument("--sites", action="store_true",
                   help="also print the sites' wiring (producer -> norm -> act -> consumers)")
    q.set_defaults(func=cmd_doctor)

    q = sub.add_parser("report", help="report.html (table, figures, configs) and per-epoch "
                                      "curves (mean ± std) of a comparison")
    q.add_argument("out", help="the --out folder of `dormant compare`")
    q.add_argument("--metrics", default="test_acc,dead_units",
                   help="comma-separated metric keys (default: test_acc,dead_units)")
    q.add_argument("--plot", help="PNG path (default: OUT/curves.png)")
    q.add_argument("--root", default="runs", help="where the run directories are")
    q.set_defaults(func=cmd_report)

    q = sub.add_parser("scan", help="which units of a trained model are dead, with the "
                                    "evidence (a local HF directory, a saved module, "
                                    "module:function)")
    q.add_argument("model", help="a local Hugging Face model directory (nothing is downloaded), "
                                 "a torch.save'd module, or module:function")
    q.add_argument("--data", required=True,
                   help="token ids (.npy, .pt, .jsonl) or a text file (tokenized with the "
                        "model directory's tokenizer)")
    q.add_argument("--out", help="folder for scan.json (with the removal plan) and scan.html")
    q.add_argument("--seq-len", type=int, default=128, help="tokens per sequence (default 128)")
    q.add_argument("--batch-size", type=int, default=8, help="sequences per batch (default 8)")
    q.add_argument("--max-tokens", type=int, help="read at most this many tokens")
    q.add_argument("--device", default="cpu", help="where the model runs (default cpu)")
    q.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="the model's dtype for the scan (default float32)")
    q.add_argument("--rare", type=float, default=1e-3,
                   help="a unit is rarely active below this firing rate (default 0.001)")
    q.add_argument("--expert-share", type=float, default=0.0,
                   help="an expert routed at most this share of its mixture's tokens is a dead "
                        "expert (default 0: never routed)")
    q.set_defaults(func=cmd_scan)

    q = sub.add_parser("download", help="fetch a dataset (needs network; verifies checksums)")
    q.add_argument("dataset")
    q.add_argument("--dest", help="target folder (default: the user data directory)")
    q.set_defaults(func=cmd_download)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # recorded with results (compare.json) as the command that regenerates them
    args.command_line = shlex.join(["dormant", *(sys.argv[1:] if argv is None else argv)])
    from .data import CorruptDataError, DataNotFoundError
    from .registry import UnknownNameError
    try:
        code = args.func(args)
        from .sharding import close_group
        close_group()          # ended well on every rank: the process group closed in order
        return code
    except (ConfigError, UnknownNameError, DataNotFoundError, CorruptDataError,
            OSError, ValueError, ImportError, WorkerDiedError) as err:
        print(f"dormant: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ndormant: interrupted; run the same command again to resume from the last "
              "epoch checkpoint", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
