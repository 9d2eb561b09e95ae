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

The steward's contract is ``cohort_schema.toml`` beside this module (``cohort_contract``);
every value generated lies inside its declared domains.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from enum import StrEnum
from importlib import resources
from pathlib import Path
from types import MappingProxyType

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from connectors.schema import SchemaContract
from foundation.errors import SpecError

# --- the fixed "world": the same for every seed, so seeds vary patients, not the hospitals ---

HOSPITALS = (
    "hospital-a",
    "hospital-b",
    "hospital-c",
    "hospital-d",
    "hospital-e",
    "hospital-f",
    "hospital-g",
    "hospital-h",
)
# share of patients, mean age, readmission intercept shift (log-odds)
_HOSPITAL_SHARE = (0.31, 0.20, 0.14, 0.11, 0.09, 0.07, 0.05, 0.03)
_HOSPITAL_MEAN_AGE = (62.0, 66.0, 68.0, 70.0, 57.0, 64.0, 72.0, 61.0)
_HOSPITAL_SHIFT = (0.15, 0.0, -0.15, 0.25, -0.35, 0.35, -0.25, 0.5)

CHAPTERS = (
    "infectious",
    "neoplasm",
    "blood",
    "endocrine",
    "mental",
    "nervous",
    "circulatory",
    "respiratory",
    "digestive",
    "skin",
    "musculoskeletal",
    "genitourinary",
    "symptoms",
    "injury",
)
_CH = MappingProxyType({name: i for i, name in enumerate(CHAPTERS)})

# The 15 commonest codes, in rank order (these are the contract's declared vocabulary).
_TOP_CODES = (
    ("I50.9", "circulatory"),
    ("J44.1", "respiratory"),
    ("J18.9", "respiratory"),
    ("N39.0", "genitourinary"),
    ("A41.9", "infectious"),
    ("I21.4", "circulatory"),
    ("I48.91", "circulatory"),
    ("E11.65", "endocrine"),
    ("N17.9", "genitourinary"),
    ("K85.9", "digestive"),
    ("I63.9", "circulatory"),
    ("J96.01", "respiratory"),
    ("K92.2", "digestive"),
    ("E87.1", "endocrine"),
    ("F10.239", "mental"),
)
# The long tail, by chapter; ranked after the top codes in a fixed shuffled order.
_TAIL_CODES = MappingProxyType(
    {
        "infectious": "A41.51 A41.01 A41.02 A40.9 A04.72 A08.4 A09 B34.9 A49.9 B37.0 A41.89 A87.9 "
        "B99.9 A69.20 B02.9 A46 B95.2 A39.9 B44.9",
        "neoplasm": "C34.90 C34.11 C18.9 C50.911 C61 C25.9 C78.7 C79.51 C85.90 C92.00 C20 C16.9 "
        "C64.9 C67.9 C71.9 C56.9 C22.0 C90.00 D49.9 D37.6",
        "blood": "D64.9 D62 D50.9 D69.6 D68.9 D70.9 D61.818 D65 D57.00 D59.9",
        "endocrine": "E87.6 E86.0 E11.9 E10.10 E11.10 E87.2 E16.2 E05.90 E03.9 E66.01 E11.21 "
        "E83.42 E27.40 E87.0 E11.649 E13.10",
        "mental": "F10.20 F32.9 F20.9 F05 F03.90 F41.1 F31.9 F11.20 F19.20 F43.10 F29",
        "nervous": "G40.909 G93.41 G45.9 G20 G35 G62.9 G47.33 G30.9 G91.9 G43.909 G61.0 G82.20",
        "circulatory": "I10 I11.0 I13.0 I50.23 I50.33 I50.43 I21.09 I21.19 I25.10 I26.99 I49.9 "
        "I46.9 I61.9 I70.222 I71.4 I80.209 I95.9 I47.2 I44.2 I48.0 I35.0 I20.0 I27.20 I82.409 "
        "I74.3 I42.9 I33.0 I31.3",
        "respiratory": "J44.0 J96.00 J96.02 J15.9 J69.0 J45.901 J81.0 J84.10 J90 J93.9 J12.89 "
        "J20.9 J22 J98.11 J43.9 J80 J86.9",
        "digestive": "K57.92 K56.609 K80.20 K70.30 K72.90 K63.1 K35.80 K29.70 K25.4 K21.9 K52.9 "
        "K59.00 K65.0 K74.60 K83.1 K86.1 K92.0 K31.84",
        "skin": "L03.115 L03.116 L03.90 L89.154 L97.509 L02.91 L08.9 L27.0 L51.9 L40.9",
        "musculoskeletal": "M54.5 M86.9 M00.9 M62.82 M48.06 M17.11 M16.11 M79.7 M32.9 M06.9 "
        "M10.9 M25.561",
        "genitourinary": "N18.6 N18.4 N20.0 N13.30 N10 N40.1 N28.9 N19 N30.00 N18.30",
        "symptoms": "R07.9 R55 R06.02 R10.9 R50.9 R41.82 R53.1 R56.9 R11.2 R00.0 R09.02 R19.7 "
        "R31.9 R33.9 R40.20 R57.9 R78.81 R79.89",
        "injury": "S72.001A S72.141A S06.0X0A S32.009A S22.31XA T81.4XXA T82.898A T84.50XA "
        "T50.901A T42.4X1A T39.1X2A S42.201A S82.101A T79.A0XA T86.11 T85.79XA",
    }
)
# Chapter log-odds shifts per hospital: c is a cardiac centre, f an oncology centre,
# e an urban hospital with more injuries and mental-health admissions.
_CASE_MIX = (
    ("hospital-c", (("circulatory", 1.0),)),
    ("hospital-f", (("neoplasm", 1.4), ("blood", 0.6))),
    ("hospital-e", (("injury", 0.6), ("mental", 0.6))),
    ("hospital-g", (("respiratory", 0.4),)),
)
_ZIPF_EXPONENT = 1.05

