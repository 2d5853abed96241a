"""`dplora`: the command line. Each subcommand is one pipeline stage; `run` does them all.

Config errors exit with status 2 before any work starts; data, adapter and model errors exit
with status 1 and a message naming the file, field or client.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

# Keep every tool's state inside the project and off the network (set before they are imported).
for _key, _value in {
    "PREFECT_HOME": str(Path.cwd() / ".prefect"),
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
    "DO_NOT_TRACK": "1",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "HF_HUB_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
}.items():
    os.environ.setdefault(_key, _value)

# peft still calls a transformers method that transformers 5 renamed; nothing for a user to act on.
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)

from dplora_core.config import ConfigError, ExperimentConfig, load_config  # noqa: E402

DEFAULT_SOURCE = "../shared/data"


def cmd_ingest(cfg: ExperimentConfig, args: argparse.Namespace) -> None:
    from tasks.data import ingest_raw

    for path in ingest_raw(Path(args.source), Path(cfg.data.raw_dir)):
        print(f"copied {path}")


def cmd_convert_model(cfg: ExperimentConfig, args: argparse.Namespace) -> None:
    from dplora_core.model import convert_gguf

    if cfg.model.gguf_file is None:
        print(f"model.gguf_file is not set: {cfg.model.path} is loaded as it is, nothing to convert")
        return
    print(f"converted model in {convert_gguf(cfg.model)}")


def cmd_prepare(cfg: ExperimentConfig, args: argparse.Namespace) -> None:
    from tasks.data import prepare_data

    for split, hist in prepare_data.fn(cfg).items():
        print(f"{split}: {sum(hist.values())} examples {hist}")


def cmd_partition(cfg: ExperimentConfig, args: argparse.Namespace) -> None:
    from tasks.data import partition_clients

    for k, hist in enumerate(partition_clients.fn(cfg)):
        print(f"client {k}: {sum(hist.values())} examples {hist}")


def cmd_split_silos(cfg: ExperimentConfig, args: argparse.Namespace) -> None:
    from tasks.data import partition_clients, prepare_data, write_silo_data

    prepare_data.fn(cfg)
    partition_clients.fn(cfg)
    print("federation:\n  silos:  # for a cross-silo config; each silo deploys flows/silo.py:client_train")
    for k, path in enumerate(write_silo_data(cfg, args.out)):
        n = sum(1 for _ in path.open(encoding="utf-8"))
        print(f"    - {{name: client-{k}, num_examples: {n}}}  # data_path={path}")


def cmd_federate(cfg: ExperimentConfig, args: argparse.Namespace) -> None:
    from flows.federated import federate

    summary = federate(cfg, resume=args.resume)
    if summary["stopped_by_budget_guard"]:
        print(summary["stopped_by_budget_guard"])
    print(summary["privacy"]["guarantee"])


def cmd_evaluate(cfg: ExperimentConfig, args: argparse.Namespace) -> None:
    from flows.evaluate import evaluate_experiment
    from flows.report import format_summary

    print(format_summary(evaluate_experiment(cfg)))


def cmd_show(cfg: ExperimentConfig, args: argparse.Namespace) -> None:
    from flows.report import format_summary

    path = cfg.run_dir / "metrics.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no results yet (run `dplora run` or `dvc repro` first)")
    print(format_summary(json.loads(path.read_text())))


def cmd_run(cfg: ExperimentConfig, args: argparse.Namespace) -> None:
    from flows.pipeline import dplora_pipeline
    from flows.report import format_summary

    start = time.monotonic()
    raw = Path(cfg.data.raw_dir)
    if cfg.data.dataset != "custom" and not raw.exists():  # your own file needs no reference data
        cmd_ingest(cfg, args)
    if cfg.model.gguf_file is not None:
        cmd_convert_model(cfg, args)
    metrics = dplora_pipeline(cfg, resume=args.resume)
    print(format_summary(metrics, wall_seconds=time.monotonic() - start))


def cmd_report(cfg: ExperimentConfig, args: argparse.Namespace) -> None:
    from flows.report import write_report

    print(f"wrote {write_report(cfg, args.out)}")


def cmd_audit(cfg: ExperimentConfig, args: argparse.Namespace) -> None:
    from flows.audit import format_audit, privacy_audit

    print(format_audit(privacy_audit(cfg, canaries=args.canaries)))


def cmd_communication(cfg: ExperimentConfig, args: argparse.Namespace) -> None:
    from flows.communication import write_communication

    if cfg.model.gguf_file is not None:
        cmd_convert_model(cfg, args)
    rows = write_communication(cfg, args.doc)
    print(f"wrote {len(rows)} rows to the communication section of {args.doc}")


COMMANDS: dict[str, tuple[Callable[[ExperimentConfig, argparse.Namespace], None], str]] = {
    "run": (cmd_run, "the whole experiment: ingest (if needed), prepare, partition, federate, evaluate"),
    "ingest": (cmd_ingest, "copy the reference datasets into data.raw_dir, checking their md5"),
    "convert-model": (cmd_convert_model, "convert the GGUF model once to a safetensors checkpoint"),
    "prepare": (cmd_prepare, "write the train/validation/test splits"),
    "partition": (cmd_partition, "split the training records over the clients"),
    "split-silos": (cmd_split_silos, "each client's shard as a silo's own train.jsonl, to try cross-silo here"),
    "federate": (cmd_federate, "run the federated DP-LoRA training flow"),
    "evaluate": (cmd_evaluate, "evaluate zero-shot and final adapter on the test split; print the table"),
    "show": (cmd_show, "print the results table of a finished experiment"),
    "report": (cmd_report, "markdown summary and PNG plots of the run, and utility against epsilon over all runs"),
    "communication": (cmd_communication, "upload bytes per client and round: LoRA ranks, modules and codecs "
                      "measured on the model, against full-model exchange and Llama-2-7B's shapes"),
    "audit": (cmd_audit, "membership-inference audit with canaries: attack AUC and empirical epsilon vs accountant"),
}


def config_reference() -> str:
    """Every config field with its type, default and description, for `--help`."""
    from pydantic import BaseModel

    lines = ["config fields (YAML sections; see configs/fpb-demo.yaml):"]
    for section, field in ExperimentConfig.model_fields.items():
        sub = field.annotation
        if isinstance(sub, type) and issubclass(sub, BaseModel):
            lines.append(f"  {section}:")
            for name, f in sub.model_fields.items():
                desc = f" - {f.description}" if f.description else ""
                lines.append(f"    {name} (default {f.default!r}){desc}")
        else:
            lines.append(f"  {section} (default {field.default!r})")
    return "\n".join(lines)


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dplora",
        description="Federated, differentially private LoRA fine-tuning of causal LMs, orchestrated by Prefect.",
        epilog="also: dplora study STUDY.yaml [--no-run] [--ignore-records] [--only GLOB]  a grid of experiments "
        "over seeds (configs/study-*.yaml)",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (_, help_text) in COMMANDS.items():
        p = sub.add_parser(
            name,
            help=help_text,
            description=help_text,
            epilog=config_reference(),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        p.add_argument("config", type=Path, help="experiment config YAML (see configs/, e.g. configs/fpb-demo.yaml)")
        if name in ("run", "ingest"):
            p.add_argument(
                "--source", default=DEFAULT_SOURCE,
                help=f"folder holding the reference datasets to copy from (default: {DEFAULT_SOURCE})",
            )
        if name in ("run", "federate"):
            p.add_argument(
                "--resume",
                action="store_true",
                help="continue from the run's last checkpoint (config unchanged except federation.rounds); "
                "the budget guard still applies",
            )
        if name == "report":
            p.add_argument("--out", type=Path, default=Path("reports"), help="folder for summary.md and the PNGs")
        if name == "split-silos":
            p.add_argument("--out", type=Path, required=True, help="folder for one sub-folder per silo")
        if name == "communication":
            p.add_argument("--doc", type=Path, default=Path("docs/results.md"), help="markdown file to update")
        if name == "audit":
            p.add_argument("--canaries", type=positive_int, default=64, help="canaries planted (and as many held out)")
    return parser


def quiet_progress_bars_off_terminal() -> None:
    """transformers' loading bars only on a terminal, as ours (flows.federated.progress_bar)."""
    if not sys.stderr.isatty():
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()


