"""The federated DP-LoRA flow: rounds of per-client training, aggregation and validation.

Every round ends with a checkpoint (global adapter, accountant ledgers, noise plan) and the
ledgers in MLflow. Before a round starts, the budget guard asks the ledgers what the round
would cost; a round that would take any epsilon past `privacy.target_epsilon` is not run.
"""

from __future__ import annotations

import math
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from prefect import Task, flow, get_run_logger, unmapped
from prefect.futures import PrefectFuture
from prefect.task_runners import TaskRunner
from tqdm import tqdm

from dplora_core.checkpoint import (
    Checkpoint,
    CheckpointError,
    adapter_file,
    average_file,
    config_changes,
    load_checkpoint,
    save_checkpoint,
    set_aside,
    unfinished,
)
from dplora_core.config import ExperimentConfig, RunnerConfig, field_defaults
from dplora_core.io import atomic_write, json_bytes
from dplora_core.messages import ClientUpdate, GlobalModel
from dplora_core.model import dtype_name, resolve_device, resolve_dtype
from dplora_core.privacy.accountant import (
    DpSgdRun,
    LedgerKind,
    PrivacyLedger,
    describe_guarantee,
    short_guarantee,
)
from dplora_core.train import sample_rate
from flows.report import label_histogram_plot
from flows.runners import task_runner
from flows.tracking import ExperimentRun
from tasks.runtime import check_shared_model, client_sizes
from tasks.silos import publish_global, train_remote
from tasks.training import (
    NoisePlan,
    aggregate,
    aggregate_private,
    average_releases,
    client_sample_rate,
    evaluate,
    full_model_bytes,
    init_adapter,
    plan_noise,
    quorum,
    sample_round_clients,
    screen_updates,
    train_client,
)

POPULATION = "clients"  # the ledger key of client-level DP: one ledger for the whole population


@dataclass
class RunState:
    """Everything a round needs from the rounds before it; what a checkpoint stores."""

    global_model: GlobalModel
    plan: NoisePlan
    ledgers: dict[str, PrivacyLedger]
    clip_norm: float  # mode client: the (possibly adaptive) clip norm of the next round
    mlflow_run_id: str
    history: list[dict[str, Any]] = field(default_factory=list)
    # mode distributed: what the server, which sees each upload with its noise share only, can learn (per client)
    server_view: dict[str, PrivacyLedger] = field(default_factory=dict)
    server_optimizer: bytes | None = None  # the server optimizer's state for the next round (adam), safetensors
    average: bytes | None = None  # the moving average of the global adapters (federation.ema_decay > 0), safetensors
    bytes_up: int = 0
    bytes_down: int = 0
    client_rounds: int = 0  # client participations, for the full-model exchange comparison
    train_seconds: float = 0.0

    @property
    def released(self) -> bytes:
        """The adapter validated each round and released at the end: the moving average if kept, else the global."""
        return self.average if self.average is not None else self.global_model.adapter

    def to_json(self) -> dict[str, Any]:
        return {
            "plan": {"clients": self.plan.clients, "server": self.plan.server, "aggregate": self.plan.aggregate},
            "ledgers": ledger_states(self.ledgers),
            "server_view_ledgers": ledger_states(self.server_view),
            "clip_norm": self.clip_norm,
            "mlflow_run_id": self.mlflow_run_id,
            "history": self.history,
            "bytes_up": self.bytes_up,
            "bytes_down": self.bytes_down,
            "client_rounds": self.client_rounds,
            "train_seconds": self.train_seconds,
        }

    @classmethod
    def from_json(
        cls, round_num: int, adapter: bytes, state: dict[str, Any], server_optimizer: bytes | None = None,
        average: bytes | None = None,
    ) -> RunState:
        saved = state["plan"]
        plan = NoisePlan({int(k): v for k, v in saved["clients"].items()}, saved["server"], saved.get("aggregate"))
        return cls(
            global_model=GlobalModel(round=round_num, adapter=adapter),
            plan=plan,
            ledgers={k: PrivacyLedger.from_state_dict(v) for k, v in state["ledgers"].items()},
            clip_norm=state["clip_norm"],
            mlflow_run_id=state["mlflow_run_id"],
            history=state["history"],
            bytes_up=state["bytes_up"],
            bytes_down=state["bytes_down"],
            client_rounds=state["client_rounds"],
            train_seconds=state["train_seconds"],
            server_view={k: PrivacyLedger.from_state_dict(v) for k, v in state.get("server_view_ledgers", {}).items()},
            server_optimizer=server_optimizer,
            average=average,
        )


