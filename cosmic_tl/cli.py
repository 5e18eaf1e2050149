"""The ``cosmic-tl`` command: a run directory from a model and prompt sets.

    cosmic-tl run [--preset cpu|paper|arditi] [--out runs/NAME] [--FIELD VALUE ...]
    cosmic-tl candidates|score|select|evaluate ...   (run up to that stage)
    cosmic-tl report --out runs/NAME                 (re-render report.html)
    cosmic-tl stability runs/NAME [--resamples 10 --seed 0]   (picks over bootstrap resamples)
    cosmic-tl export --out runs/NAME --to DIR        (model with the direction removed from its weights)
    cosmic-tl export runs/NAME --format gguf         (the same, the model and a control vector for llama.cpp)
    cosmic-tl audit runs/NAME [--k 8 --stratified 8] (evaluate many candidates by generation)
    cosmic-tl models                                 (aliases and whether they are built)
    cosmic-tl build smollm2-135m-refuse              (build an organism ahead of time)

Every ``Config`` field is an option (``--n-train 64``, ``--mode lce``, ``--kl-threshold 0.2``);
the command line maps 1:1 onto :class:`cosmic_tl.config.Config`.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from cosmic_tl.config import BASELINE_METHODS, PRESETS, Config, SelectionSettings, check_device, preset
from cosmic_tl.gguf_export import GGUF_PARTS

STAGE_COMMANDS = {
    "candidates": "candidates",
    "score": "scores",
    "select": "select",
    "evaluate": "evaluate",
    "run": "run",
}


def _option_kwargs(hint: Any, default: Any) -> dict[str, Any]:
    """argparse keyword arguments for one typed config field."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    optional = origin in (typing.Union, types.UnionType) and type(None) in args
    if optional:
        hint = next(a for a in args if a is not type(None))
        origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is bool:
        return {"action": argparse.BooleanOptionalAction}
    if origin is Literal:
        return {"choices": list(args)}
    if origin is tuple:
        return {"nargs": "+", "metavar": "TOKEN"}
    if hint in (int, float, str):
        return {"type": hint}
    raise TypeError(f"no command-line mapping for {hint!r}")


def _fields() -> list[tuple[str, Any, Any, str]]:
    """(name, type, default, help) of every flat Config and SelectionSettings field."""
    out = []
    for cls in (Config, SelectionSettings):
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if f.name == "selection":
                continue
            default = f.default if f.default is not dataclasses.MISSING else None
            out.append((f.name, hints[f.name], default, str(f.metadata.get("help", ""))))
    return out


def _add_config_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--preset",
        default="cpu",
        choices=sorted(PRESETS),
        help="base settings (default: cpu); options below override it",
    )
    p.add_argument("--out", type=Path, default=None, help="run directory (default: runs/<model>-<mode>)")
    p.add_argument("--force", action="store_true", help="reuse a run directory of another model")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    group = p.add_argument_group("settings (cosmic_tl.config.Config)")
    for name, hint, default, help_ in _fields():
        kw = _option_kwargs(hint, default)
        if name == "baselines":
            kw |= {"choices": list(BASELINE_METHODS), "metavar": "METHOD"}
        group.add_argument(
            f"--{name.replace('_', '-')}",
            dest=name,
            default=None,
            help=f"{help_} (preset default: {default})",
            **kw,
        )


