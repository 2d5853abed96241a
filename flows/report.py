"""The short results table printed at the end of a run."""

from __future__ import annotations

from typing import Any


def _mib(n: float) -> str:
    return f"{n / 2**20:,.2f} MiB"


def _byte_rows(b: dict[str, Any]) -> list[tuple[str, str]]:
    if b["up"] is None:  # mode client: participation counts stay on the server
        return [
            ("bytes per adapter payload", _mib(b["adapter"])),
            ("full model (fp32)", _mib(b["full_model"])),
            ("saving per exchange", f"{b['full_model'] / max(b['adapter'], 1):,.0f}x"),
        ]
    return [
        ("bytes up / down (LoRA)", f"{_mib(b['up'])} / {_mib(b['down'])}"),
        ("full-model exchange (fp32)", f"{_mib(b['full_model_up'])} / {_mib(b['full_model_down'])}"),
        ("upload saving vs full model", f"{b['full_model_up'] / max(b['up'], 1):,.0f}x"),
        ("download saving vs full model", f"{b['full_model_down'] / max(b['down'], 1):,.0f}x"),
    ]


def format_summary(metrics: dict[str, Any], wall_seconds: float | None = None) -> str:
    test, priv, b = metrics["test"], metrics["privacy"], metrics["bytes"]
    zs, fin = test["zero_shot"], test["final"]
    eps = "infinity (no DP)" if priv["epsilon"] is None else f"{priv['epsilon']:.3f}"
    rows = [
        ("test examples", f"{fin['n']}"),
        ("zero-shot accuracy / macro-F1", f"{zs['accuracy']:.4f} / {zs['macro_f1']:.4f}"),
        ("final accuracy / macro-F1", f"{fin['accuracy']:.4f} / {fin['macro_f1']:.4f}"),
        ("majority-class accuracy", f"{test['majority_class_accuracy']:.4f}"),
        ("epsilon spent", eps),
        ("delta", f"{priv['delta']:g}" if priv["mode"] != "none" else "-"),
        ("guarantee", priv["guarantee"]),
        ("rounds x clients", f"{metrics['rounds']} x {metrics['num_clients']}"),
        *_byte_rows(b),
        ("training wall time", f"{metrics['train_seconds']:.0f} s"),
    ]
    if metrics.get("stopped_by_budget_guard"):
        rows.append(("stopped early", metrics["stopped_by_budget_guard"]))
    if wall_seconds is not None:
        rows.append(("total wall time", f"{wall_seconds:.0f} s"))
    width = max(len(k) for k, _ in rows)
    line = "-" * (width + 3 + max(len(v) for _, v in rows[:5]))
    return "\n".join([line, *(f"{k:<{width}} | {v}" for k, v in rows), line])
