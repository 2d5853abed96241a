"""Empirical privacy audit: canaries planted in one client, a loss-threshold membership-inference attack.

Client 0 trains two adapters from the same initial adapter on its records plus m member canaries,
alone but on its federated schedule (rounds of local_steps, each at its round's learning rate):
one with DP-SGD exactly as configured, one without DP. The attack scores the m members and m
held-out canaries (score = -label-word loss); its AUC and the empirical epsilon lower bound it
suggests (`dplora_core.privacy.audit`) are reported next to the accountant's epsilon.
A lower bound above the accountant's epsilon calls for investigation: a bug in the mechanism or
the accountant, or the bound's own optimism (the threshold is chosen on the same canaries, and
Clopper-Pearson treats the canaries of one training run as independent trials).
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from prefect import flow, get_run_logger

from dplora_core.batching import encode
from dplora_core.config import ExperimentConfig
from dplora_core.io import atomic_write, json_bytes
from dplora_core.privacy.accountant import describe_guarantee
from dplora_core.privacy.audit import epsilon_lower_bound, max_certifiable_epsilon, roc_auc
from dplora_core.privacy.canaries import make_canaries
from dplora_core.train import DpSgdParams, sample_rate
from flows.tracking import ExperimentRun
from tasks.audit import (
    AUDITED_CLIENT,
    CANARY_WORDS,
    audit_noise_multiplier,
    canary_words,
    ensure_partition,
    train_and_score,
)
from tasks.runtime import client_data, split_examples, task_of, workspace

CONFIDENCE = 0.95


def attack_summary(scores: list[float], m: int, delta: float) -> dict[str, Any]:
    """AUC and empirical epsilon lower bound of the threshold attack: the first m scores are the members'."""
    members, held_out = scores[:m], scores[m:]
    bound = epsilon_lower_bound(members, held_out, delta=delta, confidence=CONFIDENCE)
    return {"auc": roc_auc(members, held_out), "epsilon_lower_bound": bound.epsilon,
            "empirical": asdict(bound), "member_scores": members, "held_out_scores": held_out}


