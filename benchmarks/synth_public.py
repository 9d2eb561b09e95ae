"""Public clinical tables for ``bench_synth.py --tables public``: loaders and hand-written
schema contracts.

Every table ships inside a pip package (scikit-survival's ``sksurv.datasets``, lifelines'
``lifelines.datasets``), so the benchmark needs no download. Each becomes one row per person
with a made-up identifier (``person_id``, the row number), the published baseline covariates,
and a binary label: the study's event indicator (the follow-up time is left out: it is not a
baseline covariate).

The contracts are written by hand, as a steward would: types, vocabularies and plausible
domains taken from each dataset's published documentation (the R packages ``TH.data`` and
``survival``, Hosmer, Lemeshow & May's *Applied Survival Analysis* for WHAS500 and ACTG 320,
Fox's appendix for the Rossi data), NOT computed from the rows: bounds are round, plausible
limits for the quantity (a heart rate of 20 to 250 beats per minute), so most sit well outside
the rows' own range. Heavy-tailed quantities (receptor levels, lab values, counts, lengths of
stay) are declared ``scale = "log"``. Each numeric feature also declares ``typical = [low,
high]``, the range a steward or clinician expects most values in (an adult heart-attack
patient's heart rate of 50 to 130, a normal creatinine of 0.7 to 1.6 mg/dl, the trials'
published entry criteria and summaries), round figures, again not computed from the rows
(they are close to the rows' 5th and 95th percentiles, as a good reference range is); the
zone's preprocessing scales by them (``docs/schema-contract.md``). Columns the documentation lists as complete are
declared ``nullable = false`` (only flchain's creatinine has missing values). A column derived from the outcome is left out (flchain's
``chapter``, the cause of death, recorded only for those who died).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from connectors.schema import SchemaContract

IDENTIFIER = "person_id"
LABEL = "event"


@dataclass(frozen=True)
class PublicTable:
    """One public table: where it comes from, its contract's columns, and how to load it."""

    name: str
    source: str
    label_means: str
    columns: dict[str, dict[str, Any]]
    load: Callable[[], pd.DataFrame]
    #: columns for the second copy check (demographics and the like)
    quasi_identifiers: tuple[str, ...]

    def contract(self) -> SchemaContract:
        columns: dict[str, dict[str, Any]] = {
            IDENTIFIER: {"type": "string", "role": "identifier"},
            **self.columns,
            LABEL: {"type": "int8", "role": "label", "description": self.label_means},
        }
        return SchemaContract.from_dict(
            {
                "dataset": {
                    "description": f"{self.name}: {self.source}",
                    "rows_per_person": "one",
                    "counts": "public",
                },
                "columns": columns,
            }
        )

    def frame(self) -> pd.DataFrame:
        """The rows as the contract reads them: identifier, declared columns, label."""
        df = self.load().reset_index(drop=True)
        df.insert(0, IDENTIFIER, [f"p{i:05d}" for i in range(len(df))])
        return df[[IDENTIFIER, *self.columns, LABEL]]

    def arrow(self) -> pa.Table:
        """The source table for ingest: every column cast to its contract type."""
        contract = self.contract()
        df = self.frame()
        arrays = []
        for spec in contract.columns:
            values = df[spec.name]
            if spec.type == "string":
                text = values.astype(object).where(values.notna(), None)
                arrays.append(pa.array([None if v is None else str(v) for v in text], pa.string()))
            else:
                arrays.append(
                    pa.array(values.to_numpy(dtype=np.float64), pa.float64(), from_pandas=True)
                )
        return pa.Table.from_arrays(arrays, names=list(contract.names))


def _sksurv(loader: str, event: str) -> Callable[[], pd.DataFrame]:
    def load() -> pd.DataFrame:
        from sksurv import datasets

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            x, y = getattr(datasets, loader)()
        df = x.copy()
        df[LABEL] = y[event].astype(np.int8)
        return df

    return load


def _rossi() -> pd.DataFrame:
    from lifelines import datasets

    df = datasets.load_rossi()
    return df.assign(**{LABEL: df["arrest"].astype(np.int8)})


def _num(kind: str, lo: float, hi: float, *, log: bool = False, **extra: Any) -> dict[str, Any]:
    extra.setdefault("nullable", False)
    out: dict[str, Any] = {"type": kind, "role": "feature", "min": lo, "max": hi, **extra}
    if log:
        out["scale"] = "log"
    return out


def _cat(*values: str, **extra: Any) -> dict[str, Any]:
    extra.setdefault("nullable", False)
    return {"type": "string", "role": "feature", "categories": list(values), **extra}


def _flag() -> dict[str, Any]:
    return _cat("0", "1")