def study_main(path: Path, run_missing: bool = True, use_records: bool = True, only: Sequence[str] = ()) -> int:
    """`dplora study STUDY.yaml`: validate the study and every cell's config first (exit 2), then run it."""
    from dplora_core.study import expand, load_study, selected

    try:
        study = load_study(path)
        base = load_config(study.base)  # names the base file and field
        cells = expand(study, base.model_dump(mode="json"))
        if unmatched := [p for p in only if not any(selected(c, [p]) for c in cells)]:
            raise ConfigError(f"{path}: --only {', '.join(unmatched)} names none of the study's {len(cells)} runs "
                              f"(e.g. {cells[0].config.name})")
    except ConfigError as err:
        print(f"dplora study: {err}", file=sys.stderr)
        return 2
    quiet_progress_bars_off_terminal()
    if base.model.gguf_file is not None:
        from dplora_core.model import convert_gguf

        convert_gguf(base.model)
    if not Path(base.data.raw_dir).exists():
        cmd_ingest(base, argparse.Namespace(source=DEFAULT_SOURCE))
    from flows.study import run_study

    results = run_study(study, run_missing=run_missing, use_records=use_records, only=only)
    print(f"study {study.name}: {len(results['rows'])} of {len(cells)} runs finished"
          + (f"; failed: {', '.join(results['failed'])}" if results["failed"] else ""))
    finished = {row["name"] for row in results["rows"]}
    wanted = [c for c in cells if not only or selected(c, only)]
    return 1 if results["failed"] or (run_missing and any(c.config.name not in finished for c in wanted)) else 0


