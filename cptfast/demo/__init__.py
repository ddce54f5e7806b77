"""The built-in offline demo: a small synthetic corpus and a tokenizer trained on it.

Nothing is downloaded. The corpus has two sources, like a continued-pretraining run: a
"domain" source (cardiology case notes, JSON lines) and a "general" source (everyday prose,
one document per line), both generated from templates with a fixed seed, with some non-ASCII
text so byte-level handling is exercised.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

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


def write_sample_corpus(directory: str | Path, *, domain_documents: int = 400,
                        general_documents: int = 400, seed: int = 0) -> list[Path]:
    """Write ``domain.jsonl`` and ``general.txt`` (one document per line); return their paths."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    domain = directory / "domain.jsonl"
    with open(domain, "w", encoding="utf-8") as f:
        for i in range(domain_documents):
            f.write(json.dumps({"id": i, "text": domain_document(rng)}, ensure_ascii=False) + "\n")
    general = directory / "general.txt"
    with open(general, "w", encoding="utf-8") as f:
        for _ in range(general_documents):
            f.write(general_document(rng) + "\n")
    return [domain, general]


def build_tokenizer(directory: str | Path, texts: list[str], *, vocab_size: int = 512,
                    add_bos: bool = True) -> Path:
    """Train a byte-level BPE tokenizer on ``texts`` and save it for ``AutoTokenizer``.

    Special tokens: ``<|bos|>`` (prepended when ``add_bos``, the Llama convention),
    ``<|eos|>`` and ``<|pad|>``. Byte-level, so every Unicode string round-trips.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|bos|>", "<|eos|>", "<|pad|>"]
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    core.train_from_iterator(texts, trainer=trainer)
    if add_bos:
        bos = core.token_to_id("<|bos|>")
        core.post_processor = processors.TemplateProcessing(
            single="<|bos|> $A", pair="<|bos|> $A <|bos|> $B", special_tokens=[("<|bos|>", bos)])
    wrapped = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<|bos|>",
                                      eos_token="<|eos|>", pad_token="<|pad|>")
    directory = Path(directory)
    wrapped.save_pretrained(str(directory))
    return directory


_SKIPPED_STDLIB_PARTS = {"test", "tests", "idlelib", "site-packages", "dist-packages", "lib2to3",
                         "turtledemo", "ensurepip", "__pycache__", "venv"}


def stdlib_corpora(max_chars: int = 1_500_000) -> tuple[list[str], list[str]]:
    """Real text already on every machine with Python: (general, domain) documents from the
    standard library's source. General: the docstrings of modules, classes and functions
    (English prose). Domain: the source code of top-level functions and classes. Files are
    read in sorted order, so the corpora are the same on every run of one Python version;
    each corpus stops after ``max_chars`` characters."""
    import ast
    import sysconfig

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    general: list[str] = []
    domain: list[str] = []
    sizes = [0, 0]
    for path in sorted(stdlib.rglob("*.py")):
        if _SKIPPED_STDLIB_PARTS & set(path.relative_to(stdlib).parts):
            continue
        try:
            source = path.read_text(encoding="utf-8")
            tree = ast.parse(source)
        except (UnicodeDecodeError, SyntaxError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                text = ast.get_docstring(node)
                if text and len(text) >= 200 and sizes[0] < max_chars:
                    general.append(text[:4000])
                    sizes[0] += len(general[-1])
        for node in tree.body:
            if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                code = ast.get_source_segment(source, node)
                if code and len(code) >= 200 and sizes[1] < max_chars:
                    domain.append(code[:4000])
                    sizes[1] += len(domain[-1])
        if min(sizes) >= max_chars:
            break
    return general, domain
