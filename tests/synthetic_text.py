"""Synthetic documents for the tests and benchmarks (not shipped): templates filled from a
seeded ``random.Random``, so a corpus is the same on every run. Two kinds, like the two sources
of a continued-pretraining run: "domain" (cardiology case notes) and "general" (everyday
prose), both with non-ASCII text so byte-level handling is exercised.

The benchmarks import this file from ``tests/`` too (bench/conftest.py puts it on sys.path).
"""

import random

_NAMES = ["Ana", "José", "Zoë", "Łukasz", "François", "Mei", "Ngozi", "Søren", "Priya", "Tomás",
          "Aiko", "Dmitri", "Fatima", "Oliver", "Chloé", "Kwame", "Ingrid", "Ravi", "Yusuf", "Elif"]
_SYMPTOMS = ["chest pain", "shortness of breath", "palpitations", "dizziness", "ankle swelling",
             "fatigue on exertion", "syncope", "orthopnoea", "a dry cough", "nocturnal dyspnoea"]
_FINDINGS = ["sinus rhythm", "atrial fibrillation", "ST elevation in leads II, III and aVF",
             "left bundle branch block", "T-wave inversion", "first-degree AV block",
             "left ventricular hypertrophy", "a prolonged QT interval"]
_DRUGS = [("bisoprolol", 2.5), ("apixaban", 5), ("atorvastatin", 40), ("ramipril", 5),
          ("furosemide", 40), ("aspirin", 75), ("amiodarone", 200), ("spironolactone", 25)]
_PLANS = ["Repeat echocardiogram in six weeks.", "Refer for coronary angiography.",
          "Review in the heart-failure clinic.", "Start cardiac rehabilitation.",
          "Holter monitor for 48 hours.", "Discharge with follow-up by the GP."]

_SUBJECTS = ["The old fisherman", "A small girl", "Our neighbour", "The baker", "A tired student",
             "The mayor", "My grandmother", "A street musician", "The new teacher", "Die Katze"]
_VERBS = ["walked to", "painted", "wrote a letter about", "sang a song about", "visited",
          "dreamed of", "argued about", "cleaned", "photographed", "sketched"]
_OBJECTS = ["the harbour at dawn", "a quiet garden", "the market square", "an old bridge",
            "the library steps", "a field of sunflowers", "the café on the corner",
            "the snowy mountains", "le vieux moulin", "東京の公園"]
_CODAS = ["It rained all afternoon.", "Everyone laughed.", "Nobody noticed.",
          "The bells rang twice.", "It was a good day. ☀", "Then the lights went out.",
          "The tea went cold.", "A dog barked somewhere."]


def domain_document(rng: random.Random) -> str:
    """One synthetic cardiology case note."""
    drug, dose = rng.choice(_DRUGS)
    sentences = [
        f"Patient {rng.choice(_NAMES)}, aged {rng.randint(34, 91)}, presented with "
        f"{rng.choice(_SYMPTOMS)} and {rng.choice(_SYMPTOMS)}.",
        f"Blood pressure {rng.randint(95, 185)}/{rng.randint(55, 110)} mmHg, heart rate "
        f"{rng.randint(42, 150)} bpm.",
        f"The ECG showed {rng.choice(_FINDINGS)}.",
        f"Started {drug} {dose} mg {rng.choice(['once daily', 'twice daily', 'at night'])}.",
        rng.choice(_PLANS),
    ]
    return " ".join(sentences[: rng.randint(3, len(sentences))])


def general_document(rng: random.Random) -> str:
    """One line of synthetic everyday prose."""
    parts = [f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)}."
             for _ in range(rng.randint(1, 3))]
    return " ".join(parts + [rng.choice(_CODAS)])
