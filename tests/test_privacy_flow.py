"""Privacy modes, the budget guard, checkpoints and resume, through the Prefect flows on a tiny model."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient
from opacus.accountants.analysis import rdp as opacus_rdp

from dplora_core.adapters import from_bytes, upload_state
from dplora_core.checkpoint import CheckpointError, load_checkpoint
from dplora_core.config import ExperimentConfig
from dplora_core.data import partition_iid
from dplora_core.messages import GlobalModel
from dplora_core.privacy.accountant import make_accountant, paper_epsilon
from dplora_core.strategy import AdamState
from flows.federated import (
    RunState,
    federated_finetune,
    new_ledgers,
    planned_events,
    planned_privacy,
    progress_epsilon,
)
from flows.pipeline import dplora_pipeline
from flows.report import format_summary
from tasks.runtime import read_partition, workspace
from tasks.training import aggregate_private, evaluate, init_adapter, sample_round_clients
from tests.helpers import tiny_config

ORDERS = list(make_accountant("rdp").orders)  # type: ignore[attr-defined]


def opacus_epsilon(q: float, sigma: float, steps: int, delta: float) -> float:
    """Reference epsilon from an independent implementation (Opacus RDP)."""
    rdp = opacus_rdp.compute_rdp(q=q, noise_multiplier=sigma, steps=steps, orders=ORDERS)
    return float(opacus_rdp.get_privacy_spent(orders=ORDERS, rdp=rdp, delta=delta)[0])


def test_budget_guard_stops_before_the_round_that_would_cross_the_target(
    tiny_model_dir: Path, raw_dir: Path, tmp_path: Path, prefect_harness: None
) -> None:
    sigma, delta, batch, steps = 1.0, 1e-3, 8, 2
    n = min(len(s) for s in partition_iid(48, 2, seed=0))  # the smaller client spends the most
    eps = [opacus_epsilon(batch / n, sigma, k * steps, delta) for k in range(1, 5)]
    target = (eps[1] + eps[2]) / 2  # two rounds fit, the third would cross
    cfg = tiny_config(
        tiny_model_dir, tmp_path, raw_dir, privacy__noise_multiplier=sigma, privacy__target_epsilon=target,
        privacy__delta=delta, federation__rounds=4,
    )
    metrics = dplora_pipeline(cfg)
    training = json.loads((cfg.run_dir / "training.json").read_text())
    assert training["rounds"] == 2 and len(training["history"]) == 2
    assert "round 3 would take client" in training["stopped_by_budget_guard"]
    assert metrics["privacy"]["epsilon"] == pytest.approx(eps[1], rel=1e-3)
    assert metrics["privacy"]["epsilon"] <= target
    tags = MlflowClient(cfg.tracking.mlflow_uri).get_run(metrics["mlflow_run_id"]).data.tags
    assert "budget guard" in tags["dplora.stopped_by_budget_guard"]
    assert "stopped early" in format_summary(metrics)


def fixed_sigma_start(cfg: ExperimentConfig, *, rounds_done: int, rounds_charged: int) -> RunState:
    """A run's state before round rounds_done + 1, its ledgers charged for rounds_charged rounds (one more than
    done: a resumed run charged for its interrupted round)."""
    from tasks.data import partition_clients, prepare_data
    from tasks.training import plan_noise

    prepare_data.fn(cfg)
    partition_clients.fn(cfg)
    plan = plan_noise.fn(cfg)
    state = RunState(GlobalModel(round=rounds_done, adapter=b""), plan, new_ledgers(cfg), 1.0, "run-id")
    everyone = list(range(cfg.federation.num_clients))
    for _ in range(rounds_charged):
        for key, event in planned_events(cfg, plan, everyone).items():
            state.ledgers[key].record(event)
    return state


def stated_epsilon(line: str) -> float:
    match = re.search(r"\(epsilon = ([0-9.]+), delta = ", line)
    assert match, line
    return float(match.group(1))


@pytest.mark.parametrize(
    ("clients_per_round", "rounds", "rounds_done", "rounds_charged"),
    [(2, 3, 0, 0), (1, 3, 0, 0), (2, 2, 1, 2)],  # a fresh run; clients sampled; resumed after an interrupted round
)
def test_a_fixed_noise_multiplier_states_up_front_the_epsilon_its_rounds_spend(
    tiny_model_dir: Path, raw_dir: Path, tmp_path: Path, prefect_harness: None, clients_per_round: int, rounds: int,
    rounds_done: int, rounds_charged: int,
) -> None:
    sigma, delta, batch, steps = 1.0, 1e-3, 8, 2
    cfg = tiny_config(tiny_model_dir, tmp_path, raw_dir, privacy__noise_multiplier=sigma,
                      privacy__target_epsilon=None, privacy__delta=delta, federation__rounds=rounds,
                      federation__clients_per_round=clients_per_round)
    state = fixed_sigma_start(cfg, rounds_done=rounds_done, rounds_charged=rounds_charged)
    charged = rounds_charged + rounds - rounds_done  # what the ledgers hold, and the rounds still to run
    n = min(len(shard) for shard in read_partition(cfg))  # the smaller client spends the most
    line = planned_privacy(cfg, state)
    assert "the planned rounds spend at most (epsilon = " in line
    assert stated_epsilon(line) == pytest.approx(opacus_epsilon(batch / n, sigma, charged * steps, delta), rel=1e-3)
    assert ("a client taking part in every round" in line) == (clients_per_round < 2)


@pytest.fixture
def two_rounds(tiny_model_dir: Path, raw_dir: Path, tmp_path: Path, prefect_harness: None):
    cfg = tiny_config(tiny_model_dir, tmp_path, raw_dir, federation__rounds=2)
    return cfg, dplora_pipeline(cfg)


def test_checkpoint_and_mlflow_hold_the_accountant_state(two_rounds) -> None:
    cfg, metrics = two_rounds
    ledgers = json.loads((cfg.run_dir / "training.json").read_text())["privacy"]["ledgers"]
    assert [len(ledger["runs"]) for ledger in ledgers.values()] == [2, 2]
    checkpoint = load_checkpoint(cfg.run_dir / "checkpoint")
    assert checkpoint is not None and checkpoint.round == 2
    assert checkpoint.state["ledgers"] == ledgers
    assert checkpoint.adapter == (cfg.run_dir / "adapter.safetensors").read_bytes()
    client = MlflowClient(cfg.tracking.mlflow_uri)
    local = client.download_artifacts(metrics["mlflow_run_id"], "privacy/accountant.json", str(cfg.run_dir))
    logged = json.loads(Path(local).read_text())
    assert logged == {"round": 2, "ledgers": ledgers}


def test_resumed_run_stops_at_the_budget_it_already_spent(two_rounds) -> None:
    """Calibrated for 2 rounds, resumed with rounds=4: the sigma is kept and round 3 would cross epsilon 8."""
    cfg, metrics = two_rounds
    more = cfg.model_copy(update={"federation": cfg.federation.model_copy(update={"rounds": 4})})
    resumed = federated_finetune(more, resume=True)
    assert resumed["rounds"] == 2
    assert "round 3" in resumed["stopped_by_budget_guard"]
    assert resumed["mlflow_run_id"] == metrics["mlflow_run_id"]
    assert resumed["privacy"]["epsilon"] == metrics["privacy"]["epsilon"]


def test_resume_refuses_a_changed_config_naming_the_field(two_rounds) -> None:
    cfg, _ = two_rounds
    other = cfg.model_copy(update={"lora": cfg.lora.model_copy(update={"rank": 3})})
    with pytest.raises(CheckpointError, match=r"config changed since the checkpoint: lora\.rank"):
        federated_finetune(other, resume=True)


def test_resume_refuses_a_changed_moving_average(two_rounds) -> None:
    """The released adapter would average rounds the checkpoint never kept an average of."""
    cfg, _ = two_rounds
    other = cfg.model_copy(update={"federation": cfg.federation.model_copy(update={"ema_decay": 0.5})})
    with pytest.raises(CheckpointError, match=r"config changed since the checkpoint: federation\.ema_decay"):
        federated_finetune(other, resume=True)


def test_resume_refuses_fewer_rounds_than_the_checkpoint_has_done(two_rounds) -> None:
    cfg, _ = two_rounds
    fewer = cfg.model_copy(update={"federation": cfg.federation.model_copy(update={"rounds": 1})})
    with pytest.raises(CheckpointError, match=r"federation\.rounds \(1, fewer than the 2 done\)"):
        federated_finetune(fewer, resume=True)


def test_resume_continues_training_and_accounting(
    tiny_model_dir: Path, raw_dir: Path, tmp_path: Path, prefect_harness: None
) -> None:
    sigma, delta = 1.2, 1e-3
    cfg = tiny_config(
        tiny_model_dir, tmp_path, raw_dir, privacy__noise_multiplier=sigma, privacy__target_epsilon=None,
        privacy__delta=delta, federation__rounds=1,
    )
    dplora_pipeline(cfg)
    more = cfg.model_copy(update={"federation": cfg.federation.model_copy(update={"rounds": 2})})
    resumed = federated_finetune(more, resume=True)
    assert [row["round"] for row in resumed["history"]] == [1, 2]
    n = min(len(s) for s in partition_iid(48, 2, seed=0))
    steps = 2 * cfg.federation.local_steps
    assert resumed["privacy"]["epsilon"] == pytest.approx(opacus_epsilon(8 / n, sigma, steps, delta), rel=1e-3)


def test_client_level_mode_with_adaptive_clipping(
    tiny_model_dir: Path, raw_dir: Path, tmp_path: Path, prefect_harness: None
) -> None:
    cfg = tiny_config(
        tiny_model_dir, tmp_path, raw_dir, privacy__mode="client", privacy__target_epsilon=8.0,
        privacy__adaptive_clipping=True, privacy__clipped_count_stddev=2.0, privacy__max_grad_norm=0.01,
        federation__num_clients=4, federation__clients_per_round=2, federation__rounds=3,
    )
    metrics = dplora_pipeline(cfg)
    priv, history = metrics["privacy"], json.loads((cfg.run_dir / "training.json").read_text())["history"]
    z = priv["noise_multipliers"]["server"]
    reference = opacus_epsilon(2 / 4, z, 3, cfg.privacy.delta)
    assert priv["epsilon"] == pytest.approx(reference, rel=1e-3)
    assert reference <= 8.0
    assert "client-level" in priv["guarantee"] and priv["per_client_epsilon"] == {}
    assert all(row["train_loss"] is None for row in history)  # no raw losses leave a client
    # who took part stays on the server: amplification by sampling needs a secret sample
    assert all(row["clients"] is None and row["bytes_up"] is None for row in history)
    assert metrics["bytes"]["up"] is None and "bytes per adapter payload" in format_summary(metrics)
    assert len({row["clip_norm"] for row in history}) == 3  # the clip norm adapts every round


def test_client_level_mode_poisson_samples_clients_at_the_accountants_rate(
    tiny_model_dir: Path, raw_dir: Path, tmp_path: Path
) -> None:
    """The client-level accountant composes Poisson sampling at q = clients_per_round / num_clients: each client
    joins a round independently with probability q, so the round's size varies around q N."""
    cfg = tiny_config(tiny_model_dir, tmp_path, raw_dir, privacy__mode="client", federation__num_clients=20,
                      federation__clients_per_round=5)
    rounds = [sample_round_clients(cfg, r) for r in range(1, 401)]
    sizes = torch.tensor([len(c) for c in rounds], dtype=torch.float64)
    q, n = 5 / 20, 20
    assert abs(sizes.mean().item() - q * n) < 5 * (n * q * (1 - q) / len(rounds)) ** 0.5
    assert sizes.std().item() == pytest.approx((n * q * (1 - q)) ** 0.5, rel=0.2)  # a fixed-size subset has 0
    joined = torch.zeros(n)
    for clients in rounds:
        joined[clients] += 1
    assert ((joined / len(rounds) - q).abs() < 5 * (q * (1 - q) / len(rounds)) ** 0.5).all()