def ledger_states(ledgers: dict[str, PrivacyLedger]) -> dict[str, dict[str, Any]]:
    """Each ledger's `state_dict`, by its key: what checkpoints, MLflow and training.json keep."""
    return {k: ledger.state_dict() for k, ledger in ledgers.items()}


def ledger_kind(cfg: ExperimentConfig) -> LedgerKind:
    return "paper" if cfg.privacy.mode == "paper" else cfg.privacy.accountant


def new_ledgers(cfg: ExperimentConfig) -> dict[str, PrivacyLedger]:
    """One ledger per client's records (sample, distributed, paper), one for the client population (client),
    none (none)."""
    mode, kind = cfg.privacy.mode, ledger_kind(cfg)
    if mode == "none":
        return {}
    if mode == "client":
        return {POPULATION: PrivacyLedger(kind=kind)}
    return {str(k): PrivacyLedger(kind=kind) for k in range(cfg.federation.num_clients)}


def new_server_view(cfg: ExperimentConfig) -> dict[str, PrivacyLedger]:
    """Mode distributed: one ledger per client's records as the server sees them (each upload alone)."""
    if cfg.privacy.mode != "distributed":
        return {}
    return {str(k): PrivacyLedger(kind=ledger_kind(cfg)) for k in range(cfg.federation.num_clients)}


def planned_events(cfg: ExperimentConfig, plan: NoisePlan, clients: list[int]) -> dict[str, DpSgdRun]:
    """What the coming round releases, per ledger: the accountant's events, before anything runs.
    Mode distributed: the sum of the uploads, at the sigma a quorum's noise shares add up to."""
    p = cfg.privacy
    if p.mode == "none":
        return {}
    if p.mode == "client":
        assert plan.server is not None
        return {POPULATION: DpSgdRun(client_sample_rate(cfg), plan.server, 1)}
    if p.mode == "distributed":
        assert plan.aggregate is not None
        rates = client_rates(cfg)
        return {str(k): DpSgdRun(rates[k], plan.aggregate, 1) for k in clients}
    return {str(k): run for k, run in planned_uploads(cfg, plan, clients).items()}  # each upload is the release


def planned_uploads(cfg: ExperimentConfig, plan: NoisePlan, clients: list[int]) -> dict[int, DpSgdRun]:
    """What each client's own upload releases, as it reports it (modes sample, distributed, paper); mode
    distributed: at its noise share, the server's view."""
    if cfg.privacy.mode in ("none", "client"):
        return {}
    rates = client_rates(cfg)
    return {k: DpSgdRun(rates[k], plan.clients[k], cfg.federation.local_steps) for k in clients}


def client_rates(cfg: ExperimentConfig) -> list[float]:
    """Each client's Poisson rate over its records, q = batch_size / n_k (one read of the partition)."""
    return [sample_rate(cfg.federation.batch_size, n) for n in client_sizes(cfg)]


def sampled_clients(cfg: ExperimentConfig) -> bool:
    """Whether a round trains only some of the clients (federation.clients_per_round < num_clients)."""
    return cfg.federation.clients_per_round < cfg.federation.num_clients


def planned_spend(cfg: ExperimentConfig, state: RunState) -> tuple[float, float]:
    """(epsilon, the server's view of it in mode distributed, else inf) once the rounds still to run are charged
    by `charge_round`, on top of what the ledgers already hold, with every client in every round (for a
    client's records, the worst case of client sampling)."""
    planned = RunState.from_json(state.global_model.round, state.global_model.adapter, state.to_json())  # a copy
    everyone = list(range(cfg.federation.num_clients))
    events, uploads = planned_events(cfg, state.plan, everyone), planned_uploads(cfg, state.plan, everyone)
    for _ in range(cfg.federation.rounds - state.global_model.round):
        charge_round(cfg, planned, events, uploads, released=set(everyone), aggregated=set(everyone))
    return spent_epsilon(cfg, planned.ledgers)[0], spent_epsilon(cfg, planned.server_view)[0]


def spent_epsilon(cfg: ExperimentConfig, ledgers: dict[str, PrivacyLedger]) -> tuple[float, dict[str, float]]:
    """(the reported epsilon, epsilon per ledger): the worst client's, or the population's."""
    if not ledgers:
        return float("inf"), {}
    per_ledger = {k: ledger.epsilon(delta=cfg.privacy.delta) for k, ledger in ledgers.items()}
    return max(per_ledger.values()), per_ledger


