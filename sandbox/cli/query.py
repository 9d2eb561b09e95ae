"""``sandbox query``: DP questions of a dataset, charged to the project's ``dp-query`` grant.

    sandbox query run count   --project P --dataset cohort --epsilon 0.1 [--by hospital]
    sandbox query run mean age --project P --dataset cohort --epsilon 0.2 --dry
    sandbox query run quantiles age -q 0.25 -q 0.5 -q 0.75 --project P --dataset cohort --epsilon 0.3
    sandbox query list --project P

``--dry`` quotes the query (its epsilon, noise scales and 95% half-widths; nothing is read or
charged). Asking a query already answered in the project returns the released answer again,
with no new charge.
"""

from __future__ import annotations

from typing import Annotated, Any

import typer

from sandbox.cli.common import (
    JsonOpt,
    TokenOpt,
    ZoneOpt,
    console,
    emit,
    figure,
    session,
    show_table,
)

app = typer.Typer(help="DP queries: counts, sums, means, histograms, quantiles (charged).")

ProjectOpt = Annotated[str, typer.Option("--project", help="the project whose grant pays")]


def _figure_rows(figures: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for f in figures:
        if f.get("rank_error") is not None:
            interval = f"rank within ±{float(f['rank_error']):.0f} rows"
        elif f.get("ci_low") is not None:
            interval = f"{_num(f['ci_low'])} .. {_num(f['ci_high'])}"
        else:
            interval = "-"
        rows.append(
            {
                "group": f.get("group") or "",
                "statistic": f.get("statistic"),
                "value": _num(f.get("value")),
                "95% interval": interval,
                "noise scale": _num(f.get("noise_scale")),
            }
        )
    return rows


def _num(v: Any) -> str:
    """A DP answer's figure: ``common.figure`` (3 significant digits; 100 and over whole)."""
    return "-" if v is None else figure(float(v))


def _show(rec: dict[str, Any]) -> None:
    q = rec["query"]
    what = q["kind"] + (f" {q['column']}" if q.get("column") else "")
    what += f" by {q['by']}" if q.get("by") else ""
    if rec.get("dry"):
        show_table(
            [
                {k: (_num(v) if isinstance(v, float) else v) for k, v in part.items()}
                for part in rec.get("parts", [])
            ],
            sorted({k for part in rec.get("parts", []) for k in part}),
            title=f"quote: {what} on {rec['dataset']}",
        )
        fits = "fits" if rec.get("fits") else "does NOT fit"
        console.print(
            f"would cost epsilon {rec['epsilon']:g} of {rec['project']}'s dp-query grant; "
            f"remaining {_num(rec.get('remaining_epsilon'))}: it {fits}. Nothing was read."
        )
        return
    show_table(
        _figure_rows(rec["figures"]),
        ["group", "statistic", "value", "95% interval", "noise scale"],
        title=f"{what} on {rec['dataset']} (epsilon {rec['epsilon']:g}, query {rec['id']})",
    )
    for note in rec.get("notes", []):
        console.print(f"note: {note}")
    if rec.get("reused"):
        console.print("the released answer again: no new charge")
    else:
        console.print(
            f"charged epsilon {rec['epsilon']:g}; remaining {_num(rec.get('remaining_epsilon'))}"
        )


@app.command("run")
def run(
    kind: Annotated[str, typer.Argument(help="count | sum | mean | histogram | quantiles")],
    column: Annotated[str | None, typer.Argument(help="the column (not for count)")] = None,
    project: ProjectOpt = ...,  # type: ignore[assignment]
    dataset: Annotated[str, typer.Option("--dataset", help="the dataset")] = ...,  # type: ignore[assignment]
    epsilon: Annotated[float, typer.Option("--epsilon", help="the query's whole epsilon")] = ...,  # type: ignore[assignment]
    by: Annotated[
        str | None, typer.Option("--by", help="group by a column with declared categories")
    ] = None,
    q: Annotated[
        list[float] | None, typer.Option("-q", "--quantile", help="a quantile level (repeat)")
    ] = None,
    bins: Annotated[
        int | None, typer.Option("--bins", help="histogram bins for a numeric column")
    ] = None,
    dry: Annotated[
        bool, typer.Option("--dry", help="quote only: read nothing, charge nothing")
    ] = False,
    zone: ZoneOpt = None,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Answer one DP query (or quote it with --dry)."""
    query: dict[str, Any] = {"dataset": dataset, "kind": kind, "epsilon": epsilon}
    if column is not None:
        query["column"] = column
    if by is not None:
        query["by"] = by
    if q:
        query["quantiles"] = list(q)
    if bins is not None:
        query["bins"] = bins
    with session(zone, token) as s:
        rec = s.service.run_query(s.user, project, query, dry=dry)
    emit(dict(rec), as_json, lambda r: _show(r))


@app.command("list")
def list_(
    project: ProjectOpt = ...,  # type: ignore[assignment]
    zone: ZoneOpt = None,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """The project's released query answers (asking one again is free)."""
    with session(zone, token) as s:
        recs = [dict(r) for r in s.service.list_queries(s.user, project)]
    emit(
        {"project": project, "queries": recs},
        as_json,
        lambda o: show_table(
            [
                {
                    "id": r["id"],
                    "dataset": r["dataset"],
                    "query": r["query"]["kind"]
                    + (f" {r['query']['column']}" if r["query"].get("column") else "")
                    + (f" by {r['query']['by']}" if r["query"].get("by") else ""),
                    "epsilon": r["epsilon"],
                    "asked_by": r["asked_by"],
                    "released_at": r["released_at"],
                }
                for r in o["queries"]
            ],
            ["id", "dataset", "query", "epsilon", "asked_by", "released_at"],
            title=f"released DP queries of {project}",
        ),
    )