def config_from_args(ns: argparse.Namespace) -> Config:
    """The preset with every option the user gave applied on top."""
    changes = {name: getattr(ns, name) for name, *_ in _fields() if getattr(ns, name, None) is not None}
    for name in ("refusal_tokens", "baselines"):
        if name in changes:
            changes[name] = tuple(changes[name])
    return preset(ns.preset, **changes)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="cosmic-tl",
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = ap.add_subparsers(dest="command", required=True)
    for name in STAGE_COMMANDS:
        _add_config_options(sub.add_parser(name, help=f"run the pipeline up to '{name}'"))
    rep = sub.add_parser("report", help="re-render report.html of a run directory")
    rep.add_argument("--out", type=Path, required=True)
    exp = sub.add_parser(
        "export",
        help="save the run's model with the COSMIC direction orthogonalised out of its weights "
        "(LCE ablation): as an HF directory, or as GGUF files for llama.cpp with the direction "
        "as a control vector",
    )
    exp.add_argument("run", type=Path, nargs="?", default=None, help="the run directory")
    exp.add_argument("--out", type=Path, default=None, help="the run directory (as RUN)")
    exp.add_argument(
        "--to",
        type=Path,
        default=None,
        help="new directory for the edited model (hf, required) or the GGUF files "
        "(gguf, default: RUN/gguf)",
    )
    exp.add_argument("--format", choices=["hf", "gguf"], default="hf", help="default: hf")
    exp.add_argument("--type", default="f16", help="GGUF tensor type: f32, f16 or q8_0 (default: f16)")
    exp.add_argument(
        "--parts",
        nargs="+",
        default=list(GGUF_PARTS),
        choices=list(GGUF_PARTS),
        metavar="PART",
        help="GGUF files to write: edited (orthogonalised model), original (the model the "
        "control vector steers), control-vector (default: all three)",
    )
    exp.add_argument(
        "--linear-addition",
        action="store_true",
        help="for an ACE pick, write the linear part of its addition (+ alpha r) as the "
        "control vector (ACE itself cannot be one)",
    )
    exp.add_argument("--force", action="store_true", help="overwrite existing output files")
    st = sub.add_parser(
        "stability",
        help="repeat the run's selection over bootstrap resamples of its train and val prompts "
        "(resumable; the report gains a stability section)",
    )
    st.add_argument("run", type=Path, nargs="?", default=None, help="the run directory")
    st.add_argument("--out", type=Path, default=None, help="the run directory (as RUN)")
    st.add_argument("--resamples", type=int, default=10, help="bootstrap resamples (default: 10)")
    st.add_argument("--seed", type=int, default=0, help="seed of the resamples (default: 0)")
    st.add_argument("--quiet", action="store_true", help="no progress bars")
    aud = sub.add_parser(
        "audit",
        help="evaluate by generation each method's top candidates, its pick and a stratified "
        "sample (ASR, induced refusal, KL, capability damage); regret and proxy agreement",
    )
    aud.add_argument("run", type=Path, help="the run directory")
    aud.add_argument("--k", type=int, default=8, help="top candidates per method (default: 8)")
    aud.add_argument(
        "--stratified", type=int, default=8, help="candidates drawn across the grid (default: 8)"
    )
    aud.add_argument("--seed", type=int, default=0, help="seed of the sample and the bootstrap")
    aud.add_argument("--quiet", action="store_true", help="no progress bars")
    sub.add_parser("models", help="list built-in model aliases and whether they are built")
    b = sub.add_parser("build", help="build model aliases (e.g. the organisms) into the cache")
    b.add_argument("aliases", nargs="+", metavar="alias")
    b.add_argument("--rebuild", action="store_true")
    b.add_argument("--quiet", action="store_true", help="no progress bars")
    return ap


def _default_out(cfg: Config) -> Path:
    safe = cfg.model.replace("/", "_").strip("._") or "model"
    return Path("runs") / f"{safe}-{cfg.mode}"


