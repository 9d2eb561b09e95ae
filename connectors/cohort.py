"""A synthetic multi-hospital cohort with known structure, for tests, demos and benchmarks.

One row per patient (the index admission) at eight hospitals of very different size and case
mix. Everything is drawn with vectorised numpy from one seeded generator, so a seed gives the
same table every time and a million patients take a few seconds.

What is realistic about it, and why each part is there:

* Hospital sizes span an order of magnitude (hospital-a is ~30% of patients, hospital-h ~3%),
  with their own age mix, diagnosis mix (a cardiac centre, an oncology centre) and their own
  readmission base rate, so federated and per-site code meets non-identical sites.
* ``primary_dx`` is an ICD-10 code from a fixed list of ~200 plausible codes whose frequencies
  fall off like a Zipf law: a few codes are common, most are rare (the long tail is what makes
  vocabularies computed from data leak). The contract declares only the 15 commonest codes;
  the rest map to "other" at preprocessing. ``dx_chapter`` is the code's ICD-10 chapter.
* Labs and vitals are missing in informative ways: HbA1c is measured mostly in diabetics,
  creatinine almost always in kidney disease, BMI is missing more often in older patients.
* ``readmitted_30d`` is drawn from a known logistic model of the observed columns
  (``readmission_logit``), with real signal: the true model's AUROC is about 0.74.
* ``Canaries`` plants distinctive strings into a few rows, so tests can search every output
  (errors, logs, governed files, models, reports) for values that must never appear there.

The fixed world the patients are drawn in (hospitals, diagnosis codes, word lists for direct
identifiers, the true outcome model) is ``connectors.cohort_world``. The steward's contract is
``cohort_schema.toml`` beside this module (``cohort_contract``); every value generated lies
inside its declared domains.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from enum import StrEnum
from importlib import resources
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from connectors.cohort_world import (
    _CASE_MIX,
    _CH,
    _FIRST_DAY,
    _FIRST_NAMES,
    _HOSPITAL_MEAN_AGE,
    _HOSPITAL_SHARE,
    _LAST_NAMES,
    _N_DAYS,
    _STREET_KINDS,
    _STREETS,
    _TOWNS,
    CHAPTERS,
    HOSPITALS,
    _code_table,
    readmission_logit,
)
from connectors.schema import SchemaContract
from foundation.errors import SpecError

# Canaries go into this many rows (the subject_id canary into the first only: ids are unique).
_CANARY_ROWS = 3


class FileFormat(StrEnum):
    CSV = "csv"
    PARQUET = "parquet"


@dataclass(frozen=True)
class Canaries:
    """Distinctive strings planted into a few rows of a generated cohort.

    Tests search every output for them: none may appear in errors, logs, models or reports;
    the subject_id, name, address and phone canaries may not appear in governed files either
    (the identifier is hashed, direct identifiers are dropped). The primary_dx and ethnicity
    canaries are kept by ingest (values outside a declared vocabulary are kept) and so test
    everything downstream.
    """

    subject_id: str
    patient_name: str
    address: str
    phone: str
    primary_dx: str
    ethnicity: str

    @classmethod
    def make(cls, seed: int = 0) -> Canaries:
        def tag(field: str) -> str:
            digest = hashlib.sha256(f"safe-zone canary {seed} {field}".encode()).hexdigest()
            return f"CANARY-{digest[:16]}"

        return cls(
            subject_id=tag("subject_id"),
            patient_name=tag("patient_name"),
            address=tag("address"),
            phone=tag("phone"),
            primary_dx=tag("primary_dx"),
            ethnicity=tag("ethnicity"),
        )

    def values(self) -> tuple[str, ...]:
        return (
            self.subject_id,
            self.patient_name,
            self.address,
            self.phone,
            self.primary_dx,
            self.ethnicity,
        )

    def as_dict(self) -> dict[str, str]:
        return dict(
            zip(
                ("subject_id", "patient_name", "address", "phone", "primary_dx", "ethnicity"),
                self.values(),
                strict=True,
            )
        )


def cohort_contract() -> SchemaContract:
    """The steward's contract for the cohort, read from ``cohort_schema.toml`` (one source)."""
    text = resources.files("connectors").joinpath("cohort_schema.toml").read_text("utf-8")
    return SchemaContract.from_toml_text(text)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def _choose(rng: np.random.Generator, probs: np.ndarray) -> np.ndarray:
    """One categorical draw per row of a row-stochastic matrix (inverse CDF, vectorised)."""
    cum = np.cumsum(probs, axis=1)
    u = np.asarray(rng.random(probs.shape[0]))[:, None] * cum[:, -1:]
    return np.minimum((cum < u).sum(axis=1), probs.shape[1] - 1)