def budget_guard(cfg: ExperimentConfig, state: RunState, events: dict[str, DpSgdRun]) -> str | None:
    """Why the coming round must not run (it would cross privacy.target_epsilon), or None."""
    target = cfg.privacy.target_epsilon
    if target is None:
        return None
    for key, run in events.items():
        after = state.ledgers[key].epsilon(delta=cfg.privacy.delta, extra=(run,))
        if after > target:
            who = "the client population" if key == POPULATION else f"client {key}"
            what = short_guarantee(mode=cfg.privacy.mode, accountant=ledger_kind(cfg), delta=cfg.privacy.delta)
            return (
                f"budget guard: round {state.global_model.round + 1} would take {who} to epsilon {after:.3f} "
                f"({what}), past privacy.target_epsilon = {target:g}; stopping before it"
            )
    return None


def checkpoint_config_changes(cfg: ExperimentConfig, checkpoint: Checkpoint) -> list[str]:
    """Fields of `cfg` that differ from the checkpoint's config and cannot change on resume (rounds may
    change, but not to fewer than the checkpoint has done: its adapter and epsilon are past them)."""
    saved, current = checkpoint.state["config"], cfg.flat()
    changed = config_changes(saved, current, field_defaults(k for k in current if k not in saved))
    if cfg.federation.rounds < checkpoint.round:
        changed.append(f"federation.rounds ({cfg.federation.rounds}, fewer than the {checkpoint.round} done)")
    return changed


def start_or_resume(cfg: ExperimentConfig, resume: bool) -> tuple[RunState, ExperimentRun]:
    """A fresh run, or the state of the latest checkpoint of this run (config unchanged but for rounds)."""
    directory = cfg.run_dir / "checkpoint"
    checkpoint = load_checkpoint(directory) if resume else None
    superseded: str | None = None
    if not resume and (cut_short := unfinished(directory)) is not None:  # this run would write over it
        superseded = f"{set_aside(directory)} ({cut_short}): any updates it released are outside this run's epsilon"
        get_run_logger().warning(
            "%s holds an unfinished run and this run starts afresh (no --resume): moved it to %s", directory, superseded
        )
    if checkpoint is None:
        plan, initial = plan_noise(cfg), init_adapter(cfg)  # before the MLflow run: a bad adapter spec leaves none
        run = ExperimentRun(cfg)
        p = cfg.privacy
        run.set_tags({"dplora.noise_seed": p.noise_seed if p.noise_seed is not None else "os-entropy",
                      "dplora.base_dtype": base_dtype(cfg)})
        if superseded is not None:
            run.set_tags({"dplora.superseded_checkpoint": superseded})
        state = RunState(initial, plan, new_ledgers(cfg), p.max_grad_norm, run.run_id, server_view=new_server_view(cfg))
        log_label_histograms(cfg, run)
        return state, run
    changed = checkpoint_config_changes(cfg, checkpoint)
    if changed:
        raise CheckpointError(
            f"{directory}: cannot resume, config changed since the checkpoint: {', '.join(changed)}"
        )
    try:
        state = RunState.from_json(
            checkpoint.round, checkpoint.adapter, checkpoint.state, checkpoint.server_optimizer, checkpoint.average
        )
        if cfg.privacy.mode == "distributed" and not state.server_view:
            raise ValueError("mode distributed, but no server-view ledgers")
        if cfg.federation.server_optimizer == "adam" and checkpoint.round > 0 and state.server_optimizer is None:
            raise ValueError("server_optimizer adam, but no server optimizer state after round 1")
        if cfg.federation.ema_decay > 0 and checkpoint.round > 0 and state.average is None:
            raise ValueError("federation.ema_decay > 0, but no moving average after round 1")
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise CheckpointError(
            f"{directory}: cannot resume, its run state is incomplete or malformed "
            f"({type(err).__name__}: {err})"
        ) from err
    pending = checkpoint.state.get("pending")
    if pending and cfg.privacy.noise_seed is not None:
        get_run_logger().warning(
            "round %d was interrupted after it may have released client updates; with privacy.noise_seed fixed its "
            "re-run adds the same noise, one release only if it recomputes the same updates bit for bit (same "
            "runner, device, dtype and CPU kernels, no LoRA dropout). Seeded runs are for experiments only",
            pending["round"],
        )
    elif pending:
        # The interrupted round may already have released noisy updates; re-running it draws fresh noise,
        # a second release. Charge the first one.
        for key, event in pending["events"].items():
            state.ledgers[key].record(DpSgdRun(**event))
        for key, event in pending.get("uploads", {}).items():  # mode distributed: the server saw them too
            state.server_view[key].record(DpSgdRun(**event))
        get_run_logger().warning(
            "round %d was interrupted after it may have released client updates: its privacy cost is charged, "
            "and the round runs again with fresh noise, charged again",
            pending["round"],
        )
    run = ExperimentRun(cfg, run_id=state.mlflow_run_id)
    run.reopen()
    if state.history and not run.has_metric("val_accuracy", step=checkpoint.round):
        # killed between the round's checkpoint and its tracking: MLflow gets the round now
        track_round(state, run, directory)
    return state, run