def main(argv: Sequence[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    say = logging.getLogger("cosmic_tl").info
    try:
        return _dispatch(ns, say)
    except KeyboardInterrupt:
        say("interrupted: finished stages are kept; run the same command again to resume")
        return 130
    except (ValueError, OSError, RuntimeError) as err:
        say(f"error: {err}")
        return 2


def _dispatch(ns: argparse.Namespace, say: Any) -> int:
    from cosmic_tl import models

    if ns.command == "models":
        for name, alias in sorted(models.aliases().items()):
            state = "built" if models.is_cached(name) else "not built"
            say(f"{name:28s} {state:10s} {alias.description}")
        say(f"cache: {models.cache_dir()}")
        return 0
    if ns.command == "build":
        known = models.aliases()
        unknown = [a for a in ns.aliases if a not in known]
        if unknown:
            raise ValueError(f"unknown alias {', '.join(map(repr, unknown))}; see `cosmic-tl models`")
        for alias in ns.aliases:
            if ns.rebuild or not models.is_cached(alias):
                estimate = models.build_estimate(alias)
                say(f"building {alias}" + (f" ({estimate})" if estimate else "") + " ...")
            path = models.ensure_alias(alias, rebuild=ns.rebuild, progress=not ns.quiet)
            say(f"built: {path}")
        return 0
    from cosmic_tl.pipeline import Pipeline
    from cosmic_tl.rundir import RunDir
    from cosmic_tl.store import read_json

    if ns.command == "export":
        return _export(ns, say)
    if ns.command == "stability":
        return _stability(ns, say)
    if ns.command == "audit":
        if not RunDir(ns.run).config.is_file():
            raise ValueError(f"{ns.run} is not a run directory (no config.json)")
        cfg = Config.from_dict(read_json(RunDir(ns.run).config))
        with Pipeline(cfg, ns.run, progress=not ns.quiet, say=say) as pipe:
            pipe.audit(k=ns.k, stratified=ns.stratified, seed=ns.seed)
            pipe.report()
        return 0
    if ns.command == "report":
        cfg = Config.from_dict(read_json(RunDir(ns.out).config))
        with Pipeline(cfg, ns.out, progress=False, say=say) as pipe:
            pipe.report()
        return 0
    cfg = config_from_args(ns)
    with Pipeline(
        cfg, ns.out or _default_out(cfg), progress=not ns.quiet, force=ns.force, say=say
    ) as pipe:
        stage = STAGE_COMMANDS[ns.command]
        if stage == "run":
            pipe.run()
        else:
            getattr(pipe, stage)()
            pipe.report()
    return 0


def _export(ns: argparse.Namespace, say: Any) -> int:
    """``cosmic-tl export``: the run's pick as an HF directory or as GGUF files."""
    from cosmic_tl import models
    from cosmic_tl.config import torch_dtype
    from cosmic_tl.export import load_direction, save_orthogonalized
    from cosmic_tl.gguf_export import GGUF_TYPES, export_gguf
    from cosmic_tl.rundir import RunDir
    from cosmic_tl.store import read_json, record_paths

    if ns.run is not None and ns.out is not None and ns.run != ns.out:
        raise ValueError(f"two run directories given: {ns.run} and --out {ns.out}")
    root = ns.run or ns.out
    if root is None:
        raise ValueError("name the run directory: cosmic-tl export RUN (or --out RUN)")
    if ns.format == "hf" and ns.to is None:
        raise ValueError("--format hf needs --to DIR, a new directory for the edited model")
    if ns.format == "gguf" and ns.type not in GGUF_TYPES:
        raise ValueError(f"unknown GGUF type {ns.type!r}; choose one of {', '.join(GGUF_TYPES)}")
    run = RunDir(root)
    if not run.config.is_file():
        raise ValueError(f"{root} is not a run directory (no config.json)")
    if not record_paths(run.direction)[1].is_file():
        raise ValueError(
            f"{root} has no pick (no direction.json): run `cosmic-tl select --out {root}`, "
            "or see selection_cosmic.json for why COSMIC found no candidate"
        )
    cfg = Config.from_dict(read_json(run.config))
    check_device(cfg.device)
    direction, _, meta = load_direction(run.direction)
    layer = int(meta["layer"])
    if ns.format == "hf":
        model = models.load_model(cfg.model, device=cfg.device, dtype=torch_dtype(cfg.dtype))
        say(f"orthogonalising the layer-{layer} direction out of {cfg.model} ...")
        say(f"saved: {save_orthogonalized(model, direction.float(), ns.to, force=ns.force)}")
        return 0
    model = models.load_model(cfg.model, device=cfg.device, dtype=torch_dtype(cfg.dtype))
    say(f"writing {', '.join(ns.parts)} of {cfg.model} as {ns.type} GGUF ...")
    done = export_gguf(
        model,
        direction.float(),
        ns.to or run.root / "gguf",
        layer=layer,
        mode=meta.get("mode", cfg.mode),
        alpha=float(meta.get("alpha", cfg.alpha)),
        type=ns.type,
        parts=tuple(ns.parts),
        linear=ns.linear_addition,
        force=ns.force,
    )
    for part, path in done.files.items():
        say(f"saved {part}: {path}")
    if done.command:
        say(f"add alpha*r at the input of block {layer} in llama.cpp: {done.command}")
        unedited = done.command_model
        if unedited is not None and not unedited.is_file():
            say(
                f"(the command's {unedited.name}, the unedited model, was not written: add --parts original)"
            )
    return 0


def _stability(ns: argparse.Namespace, say: Any) -> int:
    """``cosmic-tl stability``: the run's picks over bootstrap resamples, then the report."""
    import math
    import time

    from cosmic_tl.pipeline import Pipeline
    from cosmic_tl.rundir import RunDir
    from cosmic_tl.store import read_json

    if ns.run is not None and ns.out is not None and ns.run != ns.out:
        raise ValueError(f"two run directories given: {ns.run} and --out {ns.out}")
    root = ns.run or ns.out
    if root is None:
        raise ValueError("name the run directory: cosmic-tl stability RUN (or --out RUN)")
    if ns.resamples < 1:
        raise ValueError(f"--resamples must be at least 1, not {ns.resamples}")
    if not RunDir(root).config.is_file():
        raise ValueError(f"{root} is not a run directory (no config.json); run `cosmic-tl run` first")
    cfg = Config.from_dict(read_json(RunDir(root).config))
    start = time.perf_counter()
    with Pipeline(cfg, root, progress=not ns.quiet, say=say) as pipe:
        result = pipe.stability(ns.resamples, ns.seed)
        pipe.report()
    for name, m in result.methods.items():
        r = m.modal_share
        if m.modal is None:
            say(f"[stability] {name}: no pick on any of the {r.n} resamples")
            continue
        cos = "n/a (fewer than 2 picks)" if math.isnan(m.mean_cosine) else f"{m.mean_cosine:.3f}"
        say(
            f"[stability] {name}: modal cell {m.modal} on {r.k}/{r.n} resamples "
            f"[{r.low:.0%}, {r.high:.0%}]; no pick on {m.n_none}; mean pairwise cosine {cos}"
        )
    s = result.seconds
    say(
        f"[stability] wall time {time.perf_counter() - start:.1f} s (shared work {s['setup']:.1f} s, "
        f"{s['per_resample']:.1f} s per resample)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