_FIRST_NAMES = tuple(
    (
        "Olivia Amelia Isla Ava Mia Grace Freya Lily Sophia Emily Ella Evie Harper Aisha Priya "
        "Fatima Zainab Mei Chloe Ruby Noah Oliver George Arthur Leo Muhammad Harry Oscar Jack "
        "Charlie Jacob Thomas James William Henry Ali Omar Ravi Kwame Chen Diego Mateo Luca Ivan "
        "Samuel Daniel Joseph Alfie Ethan Adam Nia Kofi Yusuf Hana Sara Ines Maya Zoe Anna Eva"
    ).split()
)
_LAST_NAMES = tuple(
    (
        "Smith Jones Taylor Brown Williams Wilson Johnson Davies Patel Wright Robinson Wood "
        "Thompson Evans Walker White Roberts Green Hall Thomas Clarke Jackson Hughes Khan "
        "Ahmed Singh Begum Ali Hussain Nguyen Chen Wang Kowalski Novak Garcia Martinez Rossi "
        "Okafor Mensah Murphy Kelly Byrne Campbell Stewart Scott Morris Cooper Ward Turner Hill "
        "Moore Baker Harris Lewis Young King Lee Allen Mitchell"
    ).split()
)
_STREETS = tuple(
    (
        "High Church Station Victoria Park Mill Queen King Manor Chapel School North South "
        "London Bridge Green Albert Grange Springfield Kings Windsor Meadow Orchard Riverside"
    ).split()
)
_STREET_KINDS = ("Street", "Road", "Lane", "Avenue", "Close", "Way", "Drive", "Crescent")
_TOWNS = tuple(
    (
        "Ashford Brampton Castleton Dunmore Eastleigh Fairview Glenbrook Harwood Kingsbridge "
        "Lakeside Millbrook Northam Oakridge Pinewood Redcliffe Stoneham Thornbury Westfield"
    ).split()
)