def main(argv: list[str] | None = None) -> int:
    if (argv if argv is not None else sys.argv[1:])[:1] == ["study"]:
        study_args = argparse.ArgumentParser(
            prog="dplora study", description="run a grid of experiments over seeds (configs/study-*.yaml); "
            "finished runs are skipped, results go to outputs/<study>/results.json and the study's results_doc",
        )
        study_args.add_argument("study", type=Path, help="study YAML: name, base, seeds, axes, exclude, results_doc")
        study_args.add_argument("--no-run", action="store_true", help="only tabulate the runs already finished")
        study_args.add_argument("--ignore-records", action="store_true",
                                help="run again the cells that have only a committed record (results/runs/ beside "
                                "the results_doc), e.g. to reproduce a table from scratch; their new records replace "
                                "the old")
        study_args.add_argument("--only", action="append", default=[], metavar="GLOB",
                                help="train only the runs whose name matches (repeatable), e.g. '*-s0' for one "
                                "seed first; the table still shows every finished run")
        parsed = study_args.parse_args((argv if argv is not None else sys.argv[1:])[1:])
        return study_main(parsed.study, run_missing=not parsed.no_run, use_records=not parsed.ignore_records,
                          only=parsed.only)
    args = build_parser().parse_args(argv)
    try:
        cfg = load_config(args.config)
    except ConfigError as err:
        print(f"dplora: {err}", file=sys.stderr)
        return 2
    if args.command in ("run", "federate"):
        from flows.runners import RunnerError, check_runner

        try:
            check_runner(cfg.runner, rerun_lost=cfg.privacy.rerun_replays)
        except RunnerError as err:
            print(f"dplora: {args.config}: {err}", file=sys.stderr)
            return 2
    from dplora_core.adapters import AdapterError
    from dplora_core.data import DataError

    quiet_progress_bars_off_terminal()

    try:
        COMMANDS[args.command][0](cfg, args)
    except (DataError, AdapterError, FileNotFoundError, ValueError, RuntimeError) as err:
        print(f"dplora {args.command}: error: {err}", file=sys.stderr)
        return 1
    return 0


def exit_on_sigterm() -> None:
    """Make SIGTERM (`kill`, a scheduler stopping the job) exit like Ctrl-C, through Python's exit handlers.

    Prefect turns SIGTERM into a crash of the running flow (its clients finish the step they are in) and then
    re-sends it to the handler it found. Python's default handler ends the process on the spot, skipping the
    exit handler that stops the temporary Prefect server, which then outlived the run. Checkpoints are
    unaffected: the next run resumes from the last finished round.
    """

    def _exit(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, _exit)


def cli() -> int:
    """The `dplora` program: `main` with SIGTERM handled as an orderly exit."""
    exit_on_sigterm()
    return main()


if __name__ == "__main__":
    sys.exit(cli())
