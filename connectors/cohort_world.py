"""The synthetic cohort's fixed world: hospitals, diagnoses, names and the outcome model.

Everything here is the same for every seed, so a seed varies the patients, not the hospitals
(``connectors.cohort`` draws the patients):

* the eight hospitals (``HOSPITALS``) with their share of patients, mean age and readmission
  intercept shift, and the case mix of the specialist centres;
* the ICD-10 chapters (``CHAPTERS``) and ~200 plausible codes: the 15 commonest in rank order
  (the contract's declared vocabulary), then a long tail; ``_code_table`` ranks them and gives
  their Zipf probabilities;
* the word lists that direct identifiers (names, addresses) are assembled from, and the
  admission period;
* ``readmission_logit``: the true log-odds of ``readmitted_30d`` given the observed columns.
"""

from __future__ import annotations

from types import MappingProxyType

import numpy as np

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