def base_dtype(cfg: ExperimentConfig) -> str:
    """The frozen weights' dtype this machine runs (model.dtype, with auto resolved), e.g. "float32"."""
    return dtype_name(resolve_dtype(cfg.model.dtype, resolve_device(cfg.model.device)))


def client_base_dtypes(cfg: ExperimentConfig, history: list[dict[str, Any]]) -> list[str] | None:
    """Every dtype a client's frozen weights trained in (a Dask, Ray or silo host resolves `auto` on its own
    hardware); None where participation is private (mode client)."""
    if participation_is_private(cfg):
        return None
    return sorted({dtype for row in history for dtype in row.get("base_dtypes") or ()})


def log_label_histograms(cfg: ExperimentConfig, run: ExperimentRun) -> None:
    """Simulation: each client's label histogram as a plot in MLflow (cross-silo: the silos keep theirs).

    Only without DP: exact counts of a client's records are a release no accountant covers, and the MLflow run
    carries the guarantee. `dplora report` still plots them locally, captioned as outside DP."""
    if cfg.privacy.mode != "none":
        run.set_tags({"dplora.label_histograms": "not logged under DP: exact per-client counts are outside the "
                      "guarantee (dplora report plots them locally)"})
        return
    with tempfile.TemporaryDirectory() as tmp:
        png = label_histogram_plot(cfg, Path(tmp) / "label_histograms.png")
        if png is not None:
            run.log_artifact(png, "data")


def federate(
    config: ExperimentConfig, resume: bool = False, runner: TaskRunner[PrefectFuture[Any]] | None = None
) -> dict[str, Any]:
    """Run `federated_finetune` on `runner`, by default a new one as `config.runner` says (threads, Dask, Ray)."""
    if runner is None:
        runner = task_runner(config.runner, rerun_lost=config.privacy.rerun_replays)
    return federated_finetune.with_options(task_runner=runner)(config, resume=resume)


