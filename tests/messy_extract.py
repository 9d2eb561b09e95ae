"""A realistic, messy hospital extract for the "bring your own data" tests (issue 13).

3,000 visits of 1,099 patients at three sites, as an extract from three hospital systems
arrives: several visits per patient, ``NA`` for missing, ``Male``/``male ``/``M`` for one sex,
site names typed three ways and once misspelt, ages of 130, negative lengths of stay, dates
written day first, names and phone numbers. Made up from a seeded generator; the values mean
nothing. ``CONTRACT_TOML`` declares the cleaning that ingests it in one run; ``STRICT_TOML``
is the same contract without any cleaning (what a steward writes first).

Written into ``docs/examples/visits.csv`` (``python tests/messy_extract.py``) for the
README's "bring your own CSV" walk-through; a test checks the shipped copy equals this one.
"""

from __future__ import annotations

import csv
import io
import sys
from pathlib import Path

import numpy as np

PATIENTS = 1099
VISITS = 3000
SITES = {
    "St Mary's": ["St Mary's", "st marys", "ST. MARY'S "],
    "Royal Infirmary": ["Royal Infirmary", "royal infirmary", "RI"],
    "Northfield": ["Northfield", "NORTHFIELD", "Northfeld"],
}
SEXES = {"F": ["F", "female", "Female", " f"], "M": ["M", "Male", "male ", "MALE"]}
FIRST = ["Ada", "Ben", "Cara", "Dev", "Eli", "Fay", "Gus", "Hana", "Ivo", "Jo", "Kai", "Lea"]
LAST = ["Smith", "Patel", "Jones", "Nowak", "Okafor", "Silva", "Brown", "Khan", "Murphy"]
#: the injected mess, by count (the tests assert these exact counts come back)
AGE_130 = 37
NEGATIVE_STAYS = 54
STRAY_SEX = 12  # "unknown": not a sex, made missing by outside = "null"
NA_HBA1C_FRACTION = 0.2

COLUMNS = [
    "patient_id",
    "name",
    "phone",
    "site",
    "visit_date",
    "age",
    "sex",
    "length_of_stay",
    "hba1c",
    "readmitted_30d",
]

CLEANING = """\
[dataset]
description = "Hospital visits, three sites (made-up example extract)"
rows_per_person = "many"
keep = "last"                       # a patient's latest visit is the one that counts
order_by = "visit_date"
na_values = ["NA"]

[columns.patient_id]
type = "string"
role = "identifier"

[columns.name]
type = "string"
role = "direct-identifier"

[columns.phone]
type = "string"
role = "direct-identifier"

[columns.site]
type = "string"
role = "site"
categories = ["St Mary's", "Royal Infirmary", "Northfield"]
normalize = "strip-lower"
aliases = { "St Mary's" = ["st marys", "st. mary's"], "Royal Infirmary" = ["RI"], Northfield = ["Northfeld"] }

[columns.visit_date]
type = "date32"
role = "feature"
date_format = "%d/%m/%Y"

[columns.age]
type = "int16"
role = "feature"
min = 0
max = 110
typical = [20, 90]
outside = "null"

[columns.sex]
type = "string"
role = "feature"
categories = ["F", "M"]
normalize = "strip-lower"
aliases = { F = ["female"], M = ["male"] }
outside = "null"

[columns.length_of_stay]
type = "float64"
role = "feature"
min = 0
max = 365
scale = "log"
typical = [1, 14]
outside = "null"

[columns.hba1c]
type = "float64"
role = "feature"
min = 3
max = 20
typical = [4.5, 10]

[columns.readmitted_30d]
type = "int8"
role = "label"
"""

_CLEANING_KEYS = ("keep", "order_by", "na_values", "normalize", "aliases", "outside", "date_format")
#: the contract a steward writes first: the same columns, no cleaning declared
STRICT_TOML = "\n".join(
    line for line in CLEANING.splitlines() if not line.startswith(_CLEANING_KEYS)
)
CONTRACT_TOML = CLEANING


def extract_rows(seed: int = 13) -> list[list[str]]:
    """The extract's data rows as text, in visit order within each site's export."""
    rng = np.random.default_rng(seed)
    site_of = rng.choice(list(SITES), PATIENTS, p=[0.4, 0.35, 0.25])
    # every patient has a visit; the rest fall on patients at random (several each)
    owner = np.concatenate([np.arange(PATIENTS), rng.integers(0, PATIENTS, VISITS - PATIENTS)])
    rng.shuffle(owner)
    birth_age = rng.integers(18, 95, PATIENTS)
    sex_of = rng.choice(["F", "M"], PATIENTS)
    day = rng.integers(0, 3 * 365, VISITS)
    rows = []
    for v in range(VISITS):
        p = int(owner[v])
        site = str(site_of[p])
        year, rest = divmod(int(day[v]), 365)
        month, dom = min(rest // 30, 11) + 1, rest % 28 + 1
        stay = float(np.round(rng.lognormal(1.2, 0.8), 1))
        hba1c = "NA" if rng.random() < NA_HBA1C_FRACTION else f"{rng.normal(6.2, 1.1):.1f}"
        rows.append(
            [
                f"P{p:05d}",
                f"{FIRST[p % len(FIRST)]} {LAST[p % len(LAST)]}",
                f"07{rng.integers(100, 999)} {rng.integers(100000, 999999)}",
                str(rng.choice(SITES[site])),
                f"{dom:02d}/{month:02d}/{2022 + year}",
                str(int(min(birth_age[p] + year, 105))),
                str(rng.choice(SEXES[str(sex_of[p])])),
                f"{stay:.1f}",
                hba1c if hba1c == "NA" else str(min(max(float(hba1c), 3.5), 15.0)),
                str(int(rng.random() < 0.18)),
            ]
        )
    # the mess a steward meets, at rows no rule predicts
    picks = rng.permutation(VISITS)
    for i in picks[:AGE_130]:
        rows[i][5] = "130"
    for i in picks[AGE_130 : AGE_130 + NEGATIVE_STAYS]:
        rows[i][7] = f"-{rng.integers(1, 5)}.0"
    for i in picks[AGE_130 + NEGATIVE_STAYS : AGE_130 + NEGATIVE_STAYS + STRAY_SEX]:
        rows[i][6] = "unknown"
    for i in picks[-25:]:
        rows[i][6] = "NA"
    return rows


def extract_csv_text(seed: int = 13) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(COLUMNS)
    writer.writerows(extract_rows(seed))
    return out.getvalue()


def write_extract(folder: Path) -> tuple[Path, Path, Path]:
    """The extract, its cleaning contract and its strict contract, written into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    csv_path = folder / "visits.csv"
    csv_path.write_text(extract_csv_text(), encoding="utf-8")
    (folder / "visits.toml").write_text(CONTRACT_TOML, encoding="utf-8")
    (folder / "visits-strict.toml").write_text(STRICT_TOML, encoding="utf-8")
    return csv_path, folder / "visits.toml", folder / "visits-strict.toml"


if __name__ == "__main__":
    write_extract(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("docs/examples"))