TABLES: dict[str, PublicTable] = {
    t.name: t
    for t in (
        PublicTable(
            name="gbsg2",
            source="German Breast Cancer Study Group 2 trial (sksurv.datasets.load_gbsg2)",
            label_means="recurrence or death during follow-up (cens)",
            columns={
                "age": _num("int16", 18, 100, typical=[35, 70]),
                "horTh": _cat("no", "yes"),
                "menostat": _cat("Pre", "Post"),
                "tsize": _num("int16", 0, 200, typical=[10, 60], description="tumour size, mm"),
                "tgrade": _cat("I", "II", "III"),
                "pnodes": _num(
                    "int16", 0, 100, log=True, typical=[1, 20], description="positive lymph nodes"
                ),
                "progrec": _num(
                    "int32", 0, 5000, log=True, typical=[0, 500], description="progesterone, fmol/l"
                ),
                "estrec": _num(
                    "int32", 0, 5000, log=True, typical=[0, 500], description="oestrogen, fmol/l"
                ),
            },
            load=_sksurv("load_gbsg2", "cens"),
            quasi_identifiers=("age", "menostat", "tgrade"),
        ),
        PublicTable(
            name="whas500",
            source="Worcester Heart Attack Study, 500 patients (sksurv.datasets.load_whas500)",
            label_means="death during follow-up (fstat)",
            columns={
                "afb": _flag(),
                "age": _num("int16", 18, 110, typical=[45, 90]),
                "av3": _flag(),
                "bmi": _num("float64", 10, 70, typical=[18, 38]),
                "chf": _flag(),
                "cvd": _flag(),
                "diasbp": _num(
                    "int16", 0, 250, typical=[50, 110], description="diastolic pressure, mmHg"
                ),
                "gender": _flag(),
                "hr": _num("int16", 20, 250, typical=[50, 130], description="heart rate, bpm"),
                "los": _num(
                    "int16", 0, 365, log=True, typical=[1, 20], description="length of stay, days"
                ),
                "miord": _flag(),
                "mitype": _flag(),
                "sho": _flag(),
                "sysbp": _num(
                    "int16", 40, 300, typical=[90, 200], description="systolic pressure, mmHg"
                ),
            },
            load=_sksurv("load_whas500", "fstat"),
            quasi_identifiers=("age", "gender"),
        ),
        PublicTable(
            name="aids",
            source="ACTG 320 trial, 1151 patients (sksurv.datasets.load_aids)",
            label_means="AIDS diagnosis or death during follow-up (censor)",
            columns={
                "age": _num("int16", 12, 90, typical=[25, 55]),
                "cd4": _num(
                    "float64",
                    0,
                    1000,
                    log=True,
                    typical=[0, 250],
                    description="CD4 count, cells/mm3",
                ),
                "hemophil": _flag(),
                "ivdrug": _cat("1", "2", "3"),
                "karnof": _cat("70", "80", "90", "100"),
                "priorzdv": _num(
                    "float64", 0, 500, log=True, typical=[5, 100], description="months of prior ZDV"
                ),
                "raceth": _cat("1", "2", "3", "4", "5", "6"),
                "sex": _cat("1", "2"),
                "strat2": _flag(),
                "tx": _flag(),
                "txgrp": _cat("1", "2", "3", "4"),
            },
            load=_sksurv("load_aids", "censor"),
            quasi_identifiers=("age", "sex", "raceth"),
        ),
        PublicTable(
            name="flchain",
            source="serum free light chains, Olmsted County (sksurv.datasets.load_flchain)",
            label_means="death during follow-up (death)",
            columns={
                "age": _num("int16", 50, 110, typical=[50, 85]),
                "sex": _cat("F", "M"),
                "sample.yr": _cat(*(str(y) for y in range(1995, 2004))),
                "kappa": _num(
                    "float64", 0, 50, log=True, typical=[0.5, 3], description="FLC kappa, mg/dl"
                ),
                "lambda": _num(
                    "float64", 0, 50, log=True, typical=[0.8, 3], description="FLC lambda, mg/dl"
                ),
                "flc.grp": _cat(*(str(g) for g in range(1, 11))),
                "creatinine": _num(
                    "float64",
                    0,
                    20,
                    log=True,
                    typical=[0.7, 1.6],
                    nullable=True,
                    description="serum, mg/dl",
                ),
                "mgus": _cat("no", "yes"),
            },
            load=_sksurv("load_flchain", "death"),
            quasi_identifiers=("age", "sex", "sample.yr"),
        ),
        PublicTable(
            name="rossi",
            source="Rossi et al. recidivism study, 432 released prisoners (lifelines.datasets)",
            label_means="re-arrest within one year (arrest)",
            columns={
                "fin": _num("int8", 0, 1, description="financial aid"),
                "age": _num("int16", 16, 70, typical=[18, 40]),
                "race": _num("int8", 0, 1),
                "wexp": _num("int8", 0, 1, description="full-time work experience"),
                "mar": _num("int8", 0, 1, description="married"),
                "paro": _num("int8", 0, 1, description="released on parole"),
                "prio": _num(
                    "int16", 0, 50, log=True, typical=[0, 10], description="prior convictions"
                ),
            },
            load=_rossi,
            quasi_identifiers=("age", "race", "mar"),
        ),
    )
}