# The default, runner.kind threads: one base model in the flow's process and one client trains at a time on
# it (Workspace.lock), so more than 2 threads add no speed, only memory (each torch thread gets its own OpenMP
# team and allocator arena).
@flow(name="federated-finetune", task_runner=task_runner(RunnerConfig(), rerun_lost=False))
def federated_finetune(config: ExperimentConfig, resume: bool = False) -> dict[str, Any]:
    """Federated LoRA fine-tuning with the configured differential privacy; `resume` continues from a checkpoint."""
    cfg, f = config, config.federation
    log = get_run_logger()
    state, run = start_or_resume(cfg, resume)
    stopped: str | None = None
    rounds_bar = progress_bar(total=f.rounds, initial=state.global_model.round, desc="rounds", position=0)
    try:
        if state.global_model.round:
            log.info("resuming after round %d from %s", state.global_model.round, cfg.run_dir / "checkpoint")
        planned = planned_privacy(cfg, state)
        log.info("privacy: %s", planned)
        # what the per-round epsilon metrics are for, from the start; write_outputs replaces it with what was spent
        run.set_tags({"dplora.guarantee": f"planned: {planned}"})
        full_bytes = full_model_bytes(cfg)
        while state.global_model.round < f.rounds:
            start = time.monotonic()
            r = state.global_model.round + 1
            clients = sample_round_clients(cfg, r)
            events = planned_events(cfg, state.plan, clients)
            uploads = planned_uploads(cfg, state.plan, clients)
            stopped = budget_guard(cfg, state, events)
            if stopped:
                log.warning(stopped)
                break
            checkpoint = cfg.run_dir / "checkpoint"
            pending = {
                "round": r, "events": {k: asdict(run) for k, run in events.items()},
                **({"uploads": {str(k): asdict(run) for k, run in uploads.items()}}
                   if cfg.privacy.mode == "distributed" else {}),
            }
            save_checkpoint(  # write-ahead: a crash from here on charges this round on resume
                checkpoint,
                round_num=state.global_model.round,
                adapter=state.global_model.adapter,
                state=state.to_json() | {"config": cfg.flat(), "pending": pending},
                server_optimizer=state.server_optimizer,
                average=state.average,
            )
            run_round(cfg, state, r, clients, events, uploads)
            state.train_seconds += time.monotonic() - start
            save_checkpoint(
                checkpoint,
                round_num=r,
                adapter=state.global_model.adapter,
                state=state.to_json() | {"config": cfg.flat()},
                server_optimizer=state.server_optimizer,
                average=state.average,
            )
            row = track_round(state, run, checkpoint)
            spent = progress_epsilon(cfg, row["epsilon"], server_view=row["server_view_epsilon"])
            rounds_bar.set_postfix_str(f"val acc {row['val_accuracy']:.3f}, {spent}")
            rounds_bar.update()
            log.info(
                "round %d/%d: val acc %.4f, macro-F1 %.4f, loss %.4f; %s so far; clients %s",
                r,
                f.rounds,
                row["val_accuracy"],
                row["val_macro_f1"],
                row["val_loss"],
                spent,
                "private (mode client)" if row["clients"] is None else ",".join(map(str, row["clients"])),
            )
        summary = write_outputs(cfg, state, run, full_bytes, stopped)
        run.finish()  # last: a failure above marks the run FAILED, never a finished run
    except BaseException:
        run.finish("FAILED")
        raise
    finally:
        rounds_bar.close()
    return summary


def track_round(state: RunState, run: ExperimentRun, checkpoint: Path) -> dict[str, Any]:
    """The round just finished, into MLflow: its numbers (per client too), failures, ledgers, global adapter and
    moving average (if kept), from its checkpoint directory."""
    row = state.history[-1]
    r = row["round"]
    numbers = {k: v for k, v in row.items() if isinstance(v, float | int) and k != "round"}
    for k, client_numbers in (row["per_client"] or {}).items():
        numbers |= {f"client_{k}_{name}": v for name, v in client_numbers.items()}
    run.log_metrics({k: v for k, v in numbers.items() if np.isfinite(v)}, step=r)
    if row["failed_clients"]:
        run.set_tags({f"dplora.failed_clients.round_{r}": row["failed_clients"]})
    ledgers = ledger_states(state.ledgers)
    server_view = ledger_states(state.server_view)  # mode distributed, else empty
    run.log_dict({"round": r, "ledgers": ledgers, **({"server_view_ledgers": server_view} if server_view else {})},
                 "privacy/accountant.json")
    run.log_artifact(adapter_file(checkpoint, r), "adapters")
    if state.average is not None:
        run.log_artifact(average_file(checkpoint, r), "adapters")
    return row


def planned_privacy(cfg: ExperimentConfig, state: RunState) -> str:
    """The run's privacy in one line, logged at its start: the guarantee its planned rounds give (the target,
    or with a fixed noise multiplier what those rounds spend) and the noise that pays for it."""
    p = cfg.privacy
    if p.mode == "none":
        return describe_guarantee(mode="none", epsilon=math.inf, delta=p.delta, kind=ledger_kind(cfg))
    # the planned spend is needed without a cap, and for the server's view in mode distributed
    spend, server_spend = (
        planned_spend(cfg, state) if p.target_epsilon is None or p.mode == "distributed" else (math.inf, math.inf)
    )
    guarantee = describe_guarantee(
        mode=p.mode, epsilon=spend if p.target_epsilon is None else p.target_epsilon, delta=p.delta,
        kind=ledger_kind(cfg), fixed_seed=p.noise_seed is not None,
        server_epsilon=server_spend if p.mode == "distributed" else None,
    )
    if p.target_epsilon is not None:
        budget = f"budget {guarantee}"
    elif p.mode == "paper":  # a per-iteration formula: nothing composes over rounds
        budget = f"no epsilon cap; by the paper's formula {guarantee}"
    else:
        every = "a client taking part in every round, " if p.mode != "client" and sampled_clients(cfg) else ""
        budget = f"no epsilon cap; {every}the planned rounds spend at most {guarantee}"
    plan = state.plan
    if plan.aggregate is not None:  # mode distributed
        noise = (f"noise multiplier {plan.aggregate:.4f} for the sum of any {quorum(cfg) - 1} uploads, "
                 f"{max(plan.clients.values()):.4f} in each client's share")
    else:
        server = {round(plan.server, 4)} if plan.server else set()
        sigmas = sorted({round(s, 4) for s in plan.clients.values()} | server)
        noise = f"noise multiplier {', '.join(map(str, sigmas))}"
    return f"{budget} after {cfg.federation.rounds} round(s); {noise}"