_FIRST_DAY = np.datetime64("2019-01-01", "D")
_N_DAYS = 5 * 365
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


def _code_table() -> tuple[tuple[str, ...], np.ndarray, np.ndarray]:
    """All codes in rank order, each code's chapter index, and the Zipf probabilities."""
    codes = [c for c, _ in _TOP_CODES]
    chapters = [_CH[ch] for _, ch in _TOP_CODES]
    tail = [(code, ch) for ch, text in _TAIL_CODES.items() for code in text.split()]
    # a fixed seed: the rank order of the tail is part of the world, not of the sample
    order = np.random.default_rng(20_191_231).permutation(len(tail))
    for i in order:
        codes.append(tail[i][0])
        chapters.append(_CH[tail[i][1]])
    ranks = np.arange(1, len(codes) + 1, dtype=np.float64)
    probs = ranks**-_ZIPF_EXPONENT
    return tuple(codes), np.asarray(chapters, dtype=np.int64), probs / probs.sum()


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def _choose(rng: np.random.Generator, probs: np.ndarray) -> np.ndarray:
    """One categorical draw per row of a row-stochastic matrix (inverse CDF, vectorised)."""
    cum = np.cumsum(probs, axis=1)
    u = np.asarray(rng.random(probs.shape[0]))[:, None] * cum[:, -1:]
    return np.minimum((cum < u).sum(axis=1), probs.shape[1] - 1)


def readmission_logit(columns: dict[str, np.ndarray]) -> np.ndarray:
    """The true log-odds of ``readmitted_30d`` given the observed columns.

    ``columns`` maps column names to numpy arrays with NaN for missing values (floats) and
    ``hospital`` / ``dx_chapter`` as integer indices into HOSPITALS / CHAPTERS. Public so
    tests can measure the signal a perfect model would find.
    """
    age = columns["age"]
    shift = np.asarray(_HOSPITAL_SHIFT)[columns["hospital"]]
    chapter_effect = np.zeros(len(CHAPTERS))
    for name, effect in (
        ("neoplasm", 0.35),
        ("circulatory", 0.25),
        ("mental", 0.3),
        ("genitourinary", 0.1),
        ("injury", -0.25),
        ("symptoms", -0.4),
        ("musculoskeletal", -0.2),
    ):
        chapter_effect[_CH[name]] = effect

    def measured(name: str) -> tuple[np.ndarray, np.ndarray]:
        values = columns[name]
        known = ~np.isnan(values)
        return np.where(known, values, 0.0), known

    hgb, hgb_known = measured("hemoglobin")
    sodium, sodium_known = measured("sodium")
    creat, creat_known = measured("creatinine")
    hba1c, hba1c_known = measured("hba1c")
    copd, copd_known = measured("copd")
    bmi_known = ~np.isnan(columns["bmi"])
    logit = (
        -2.78
        + shift
        + 0.02 * (age - 65.0)
        + 0.55 * columns["chf"]
        + 0.4 * copd * copd_known
        + 0.45 * columns["ckd"]
        + 0.6 * columns["cancer"]
        + 0.2 * columns["diabetes"]
        + 0.25 * np.minimum(columns["prior_admissions"], 6)
        + 0.035 * (np.minimum(columns["length_of_stay"], 30.0) - 5.0)
        + chapter_effect[columns["dx_chapter"]]
        - 0.12 * (hgb - 13.0) * hgb_known
        + 0.05 * np.abs(sodium - 139.0) * sodium_known
        + 0.3 * np.log(np.maximum(creat, 0.2)) * creat_known
        + 0.12 * (hba1c - 7.0) * hba1c_known * columns["diabetes"]
        + 0.3 * ~bmi_known
        + 0.05 * (columns["sex"] == 1)
    )
    return logit


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