def test_client_level_server_noise_has_std_z_d_clip_over_expected_clients(
    tiny_model_dir: Path, raw_dir: Path, tmp_path: Path
) -> None:
    """With adaptive clipping the count takes part of the budget: the update sum gets z_d = 1.809 for z = 1 and a
    count std of 0.6 (Andrew et al. 2021, Thm 1, by hand), on the sum; divided by the expected clients (2)."""
    cfg = tiny_config(tiny_model_dir, tmp_path, raw_dir, privacy__mode="client", privacy__adaptive_clipping=True,
                      privacy__clipped_count_stddev=0.6, federation__num_clients=4, federation__clients_per_round=2)
    start = init_adapter.fn(cfg)
    trained = upload_state(from_bytes(start.adapter, source="test"), freeze_a=cfg.lora.freeze_a)
    noise = []
    for r in range(20):  # no client in the round: the released update is the noise alone
        start_r = GlobalModel(round=r, adapter=start.adapter)
        model, _, _ = aggregate_private.fn(cfg, start_r, [], noise_multiplier=1.0, clip_norm=0.5)
        after = from_bytes(model.adapter, source="test")
        noise += [(after[k] - v).flatten() for k, v in trained.items()]
    draws = torch.cat(noise).double()
    expected = 1.8091 * 0.5 / 2
    assert draws.std().item() == pytest.approx(expected, rel=5 / (2 * draws.numel()) ** 0.5)
    assert abs(draws.mean().item()) < 5 * expected / draws.numel() ** 0.5