def progress_epsilon(cfg: ExperimentConfig, epsilon: float, *, server_view: float | None = None) -> str:
    """The epsilon for a progress bar, still naming its relation, accountant and delta (and mode distributed's
    server view)."""
    p = cfg.privacy
    if p.mode == "none":
        return "no DP"
    line = f"epsilon {epsilon:.2f} ({short_guarantee(mode=p.mode, accountant=ledger_kind(cfg), delta=p.delta)})"
    return line if server_view is None else f"{line}; each upload, as the server sees it: {server_view:.2f}"


def progress_bar(**kwargs: Any) -> tqdm[Any]:
    """A progress bar on a terminal (stderr is a TTY); silent in logs, DVC and deployments."""
    return tqdm(disable=not sys.stderr.isatty(), dynamic_ncols=True, **kwargs)


def run_round(
    cfg: ExperimentConfig, state: RunState, r: int, clients: list[int], events: dict[str, DpSgdRun],
    uploads: dict[int, DpSgdRun],
) -> None:
    """Train the round's clients, aggregate, validate; record the spent events (per ledger, and each client's
    own upload, `planned_uploads`) and the round's row."""
    p = cfg.privacy
    global_model = state.global_model
    check_shared_model(cfg)  # a model that would train the wrong weights stops the run, not just its clients
    updates, failed, released = train_round_clients(cfg, r, clients, global_model, state.plan, uploads)
    if p.mode == "client":
        assert state.plan.server is not None
        new_model, state.clip_norm, state.server_optimizer = aggregate_private(
            cfg, global_model, updates, state.plan.server, state.clip_norm, state.server_optimizer
        )
    else:
        new_model, state.server_optimizer = aggregate(cfg, global_model, updates, state.server_optimizer)
    charge_round(cfg, state, events, uploads, released=released, aggregated={u.client_id for u in updates})
    if cfg.federation.ema_decay > 0:
        state.average = average_releases(cfg, state.average, new_model)
    state.global_model = new_model
    val = evaluate(cfg, state.released, "validation")
    epsilon, per_ledger = spent_epsilon(cfg, state.ledgers)
    _, server_view = spent_epsilon(cfg, state.server_view)
    round_down = len(global_model.adapter) * len(clients)
    round_up = sum(len(u.adapter) for u in updates)
    state.bytes_down += round_down
    state.bytes_up += round_up
    state.client_rounds += len(clients)
    private = participation_is_private(cfg)
    state.history.append(
        {
            "round": r,
            "clients": None if private else clients,
            "failed_clients": None if private else sorted(failed),
            "failures": None if private else len(failed),
            "train_loss": _weighted_train_loss(updates, private=p.mode != "none"),
            "val_loss": val["loss"],
            "val_accuracy": val["accuracy"],
            "val_macro_f1": val["macro_f1"],
            "epsilon": None if p.mode == "none" else epsilon,  # None without DP, as in every file written
            "clip_norm": state.clip_norm if p.mode == "client" else None,
            "bytes_up": None if private else round_up,
            "bytes_down": None if private else round_down,
            "server_view_epsilon": max(server_view.values()) if server_view else None,
            "per_client": None if private else per_client_numbers(updates, per_ledger, charged=released,
                                                                   server_view=server_view),
            "base_dtypes": None if private else sorted({u.base_dtype for u in updates}),
        }
    )


def charge_round(
    cfg: ExperimentConfig, state: RunState, events: dict[str, DpSgdRun], uploads: dict[int, DpSgdRun], *,
    released: set[int], aggregated: set[int],
) -> None:
    """Record what the round released, once it exists (a failed client released nothing): each client's events
    if it sent an update (rejected ones too), the population's event (mode client). Mode distributed: a
    client's records are in the sum only if its upload was aggregated; the server saw every upload sent."""
    p = cfg.privacy
    in_release = aggregated if p.mode == "distributed" else released
    for key, run in events.items():
        if p.mode == "client" or int(key) in in_release:
            state.ledgers[key].record(run)
    if p.mode == "distributed":
        for k in released:
            state.server_view[str(k)].record(uploads[k])