@flow(name="privacy-audit")
def privacy_audit(config: ExperimentConfig, canaries: int = 64) -> dict[str, Any]:
    """Membership inference on `canaries` planted vs as many held-out canaries, with and without DP-SGD."""
    cfg, p, f = config, config.privacy, config.federation
    if p.mode != "sample":
        raise ValueError(
            f"privacy.mode is {p.mode!r}: the audit targets record-level DP-SGD, set privacy.mode: sample"
        )
    if canaries < 1:
        raise ValueError(f"canaries must be >= 1, got {canaries}")
    log = get_run_logger()
    ensure_partition(cfg)
    ws = workspace(cfg.model, cfg.lora)
    spec = task_of(cfg)
    words = canary_words(ws.tokenizer, split_examples(cfg.data, "train"))
    planted = make_canaries(2 * canaries, labels=spec.labels, words=words, seed=f.seed, length=CANARY_WORDS)
    encoded = [encode(c, spec, ws.tokenizer, max_len=cfg.model.max_seq_len) for c in planted]
    records = list(client_data(cfg, AUDITED_CLIENT))
    data = records + encoded[:canaries]  # the members; encoded[canaries:] are held out
    n = len(data)
    sigma = audit_noise_multiplier(cfg, n)
    dp = DpSgdParams(sigma, p.max_grad_norm, sample_rate(f.batch_size, n))

    run = ExperimentRun(cfg)
    try:
        run.set_tags({
            "mlflow.runName": f"{cfg.name}-audit", "dplora.audit": "true",
            "dplora.noise_seed": p.noise_seed if p.noise_seed is not None else "os-entropy",
        })
        dp_scores, ledger = train_and_score(cfg, "dp", data, encoded, dp)
        nodp_scores, _ = train_and_score(cfg, "nodp", data, encoded, None)
        assert ledger is not None
        epsilon = ledger.epsilon(delta=p.delta)
        guarantee = describe_guarantee(
            mode=p.mode, epsilon=epsilon, delta=p.delta, kind=p.accountant, fixed_seed=p.noise_seed is not None
        )
        dp_result = attack_summary(dp_scores, canaries, p.delta)
        dp_result |= {
            "noise_multiplier": sigma, "max_grad_norm": p.max_grad_norm, "sample_rate": dp.sample_rate,
            "accountant_epsilon": epsilon, "guarantee": guarantee,
            "consistent": dp_result["epsilon_lower_bound"] <= epsilon,
        }
        nodp_result = attack_summary(nodp_scores, canaries, p.delta) | {"accountant_epsilon": None}
        result: dict[str, Any] = {
            "name": cfg.name, "mlflow_run_id": run.run_id, "client": AUDITED_CLIENT,
            "client_records": len(records), "members": canaries, "held_out": canaries,
            "words_per_canary": CANARY_WORDS, "steps": f.rounds * f.local_steps, "delta": p.delta,
            "confidence": CONFIDENCE, "accountant": p.accountant,
            "max_certifiable_epsilon": max_certifiable_epsilon(canaries, canaries, delta=p.delta,
                                                               confidence=CONFIDENCE),
            "dp": dp_result, "nodp": nodp_result, "config": cfg.model_dump(mode="json"),
        }
        path = cfg.run_dir / "audit.json"
        atomic_write(path, json_bytes(result))
        run.log_metrics({
            "audit_auc_dp": dp_result["auc"], "audit_auc_nodp": nodp_result["auc"],
            "audit_epsilon_lb_dp": dp_result["epsilon_lower_bound"],
            "audit_epsilon_lb_nodp": nodp_result["epsilon_lower_bound"], "audit_accountant_epsilon": epsilon,
        }, step=0)
        run.set_tags({"dplora.guarantee": guarantee})
        run.log_artifact(path)
        run.finish()
    except BaseException:
        run.finish("FAILED")
        raise
    if not dp_result["consistent"]:
        log.warning("empirical epsilon lower bound %.3f exceeds the accountant's %.3f: investigate",
                    dp_result["epsilon_lower_bound"], epsilon)
    log.info(
        "audit: attack AUC %.3f with DP-SGD (empirical epsilon >= %.3f, accountant %.3f), %.3f without DP",
        dp_result["auc"], dp_result["epsilon_lower_bound"], epsilon, nodp_result["auc"],
    )
    return result


def format_audit(result: dict[str, Any]) -> str:
    """The audit table: attack AUC, empirical epsilon lower bound and accountant epsilon, with and without DP."""
    dp, nodp = result["dp"], result["nodp"]
    header = ("run", "attack AUC", "empirical epsilon lower bound", "accountant epsilon")
    rows = [
        header,
        ("DP-SGD", f"{dp['auc']:.3f}", f"{dp['epsilon_lower_bound']:.3f}", f"{dp['accountant_epsilon']:.3f}"),
        ("no DP", f"{nodp['auc']:.3f}", f"{nodp['epsilon_lower_bound']:.3f}", "infinity"),
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = [" | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    rule = "-" * max(len(line) for line in lines)
    verdict = (
        "consistent: the attack found no more than the accountant allows."
        if dp["consistent"]
        else "INCONSISTENT: the attack's bound exceeds the accountant's epsilon; investigate the mechanism and "
        "accountant (the bound is slightly optimistic: threshold chosen on the same canaries)."
    )
    cap = result["max_certifiable_epsilon"]
    notes = [
        f"Loss-threshold membership inference on client {result['client']}: {result['members']} planted vs "
        f"{result['held_out']} held-out canaries, {result['steps']} local steps, {result['confidence']:.0%} "
        f"Clopper-Pearson, delta {result['delta']:g}.",
        "AUC 0.5 is guessing; an AUC well above 0.5 without DP shows memorisation. The empirical epsilon is a",
        "lower bound: at or below the accountant's epsilon is consistent (a weak attack finds little), above it",
        f"calls for investigation. With this many canaries it cannot exceed {cap:.2f}.",
        f"DP-SGD run: {verdict}",
        f"Guarantee: {dp['guarantee']}",
    ]
    return "\n".join([rule, lines[0], rule, *lines[1:], rule, *notes])