def test_paper_mode_labels_its_epsilon_as_the_papers_bound(
    tiny_model_dir: Path, raw_dir: Path, tmp_path: Path, prefect_harness: None
) -> None:
    cfg = tiny_config(
        tiny_model_dir, tmp_path, raw_dir, privacy__mode="paper", privacy__target_epsilon=2.0,
        privacy__upload_noise_std=1e-4, federation__rounds=1,
    )
    metrics = dplora_pipeline(cfg)
    priv = metrics["privacy"]
    assert "paper bound, not a certified record-level guarantee" in priv["guarantee"]
    sigma = priv["noise_multipliers"]["clients"]["0"]
    assert priv["epsilon"] == pytest.approx(paper_epsilon(noise_multiplier=sigma, delta=cfg.privacy.delta))
    assert priv["epsilon"] == pytest.approx(2.0)


def test_adaptive_clipping_budget_it_cannot_pay_for_is_refused_before_training(
    tiny_model_dir: Path, raw_dir: Path, tmp_path: Path
) -> None:
    from tasks.training import plan_noise

    cfg = tiny_config(
        tiny_model_dir, tmp_path, raw_dir, privacy__mode="client", privacy__noise_multiplier=3.0,
        privacy__adaptive_clipping=True, privacy__clipped_count_stddev=0.5,
        federation__num_clients=4, federation__clients_per_round=2,
    )
    with pytest.raises(ValueError, match=r"privacy\.clipped_count_stddev \(0\.5\) is too small"):
        plan_noise.fn(cfg)