def _round(x: np.ndarray, decimals: int, lo: float, hi: float) -> np.ndarray:
    return np.clip(np.round(x, decimals), lo, hi)


def _join(*parts: pa.Array | str) -> pa.Array:
    return pc.binary_join_element_wise(*parts, "")


def _pick(rng: np.random.Generator, words: tuple[str, ...] | list[str], n: int) -> pa.Array:
    return pc.take(pa.array(list(words), pa.string()), pa.array(rng.integers(0, len(words), n)))


def _digits(values: np.ndarray, width: int) -> pa.Array:
    return pc.utf8_lpad(pc.cast(pa.array(values), pa.string()), width, "0")


def generate_cohort(
    n_patients: int = 50_000, seed: int = 0, canaries: Canaries | None = None
) -> pa.Table:
    """Draw the cohort; returns a table with ``cohort_contract().source_arrow_schema()``."""
    if isinstance(n_patients, bool) or not isinstance(n_patients, int) or n_patients < 1:
        raise SpecError("n_patients", "must be a positive integer", "pass e.g. 50_000")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise SpecError("seed", "must be a non-negative integer", "pass e.g. 0")
    n = n_patients
    rng = np.random.default_rng(seed)
    contract = cohort_contract()

    hospital = rng.choice(len(HOSPITALS), size=n, p=np.asarray(_HOSPITAL_SHARE))
    sex = rng.choice(3, size=n, p=[0.515, 0.48, 0.005])  # F, M, X
    age = np.clip(np.round(rng.normal(np.asarray(_HOSPITAL_MEAN_AGE)[hospital], 16.0)), 18, 100)

    ethnicities = contract.column("ethnicity").categories or ()
    urban = hospital == HOSPITALS.index("hospital-e")
    eth_probs = np.where(
        urban[:, None],
        np.array([[0.45, 0.2, 0.18, 0.1, 0.05, 0.02]]),
        np.array([[0.78, 0.07, 0.08, 0.03, 0.03, 0.01]]),
    )
    ethnicity = _choose(rng, eth_probs)
    ethnicity_missing = rng.random(n) < 0.05

    a = (age - 65.0) / 10.0
    diabetes = rng.random(n) < _sigmoid(-1.7 + 0.3 * a)
    chf = rng.random(n) < _sigmoid(-2.6 + 0.6 * a)
    copd = rng.random(n) < _sigmoid(-2.4 + 0.35 * a)
    copd_missing = rng.random(n) < 0.02
    ckd = rng.random(n) < _sigmoid(-2.6 + 0.5 * a + 0.9 * diabetes)
    oncology = hospital == HOSPITALS.index("hospital-f")
    cancer = rng.random(n) < _sigmoid(-2.6 + 0.25 * a + 1.3 * oncology)

    # diagnosis: a chapter from base rates x case mix x comorbidities, then a Zipf code in it
    codes, code_chapter, code_probs = _code_table()
    chapter_base = np.log(np.bincount(code_chapter, weights=code_probs, minlength=len(CHAPTERS)))
    logits = np.broadcast_to(chapter_base, (n, len(CHAPTERS))).copy()
    for h_name, shifts in _CASE_MIX:
        at = hospital == HOSPITALS.index(h_name)
        for ch, s in shifts:
            logits[at, _CH[ch]] += s
    logits[:, _CH["circulatory"]] += 1.0 * chf + 0.2 * a
    logits[:, _CH["respiratory"]] += 1.1 * copd
    logits[:, _CH["endocrine"]] += 0.7 * diabetes
    logits[:, _CH["genitourinary"]] += 0.7 * ckd
    logits[:, _CH["neoplasm"]] += 2.0 * cancer
    logits[:, _CH["blood"]] += 0.7 * cancer
    logits[:, _CH["injury"]] += 0.15 * a
    chapter = _choose(rng, np.exp(logits - logits.max(axis=1, keepdims=True)))
    code = np.empty(n, dtype=np.int64)
    for ch_index in range(len(CHAPTERS)):
        rows = np.flatnonzero(chapter == ch_index)
        members = np.flatnonzero(code_chapter == ch_index)
        cdf = np.cumsum(code_probs[members])
        pick = np.searchsorted(cdf, rng.random(rows.size) * cdf[-1], side="right")
        code[rows] = members[np.minimum(pick, members.size - 1)]

    prior = np.minimum(
        rng.poisson(np.exp(-1.1 + 0.45 * chf + 0.4 * copd + 0.4 * ckd + 0.5 * cancer + 0.1 * a)),
        30,
    )
    severity = np.isin(chapter, [_CH["neoplasm"], _CH["infectious"], _CH["circulatory"]])
    los = np.exp(rng.normal(1.2 + 0.1 * a + 0.3 * severity + 0.2 * cancer, 0.65))
    los = np.clip(np.round(los * 24.0) / 24.0, 1.0 / 24.0, 60.0)  # to the hour
    admit = _FIRST_DAY + rng.integers(0, _N_DAYS, n).astype("timedelta64[D]")
    discharge = admit + np.floor(los).astype("timedelta64[D]")

    # labs and vitals: values, then measured-or-not, informatively
    hba1c = _round(np.where(diabetes, rng.normal(7.9, 1.6, n), rng.normal(5.5, 0.45, n)), 1, 3, 18)
    hba1c_known = rng.random(n) < np.where(diabetes, 0.85, 0.2)
    creat = _round(
        np.exp(rng.normal(np.log(0.9) + 0.9 * ckd + 0.15 * chf + 0.15 * (sex == 1), 0.3)),
        2,
        0.2,
        15,
    )
    creat_known = rng.random(n) < np.where(ckd, 0.995, 0.93)
    hgb = _round(rng.normal(13.8 - 0.9 * (sex == 0) - 1.4 * ckd - 1.3 * cancer, 1.6), 1, 3, 20)
    hgb_known = rng.random(n) < 0.92
    sodium = _round(rng.normal(139.0 - 1.5 * chf, 3.6), 0, 105, 170)
    sodium_known = rng.random(n) < 0.93
    sbp = _round(rng.normal(130.0 + 3.0 * a - 8.0 * chf, 20.0), 0, 50, 260)
    hr = _round(
        rng.normal(82.0 + 6.0 * copd + 12.0 * (chapter == _CH["infectious"]), 15.0), 0, 25, 220
    )
    vitals_known = rng.random(n) < 0.97
    bmi = _round(rng.normal(28.0 + 2.5 * diabetes - 1.5 * cancer, 5.5), 1, 12, 70)
    bmi_known = rng.random(n) < _sigmoid(1.3 - 0.35 * a)

    def masked(values: np.ndarray, known: np.ndarray) -> np.ndarray:
        return np.where(known, values, np.nan)

    logit = readmission_logit(
        {
            "hospital": hospital,
            "age": age,
            "sex": sex,
            "chf": chf.astype(np.float64),
            "copd": masked(copd.astype(np.float64), ~copd_missing),
            "ckd": ckd.astype(np.float64),
            "cancer": cancer.astype(np.float64),
            "diabetes": diabetes.astype(np.float64),
            "prior_admissions": prior,
            "length_of_stay": los.astype(np.float32).astype(np.float64),
            "dx_chapter": chapter,
            "hemoglobin": masked(hgb, hgb_known),
            "sodium": masked(sodium, sodium_known),
            "creatinine": masked(creat, creat_known),
            "hba1c": masked(hba1c, hba1c_known),
            "bmi": masked(bmi, bmi_known),
        }
    )
    readmitted = rng.random(n) < _sigmoid(logit)

    # direct identifiers, assembled with Arrow string kernels (no Python loop per row)
    width = max(7, len(str(n)))
    subject_id = _join("P", _digits(np.arange(1, n + 1), width))
    patient_name = _join(_pick(rng, _FIRST_NAMES, n), " ", _pick(rng, _LAST_NAMES, n))
    # no commas in any generated value, so a CSV of the cohort can be edited line by line
    # with a plain split on "," (tests that plant a bad cell rely on it)
    address = _join(
        pc.cast(pa.array(rng.integers(1, 300, n)), pa.string()),
        " ",
        _pick(rng, _STREETS, n),
        " ",
        _pick(rng, _STREET_KINDS, n),
        " ",
        _pick(rng, _TOWNS, n),
    )
    # 555 numbers are reserved for fiction
    phone = _join(
        "+1-555-",
        _digits(rng.integers(100, 1000, n), 3),
        "-",
        _digits(rng.integers(0, 10_000, n), 4),
    )
    primary_dx = pc.take(pa.array(codes, pa.string()), pa.array(code))

    schema = contract.source_arrow_schema()
    columns: dict[str, pa.Array] = {
        "subject_id": subject_id,
        "patient_name": patient_name,
        "address": address,
        "phone": phone,
        "hospital": pc.take(pa.array(HOSPITALS, pa.string()), pa.array(hospital)),
        "age": pa.array(age, pa.float64()),
        "sex": pc.take(pa.array(["F", "M", "X"], pa.string()), pa.array(sex)),
        "ethnicity": pc.take(
            pa.array(list(ethnicities), pa.string()), pa.array(ethnicity, mask=ethnicity_missing)
        ),
        "admission_date": pa.array(admit, pa.date32()),
        "discharge_date": pa.array(discharge, pa.date32()),
        "length_of_stay": pa.array(los.astype(np.float32)),
        "primary_dx": primary_dx,
        "dx_chapter": pc.take(pa.array(CHAPTERS, pa.string()), pa.array(chapter)),
        "diabetes": pa.array(diabetes.astype(np.int8)),
        "chf": pa.array(chf.astype(np.int8)),
        "copd": pa.array(copd.astype(np.int8), pa.int8(), mask=copd_missing),
        "ckd": pa.array(ckd.astype(np.int8)),
        "cancer": pa.array(cancer, pa.bool_()),
        "hba1c": pa.array(hba1c.astype(np.float32), mask=~hba1c_known),
        "creatinine": pa.array(creat.astype(np.float32), mask=~creat_known),
        "hemoglobin": pa.array(hgb.astype(np.float32), mask=~hgb_known),
        "sodium": pa.array(sodium.astype(np.float32), mask=~sodium_known),
        "sbp": pa.array(sbp.astype(np.float32), mask=~vitals_known),
        "heart_rate": pa.array(hr.astype(np.float32), mask=~vitals_known),
        "bmi": pa.array(bmi.astype(np.float32), mask=~bmi_known),
        "prior_admissions": pa.array(prior.astype(np.int16)),
        "readmitted_30d": pa.array(readmitted.astype(np.int8)),
    }
    if canaries is not None:
        columns = _plant(columns, canaries, np.random.default_rng([seed, 0xCA7A]), n)
    return pa.Table.from_arrays([columns[f.name] for f in schema], schema=schema)


def _plant(
    columns: dict[str, pa.Array], canaries: Canaries, rng: np.random.Generator, n: int
) -> dict[str, pa.Array]:
    rows = rng.choice(n, size=min(_CANARY_ROWS, n), replace=False)
    few = np.zeros(n, dtype=bool)
    few[rows] = True
    one = np.zeros(n, dtype=bool)
    one[rows[0]] = True
    out = dict(columns)
    for name, value in canaries.as_dict().items():
        where = one if name == "subject_id" else few
        out[name] = pc.if_else(pa.array(where), pa.scalar(value, pa.string()), columns[name])
    return out


def write_cohort(
    path: str | Path,
    n_patients: int = 50_000,
    seed: int = 0,
    canaries: Canaries | None = None,
    format: FileFormat | str = FileFormat.CSV,
) -> Path:
    """Generate the cohort and write it as a source file (CSV or Parquet); returns the path."""
    try:
        kind = FileFormat(format)
    except ValueError:
        raise SpecError("format", "is not a known file format", 'use "csv" or "parquet"') from None
    path = Path(path)
    table = generate_cohort(n_patients, seed, canaries)
    if kind is FileFormat.CSV:
        pacsv.write_csv(table, path)
    else:
        pq.write_table(table, path)
    return path