def per_client_numbers(
    updates: list[ClientUpdate], epsilons: dict[str, float], *, charged: set[int],
    server_view: dict[str, float] | None = None,
) -> dict[str, dict[str, float]]:
    """Each aggregated client's bytes up and records, and each charged client's epsilon so far (mode
    distributed: and the server's view of it), for MLflow.

    A client whose update was sent but rejected is charged for it, so it is listed with its epsilon alone.
    """
    numbers: dict[str, dict[str, float]] = {
        str(u.client_id): {"bytes_up": len(u.adapter), "num_examples": u.num_examples} for u in updates
    }
    for k in map(str, sorted(charged)):  # every aggregated client was charged too
        if k in epsilons:
            numbers.setdefault(k, {})["epsilon"] = epsilons[k]
        if server_view and k in server_view:
            numbers.setdefault(k, {})["server_view_epsilon"] = server_view[k]
    return numbers


class RoundFailed(RuntimeError):
    """Fewer clients than the quorum succeeded: the round is not applied."""


def client_trainer(cfg: ExperimentConfig) -> Task[..., ClientUpdate]:
    """The task that trains one client of a round, with the retries and time limit the privacy mode allows.

    Simulated clients: federation.client_timeout_seconds is enforced inside the client from when it gets the
    model (tasks.training.local_update), not on the task, whose clock would also run while the client waits for
    another client's training: whether a client made it would then depend on the other clients' data. Under DP
    with noise from OS entropy a failed client is not retried: a retry draws a new sample and new noise, and
    releasing the first attempt that succeeds is the mechanism conditioned on success, not the one the
    accountant composes; it counts against the quorum, as a silo does. (Seeded noise replays on a retry.)
    Silos: the coordinator's wait for the silo's run is limited on the task; silos are never retried
    (tasks.silos).
    """
    p, f = cfg.privacy, cfg.federation
    if f.silos is not None:
        return train_remote.with_options(timeout_seconds=f.client_timeout_seconds)
    if not p.rerun_replays:
        return train_client.with_options(retries=0)  # and the Dask or Ray scheduler re-runs none (flows.runners)
    return train_client


def train_round_clients(
    cfg: ExperimentConfig,
    r: int,
    clients: list[int],
    global_model: GlobalModel,
    plan: NoisePlan,
    planned: dict[int, DpSgdRun],
) -> tuple[list[ClientUpdate], dict[int, str], set[int]]:
    """Train the round's clients (retries and time limit: `client_trainer`) and screen their updates.

    Returns (accepted updates, {failed or rejected client: why}, clients that released an update) if
    the quorum of federation.min_clients is met, else raises RoundFailed naming the failed clients.
    """
    f = cfg.federation
    if f.silos is not None:  # cross-silo: each client is another organisation's deployment
        publish_global(cfg, global_model)
    futures = client_trainer(cfg).map(
        unmapped(cfg), unmapped(r), clients, unmapped(global_model), [plan.clients.get(k) for k in clients]
    )
    updates: list[ClientUpdate] = []
    failed: dict[int, str] = {}
    with progress_bar(total=len(clients), desc=f"round {r} clients", position=1, leave=False) as bar:
        for k, future in zip(clients, futures, strict=True):
            future.wait()
            if future.state.is_completed():
                updates.append(future.result())
            else:
                state = future.state  # a Dask worker lost under the task leaves it Running on the API
                lost = "its worker was lost; not re-run"
                failed[k] = (state.message or state.type.value) if state.is_final() else lost
            bar.update()
    released = {u.client_id for u in updates}  # a rejected update was still sent: its release is charged
    if f.silos is not None:  # a silo may have written its update and failed after: charge every silo started
        released = set(clients)
    updates, rejected = screen_updates(cfg, global_model, updates, planned)
    failed |= rejected
    # mode client: no quorum; a failed client adds zero to the noised sum, which is divided by the expected count
    needed = 0 if participation_is_private(cfg) else min(quorum(cfg), len(clients))
    who = (
        f"{len(failed)} sampled client(s)"  # mode client: who was sampled stays private
        if participation_is_private(cfg)
        else ", ".join(f"client {k} ({why})" for k, why in failed.items())
    )
    if len(updates) < needed:
        raise RoundFailed(
            f"round {r}: {len(updates)} of {len(clients)} clients succeeded, below the quorum of {needed} "
            f"(federation.min_clients); failed: {who}. Nothing of the round was applied."
        )
    if failed:
        get_run_logger().warning("round %d proceeds without %s", r, who)
    return updates, failed, released


