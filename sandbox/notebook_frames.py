"""What the notebook client (``sandbox.notebook_zone.Zone``) makes of the API's records:
pandas DataFrames of DP answers, quotes, per-site results; the bar chart of a DP answer with its
95% intervals; job specs read from TOML; and the two kinds of rows a client may hold, read from
files the API returned to it (schema-only dummy rows and released DP synthetic rows, in a
temporary folder of the analyst's), never from the zone's storage.

Like ``sandbox.notebook_zone`` it stands on the thin client only (the kernel's import guard,
``sandbox.kernel.THIN_CLIENT``), plus pandas and matplotlib when a call needs them.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from foundation.errors import SpecError

QUERY_KINDS = ("count", "sum", "mean", "histogram", "quantiles")
#: the columns of a DP query's answer, in the order the service gives them
FIGURE_COLUMNS = ["group", "statistic", "value", "noise_scale", "ci_low", "ci_high", "rank_error"]
#: a query answer's record fields kept on its DataFrame's ``attrs``
ANSWER_ATTRS = (
    "id", "project", "dataset", "query", "epsilon", "delta", "charged", "reused", "dry",
    "remaining_epsilon", "notes",
)  # fmt: skip


def _frame(rows: list[dict[str, Any]], columns: list[str]) -> Any:
    import pandas as pd

    return pd.DataFrame(rows, columns=columns)


def _read_parquet(path: Path) -> Any:
    import pandas as pd

    return pd.read_parquet(path)


def _num(value: Any) -> str:
    return "-" if value is None else f"{float(value):.6g}"


def _query_dict(
    kind: str,
    column: str | None,
    by: str | None,
    quantiles: Sequence[float] | None,
    bins: int | None,
    epsilon: float,
    dataset: str,
) -> dict[str, Any]:
    """The query as the service reads it. Only what a notebook gets wrong most is checked
    here; the service checks the whole spec against the contract (``query.<field>`` errors)."""
    if kind not in QUERY_KINDS:
        raise SpecError("kind", f"{kind!r} is not a DP query kind", f"one of {QUERY_KINDS}")
    if isinstance(epsilon, bool) or not isinstance(epsilon, int | float) or epsilon <= 0:
        raise SpecError("epsilon", "must be a positive number", "e.g. epsilon=0.1")
    q: dict[str, Any] = {"dataset": dataset, "kind": kind, "epsilon": float(epsilon)}
    if column is not None:
        q["column"] = column
    if by is not None:
        q["by"] = by
    if quantiles is not None:
        q["quantiles"] = list(quantiles)
    if bins is not None:
        q["bins"] = bins
    return q


def answer_frame(rec: Mapping[str, Any]) -> Any:
    """A query record's figures, one row each; the record's fields in ``.attrs``."""
    df = _frame([dict(f) for f in rec.get("figures") or []], FIGURE_COLUMNS)
    df.attrs.update({k: rec.get(k) for k in ANSWER_ATTRS})
    return df


def quote_frame(rec: Mapping[str, Any]) -> Any:
    """A dry quote: one row per part of the query (its epsilon, noise scale, half-width)."""
    import pandas as pd

    df = pd.DataFrame([dict(p) for p in rec.get("parts") or []])
    df.attrs.update({k: rec.get(k) for k in ANSWER_ATTRS})
    df.attrs["fits"] = rec.get("fits")
    return df


def site_frame(result: Mapping[str, Any], card: Mapping[str, Any]) -> Any:
    """One row per hospital of a federated job: its charged epsilon (the ledger's, from the
    job's record), its training figures and its DP metrics with their 95% intervals."""
    per_site = (card.get("privacy") or {}).get("per_site") or {}
    metrics = card.get("per_site_dp_metrics") or {}
    charged = result.get("sites") or {}
    rows = []
    for site in sorted(set(per_site) | set(charged)):
        info, m = per_site.get(site) or {}, metrics.get(site) or {}
        row: dict[str, Any] = {
            "site": site,
            "epsilon": (charged.get(site) or {}).get("epsilon", info.get("epsilon")),
            "delta": info.get("delta", result.get("delta")),
            "status": info.get("status"),
            "rounds": info.get("rounds"),
            "steps": info.get("steps"),
        }
        ci = m.get("ci95") or {}
        for name in ("auroc", "accuracy", "ece"):
            low, high = (list(ci.get(name) or []) + [None, None])[:2]
            row.update({name: m.get(name), f"{name}_low": low, f"{name}_high": high})
        row["unreliable"] = m.get("unreliable")
        rows.append(row)
    cols = ["site", "epsilon", "delta", "status", "rounds", "steps"]
    for name in ("auroc", "accuracy", "ece"):
        cols += [name, f"{name}_low", f"{name}_high"]
    return _frame(rows, [*cols, "unreliable"])


def _spec_dict(spec: str | Path | Mapping[str, Any]) -> dict[str, Any]:
    if isinstance(spec, Mapping):
        return dict(spec)
    path = Path(spec)
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except OSError:
        raise SpecError("job.toml", f"cannot read {path}", "check the path") from None
    except UnicodeDecodeError as exc:
        raise SpecError(
            "job.toml", f"{path} is not UTF-8 (byte {exc.start})", "save it as UTF-8"
        ) from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise SpecError("job.toml", f"{path} is not valid TOML ({exc})", "fix the syntax") from None


def _progress_line(rec: Mapping[str, Any]) -> str:
    p = rec.get("progress") or {}
    line = f"{rec['id']}: {rec['state']}"
    if "rounds" in p or "round" in p:
        line += f", round {p.get('round', 0)}/{p.get('rounds', '?')}"
    elif "epochs" in p or "epoch" in p:
        line += f", epoch {p.get('epoch', 0)}/{p.get('epochs', '?')}"
    if rec["state"] == "queued" and p.get("waiting"):
        line += f" ({p['waiting']})"
    r = rec.get("result") or {}
    if rec.get("dry_run"):
        # a dry run spends nothing; its plan's epsilon is no charge
        line += "; dry run, nothing charged"
    elif rec["state"] == "succeeded" and r.get("epsilon") is not None:
        line += f"; epsilon {_num(r['epsilon'])} charged"
    if rec.get("error"):
        line += f"; {rec['error']}"
    return line


# -- plots ---------------------------------------------------------------------------------


def plot_answer(answer: Any, ax: Any = None, title: str | None = None) -> Any:
    """Bars of a DP answer (a ``Zone.query`` frame, or its record) with 95% error bars."""
    if isinstance(answer, Mapping):
        answer = answer_frame(answer)
    if answer.attrs.get("dry") or len(answer) == 0:
        raise SpecError(
            "answer",
            "has no figures to plot (a dry quote, or an empty answer)",
            "plot what zone.query(...) returned without dry=True",
        )
    import matplotlib.pyplot as plt
    import numpy as np

    answer = _main_figures(answer)
    labels = _labels(answer)
    values = answer["value"].astype(float).to_numpy()
    # a quantile has no interval (its rank_error is in rows, not in the column's units)
    low = (values - answer["ci_low"].astype(float).to_numpy()).clip(min=0)
    high = (answer["ci_high"].astype(float).to_numpy() - values).clip(min=0)
    yerr = [np.nan_to_num(low), np.nan_to_num(high)]
    if ax is None:
        _, ax = plt.subplots(figsize=(max(4.0, 0.6 * len(labels) + 2), 3.5))
    ax.bar(range(len(labels)), values, yerr=yerr, capsize=3)
    ax.set_xticks(range(len(labels)), labels, rotation=45 if len(labels) > 4 else 0, ha="right")
    q = answer.attrs.get("query") or {}
    kind = q.get("kind")
    ax.set_ylabel("rows" if kind in ("count", "histogram") else f"{kind} of {q.get('column')}")
    ax.set_title(title or _title(answer.attrs))
    ax.figure.tight_layout()
    return ax


def _main_figures(df: Any) -> Any:
    """The figures a chart of this kind shows: a mean's (or a sum's) answer also releases
    its noisy counts, which belong on another scale."""
    kind = (df.attrs.get("query") or {}).get("kind")
    if kind in ("count", "sum", "mean"):
        main = df[df["statistic"] == kind]
        if len(main):
            out = main.reset_index(drop=True)
            out.attrs.update(df.attrs)
            return out
    return df


def _labels(df: Any) -> list[str]:
    """Each figure's label: its group and its statistic, leaving out what all share."""
    parts = [c for c in ("group", "statistic") if df[c].astype(str).nunique() > 1]
    parts = parts or ["group" if df["group"].notna().any() else "statistic"]
    return [" / ".join(_text(row[c]) for c in parts) for _, row in df.iterrows()]


def _text(value: Any) -> str:
    if isinstance(value, Mapping):
        return ", ".join(f"{v}" for v in value.values())
    if isinstance(value, list | tuple):
        return ", ".join(str(v) for v in value)
    return "-" if value is None else str(value)


def _title(attrs: Mapping[str, Any]) -> str:
    q = attrs.get("query") or {}
    what = str(q.get("kind", "answer"))
    if q.get("column"):
        what += f" of {q['column']}"
    if q.get("by"):
        what += f" by {q['by']}"
    eps = attrs.get("epsilon")
    tail = f"ε = {float(eps):.3g}" if eps is not None else "ε unknown"
    if attrs.get("reused"):
        tail += ", released before"
    return f"{what} ({tail}; bars: 95% intervals)"