def crash_after_round_2_uploads(cfg, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    """Run the pipeline until round 2's validation, which crashes after the clients uploaded; then un-crash."""
    import flows.federated as federated

    real, calls = federated.evaluate, {"n": 0}

    def crash_in_round_2(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("simulated crash after the round's uploads")
        return real(*args, **kwargs)

    monkeypatch.setattr(federated, "evaluate", crash_in_round_2)
    with pytest.raises(RuntimeError, match="simulated crash"):
        dplora_pipeline(cfg)
    monkeypatch.setattr(federated, "evaluate", real)


def test_a_run_that_died_midway_shows_its_epsilons_with_their_relation_in_mlflow(
    tiny_model_dir: Path, raw_dir: Path, tmp_path: Path, prefect_harness: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The per-round epsilon metrics are logged as rounds end; the tag saying what they bound is there from the
    start, not only once the run finishes."""
    cfg = tiny_config(tiny_model_dir, tmp_path, raw_dir)
    crash_after_round_2_uploads(cfg, monkeypatch)
    checkpoint = load_checkpoint(cfg.run_dir / "checkpoint")
    assert checkpoint is not None
    run = MlflowClient(cfg.tracking.mlflow_uri).get_run(checkpoint.state["mlflow_run_id"])
    assert "epsilon" in run.data.metrics  # round 1's
    tag = run.data.tags["dplora.guarantee"]
    assert tag.startswith("planned: budget (epsilon = 8.000, delta = 0.001)-DP, record-level, zero-out"), tag
    assert "RDP accountant" in tag


def test_a_resumed_run_ends_with_what_it_spent_as_its_guarantee_tag(
    tiny_model_dir: Path, raw_dir: Path, tmp_path: Path, prefect_harness: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The resumed process sets the "planned:" tag again; at the end it holds the spent guarantee, not the plan."""
    cfg = tiny_config(tiny_model_dir, tmp_path, raw_dir)
    crash_after_round_2_uploads(cfg, monkeypatch)
    metrics = federated_finetune(cfg, resume=True)
    run = MlflowClient(cfg.tracking.mlflow_uri).get_run(metrics["mlflow_run_id"])
    tag = run.data.tags["dplora.guarantee"]
    assert tag == metrics["privacy"]["guarantee"], tag
    assert tag.startswith(f"(epsilon = {metrics['privacy']['epsilon']:.3f},"), tag  # spent, not "planned: budget"


def test_a_run_without_dp_resumes_from_its_standard_json_checkpoint(
    tiny_model_dir: Path, raw_dir: Path, tmp_path: Path, prefect_harness: None
) -> None:
    """Its rounds' epsilon (infinite) is null in state.json, which stays RFC 8259 JSON, and reads back on resume."""
    cfg = tiny_config(tiny_model_dir, tmp_path, raw_dir, privacy__mode="none", federation__rounds=1)
    dplora_pipeline(cfg)
    state = (cfg.run_dir / "checkpoint" / "state.json").read_text()
    json.loads(state, parse_constant=lambda name: pytest.fail(f"state.json holds {name}"))
    more = cfg.model_copy(update={"federation": cfg.federation.model_copy(update={"rounds": 2})})
    resumed = federated_finetune(more, resume=True)
    assert [(row["round"], row["epsilon"]) for row in resumed["history"]] == [(1, None), (2, None)]
    assert resumed["privacy"]["epsilon"] is None


@pytest.mark.parametrize(("noise_seed", "charged"), [(None, 3), (7, 2)])
def test_a_round_interrupted_after_release_is_charged_on_resume(
    tiny_model_dir: Path, raw_dir: Path, tmp_path: Path, prefect_harness: None, monkeypatch: pytest.MonkeyPatch,
    noise_seed: int | None, charged: int,
) -> None:
    """Round 2 crashes after the clients uploaded. With OS-entropy noise the re-run is a second release, so the
    resumed run charges round 2 twice; with a fixed seed the re-run adds the same noise to the same updates (this
    process, this device), one release, charged once."""
    cfg = tiny_config(
        tiny_model_dir, tmp_path, raw_dir, privacy__noise_multiplier=1.0, privacy__target_epsilon=None,
        privacy__noise_seed=noise_seed, federation__rounds=2,
    )
    crash_after_round_2_uploads(cfg, monkeypatch)
    resumed = federated_finetune(cfg, resume=True)
    assert [row["round"] for row in resumed["history"]] == [1, 2]
    steps, shards = cfg.federation.local_steps, read_partition(cfg)
    for k, ledger in resumed["privacy"]["ledgers"].items():
        q = min(1.0, cfg.federation.batch_size / len(shards[int(k)]))
        assert ledger["runs"] == [{"sample_rate": q, "noise_multiplier": 1.0, "steps": steps}] * charged
        reference = opacus_epsilon(q, 1.0, charged * steps, cfg.privacy.delta)
        assert resumed["privacy"]["per_client_epsilon"][k] == pytest.approx(reference, rel=1e-3)


def test_distributed_round_interrupted_after_release_is_charged_to_both_views_on_resume(
    tiny_model_dir: Path, raw_dir: Path, tmp_path: Path, prefect_harness: None, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """As above with OS-entropy noise, in mode distributed: the server saw the lost round's uploads too."""
    cfg = distributed_config(
        tiny_model_dir, tmp_path, raw_dir, privacy__noise_multiplier=1.0, privacy__target_epsilon=None,
        privacy__noise_seed=None,
    )
    crash_after_round_2_uploads(cfg, monkeypatch)
    privacy = federated_finetune(cfg, resume=True)["privacy"]
    for view in ("ledgers", "server_view_ledgers"):
        assert [len(ledger["runs"]) for ledger in privacy[view].values()] == [3, 3]


def test_a_fresh_run_moves_an_unfinished_checkpoint_aside_instead_of_writing_over_it(
    tiny_model_dir: Path, raw_dir: Path, tmp_path: Path, prefect_harness: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    import flows.federated as federated

    cfg = tiny_config(tiny_model_dir, tmp_path, raw_dir, federation__rounds=2)
    real = federated.evaluate

    def crash(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise RuntimeError("simulated crash in round 1")

    monkeypatch.setattr(federated, "evaluate", crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        dplora_pipeline(cfg)
    monkeypatch.setattr(federated, "evaluate", real)
    interrupted = load_checkpoint(cfg.run_dir / "checkpoint")
    assert interrupted is not None and interrupted.state["pending"]["round"] == 1
    summary = federated_finetune(cfg)  # no resume: starts afresh
    (moved,) = cfg.run_dir.glob("checkpoint.superseded-*")
    tags = MlflowClient(cfg.tracking.mlflow_uri).get_run(summary["mlflow_run_id"]).data.tags
    tag = tags["dplora.superseded_checkpoint"]
    assert tag.startswith(f"{moved} (round 1 interrupted") and "outside this run's epsilon" in tag
    kept = load_checkpoint(moved)
    assert kept is not None and kept.state == interrupted.state and kept.adapter == interrupted.adapter
    finished = load_checkpoint(cfg.run_dir / "checkpoint")
    assert finished is not None and finished.round == 2 and "pending" not in finished.state


def distributed_config(tiny_model_dir: Path, tmp: Path, raw_dir: Path, **overrides):
    return tiny_config(
        tiny_model_dir, tmp, raw_dir, privacy__mode="distributed", federation__local_steps=1,
        federation__optimizer="sgd", federation__learning_rate=1.0, federation__server_optimizer="adam",
        federation__server_learning_rate=0.01, **overrides,
    )


def test_distributed_mode_reports_the_released_adapters_and_the_servers_epsilons(
    tiny_model_dir: Path, raw_dir: Path, tmp_path: Path, prefect_harness: None
) -> None:
    """3 clients: any 2 uploads' shares carry sigma (calibrated to epsilon 8 over 2 one-step rounds), so the sum
    does even for a client that takes out its own; the server, which sees each upload, gets only sigma / sqrt(2).
    Both epsilons pinned to Opacus."""
    cfg = distributed_config(tiny_model_dir, tmp_path, raw_dir, federation__num_clients=3,
                             federation__clients_per_round=3)
    metrics = dplora_pipeline(cfg)
    priv = metrics["privacy"]
    sigma = priv["noise_multipliers"]["aggregate"]
    share = pytest.approx(sigma / 2**0.5)
    assert priv["noise_multipliers"]["clients"] == {"0": share, "1": share, "2": share}
    q, delta = 8 / min(len(s) for s in partition_iid(48, 3, seed=0)), cfg.privacy.delta
    assert priv["epsilon"] == pytest.approx(opacus_epsilon(q, sigma, 2, delta), rel=1e-3)
    assert priv["epsilon"] == pytest.approx(8.0, rel=1e-3) and priv["epsilon"] <= 8.0
    server = opacus_epsilon(q, sigma / 2**0.5, 2, delta)
    assert priv["server_view_epsilon"] == pytest.approx(server, rel=1e-3) and server > 8.0
    assert "everyone who sees only the sum of the clients' uploads (the released adapters), any one client included" \
        in priv["guarantee"]
    assert f"against the server, which sees each client's upload with its share of the noise only: epsilon = " \
           f"{priv['server_view_epsilon']:.3f}" in priv["guarantee"]
    import mlflow

    mlflow.set_tracking_uri(cfg.tracking.mlflow_uri)
    logged = mlflow.artifacts.load_dict(f"runs:/{metrics['mlflow_run_id']}/privacy/accountant.json")
    written = json.loads((cfg.run_dir / "training.json").read_text())["privacy"]
    assert logged["server_view_ledgers"] == written["server_view_ledgers"]  # the MLflow copy has both views too
    checkpoint = load_checkpoint(cfg.run_dir / "checkpoint")
    assert checkpoint is not None and checkpoint.server_optimizer is not None
    assert AdamState.from_bytes(checkpoint.server_optimizer, source="test").t == 2


def test_distributed_run_resumed_after_round_one_ends_where_an_uninterrupted_one_does(
    tiny_model_dir: Path, raw_dir: Path, tmp_path: Path, prefect_harness: None
) -> None:
    """The server's Adam moments travel in the checkpoint: resuming loses none of them (fixed noise seed)."""
    cfg = distributed_config(tiny_model_dir, tmp_path, raw_dir, privacy__noise_multiplier=1.0)
    straight = cfg.model_copy(update={"name": "straight"})
    dplora_pipeline(straight)
    halves = cfg.model_copy(update={"name": "halves", "federation": cfg.federation.model_copy(update={"rounds": 1})})
    dplora_pipeline(halves)
    resumed = federated_finetune(halves.model_copy(update={"federation": straight.federation}), resume=True)
    assert resumed["rounds"] == 2
    adapter = "adapter.safetensors"
    assert (halves.run_dir / adapter).read_bytes() == (straight.run_dir / adapter).read_bytes()


def test_moving_average_is_validated_and_released_while_clients_train_from_the_global_adapter(
    tiny_model_dir: Path, raw_dir: Path, tmp_path: Path, prefect_harness: None
) -> None:
    """federation.ema_decay: the rounds' global adapters are those of the same run without it (post-processing
    only); each round validates their moving average, and adapter.safetensors is the last one."""
    cfg = tiny_config(tiny_model_dir, tmp_path, raw_dir, federation__ema_decay=0.25, federation__rounds=3,
                      lora__freeze_a=True, privacy__noise_multiplier=1.0)
    averaged = cfg.model_copy(update={"name": "averaged"})
    plain = cfg.model_copy(update={"name": "plain", "federation": cfg.federation.model_copy(update={"ema_decay": 0.0})})
    runs = {c.name: dplora_pipeline(c)["mlflow_run_id"] for c in (averaged, plain)}
    client = MlflowClient(cfg.tracking.mlflow_uri)

    def logged(run: str, name: str) -> bytes:
        return Path(client.download_artifacts(runs[run], f"adapters/{name}", str(tmp_path / run))).read_bytes()

    rounds = [logged("averaged", f"adapter-round-000{r}.safetensors") for r in (1, 2, 3)]
    assert rounds == [logged("plain", f"adapter-round-000{r}.safetensors") for r in (1, 2, 3)]
    x1, x2, x3 = (from_bytes(x, source=f"round {r}") for r, x in enumerate(rounds, 1))
    released = (averaged.run_dir / "adapter.safetensors").read_bytes()
    assert released == logged("averaged", "average-round-0003.safetensors")
    average = from_bytes(released, source="released")
    for k in average:
        expected = x3[k] if ".lora_A." in k else 0.0625 * x1[k] + 0.1875 * x2[k] + 0.75 * x3[k]
        torch.testing.assert_close(average[k], expected)
    history = json.loads((averaged.run_dir / "training.json").read_text())["history"]
    assert history[-1]["val_loss"] == pytest.approx(evaluate.fn(averaged, released, "validation")["loss"])
    assert history[-1]["val_loss"] != pytest.approx(evaluate.fn(averaged, rounds[-1], "validation")["loss"])


def test_a_run_with_a_moving_average_resumed_after_round_one_ends_where_an_uninterrupted_one_does(
    tiny_model_dir: Path, raw_dir: Path, tmp_path: Path, prefect_harness: None
) -> None:
    """The average travels in the checkpoint: resuming loses none of it (fixed noise seed)."""
    cfg = tiny_config(tiny_model_dir, tmp_path, raw_dir, federation__ema_decay=0.25, lora__freeze_a=True,
                      privacy__noise_multiplier=1.0)
    straight = cfg.model_copy(update={"name": "straight"})
    dplora_pipeline(straight)
    halves = cfg.model_copy(update={"name": "halves", "federation": cfg.federation.model_copy(update={"rounds": 1})})
    dplora_pipeline(halves)
    federated_finetune(halves.model_copy(update={"federation": straight.federation}), resume=True)
    adapter = "adapter.safetensors"
    assert (halves.run_dir / adapter).read_bytes() == (straight.run_dir / adapter).read_bytes()


def test_a_second_identical_run_in_the_same_process_ends_with_the_same_adapter(
    tiny_model_dir: Path, raw_dir: Path, tmp_path: Path, prefect_harness: None
) -> None:
    """A study runs its cells in one process on one shared model: nothing a run leaves on it (here the first run's
    zero-shot scoring, which once left a frozen A trainable) may change the next (fixed noise seed, freeze_a)."""
    cfg = tiny_config(tiny_model_dir, tmp_path, raw_dir, lora__freeze_a=True, privacy__noise_multiplier=1.0,
                      data__max_test_examples=15)  # a setting no other test shares: this test scores zero-shot first
    workspace.cache_clear()
    first, second = (cfg.model_copy(update={"name": name}) for name in ("first", "second"))
    dplora_pipeline(first)
    shared = workspace(cfg.model, cfg.lora).model
    assert not any(p.requires_grad for name, p in shared.named_parameters() if "lora_A" in name)
    dplora_pipeline(second)
    adapter = "adapter.safetensors"
    assert (first.run_dir / adapter).read_bytes() == (second.run_dir / adapter).read_bytes()


def test_distributed_refuses_a_client_smaller_than_the_batch_before_training(
    tiny_model_dir: Path, raw_dir: Path, tmp_path: Path, prefect_harness: None
) -> None:
    """Its expected batch would be its n, not batch_size, and its records would weigh more in the mean."""
    cfg = distributed_config(tiny_model_dir, tmp_path, raw_dir, federation__batch_size=30)
    with pytest.raises(ValueError, match=re.escape("client 0 has 24 training records, fewer than "
                                                    "federation.batch_size (30)")):
        dplora_pipeline(cfg)
    assert not (cfg.run_dir / "checkpoint").exists()


def test_the_round_line_of_mode_distributed_names_the_servers_view(
    tiny_model_dir: Path, raw_dir: Path, tmp_path: Path
) -> None:
    cfg = distributed_config(tiny_model_dir, tmp_path, raw_dir)
    assert progress_epsilon(cfg, 8.0, server_view=11.5) == (
        "epsilon 8.00 (record-level, sum of uploads, rdp, δ=0.001); each upload, as the server sees it: 11.50"
    )