def participation_is_private(cfg: ExperimentConfig) -> bool:
    """Mode client: who took part in a round (ids, counts, bytes) stays on the server. The client-level
    epsilon rests on amplification by sampling, which holds only if the sample is secret."""
    return cfg.privacy.mode == "client"


def write_outputs(
    cfg: ExperimentConfig, state: RunState, run: ExperimentRun, full_bytes: int, stopped: str | None
) -> dict[str, Any]:
    """adapter.safetensors and training.json in the run directory, and both in MLflow."""
    p = cfg.privacy
    epsilon, per_ledger = spent_epsilon(cfg, state.ledgers)
    server_epsilon, per_client_server_view = spent_epsilon(cfg, state.server_view)
    guarantee = describe_guarantee(
        mode=p.mode, epsilon=epsilon, delta=p.delta, kind=ledger_kind(cfg), fixed_seed=p.noise_seed is not None,
        server_epsilon=server_epsilon if p.mode == "distributed" else None,
    )
    dtypes = client_base_dtypes(cfg, state.history)
    out = cfg.run_dir
    adapter_path = out / "adapter.safetensors"
    atomic_write(adapter_path, state.released)
    summary = {
        "name": cfg.name,
        "mlflow_run_id": run.run_id,
        "rounds": state.global_model.round,
        "planned_rounds": cfg.federation.rounds,
        "stopped_by_budget_guard": stopped,
        "num_clients": cfg.federation.num_clients,
        "clients_per_round": cfg.federation.clients_per_round,
        "privacy": {
            "mode": p.mode,
            "epsilon": epsilon if np.isfinite(epsilon) else None,
            "delta": p.delta,
            "accountant": ledger_kind(cfg),
            "noise_multipliers": asdict(state.plan),
            "per_client_epsilon": {k: v for k, v in per_ledger.items() if k != POPULATION},
            "guarantee": guarantee,
            "noise_seed_fixed": p.noise_seed is not None,
            "ledgers": ledger_states(state.ledgers),
            **(
                {
                    "server_view_epsilon": server_epsilon,
                    "per_client_server_view_epsilon": per_client_server_view,
                    "server_view_ledgers": ledger_states(state.server_view),
                }
                if p.mode == "distributed"
                else {}
            ),
        },
        "bytes": {
            "adapter": len(state.global_model.adapter),
            "full_model": full_bytes,
            **(
                {"up": None, "down": None, "full_model_up": None, "full_model_down": None}
                if participation_is_private(cfg)  # mode client: participation stays on the server
                else {
                    "up": state.bytes_up,
                    "down": state.bytes_down,
                    "full_model_up": full_bytes * state.client_rounds,
                    "full_model_down": full_bytes * state.client_rounds,
                }
            ),
        },
        "history": state.history,
        "train_seconds": state.train_seconds,
        "base_dtype": base_dtype(cfg),  # this process: where the flow validates (threads runner: trains too)
        "client_base_dtypes": dtypes,
        "config": cfg.model_dump(mode="json"),
    }
    atomic_write(out / "training.json", json_bytes(summary))
    run.log_artifact(adapter_path, "adapter")
    run.log_artifact(out / "training.json")
    run.set_tags({"dplora.guarantee": guarantee})
    if dtypes is not None:
        run.set_tags({"dplora.client_base_dtypes": ",".join(dtypes)})
    if stopped:
        run.set_tags({"dplora.stopped_by_budget_guard": stopped})
    if np.isfinite(epsilon):
        run.log_metrics({"epsilon_final": epsilon}, step=state.global_model.round)
    return summary


def _weighted_train_loss(updates: list[ClientUpdate], *, private: bool) -> float | None:
    """Example-weighted mean of the clients' training losses; None under DP (`private`), where clients do not send
    them, or if a client without DP sent none (a silo whose loss was not finite: standard JSON carries it as null)."""
    lost = [] if private else [u.client_id for u in updates if u.train_loss is None]
    if lost:
        get_run_logger().warning("clients %s trained without DP but sent no finite training loss (diverged?)", lost)
    if not updates or any(u.train_loss is None for u in updates):
        return None
    return float(np.average([u.train_loss for u in updates], weights=[u.num_examples for u in updates]))
