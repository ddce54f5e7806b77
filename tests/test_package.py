"""Packaging facts: import without the extension, the kernels' install name, import direction,
and a build that cannot pull a CUDA torch."""

import ast
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_python(code: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True,
                          timeout=120)


def test_import_works_without_extension_and_says_how_to_build(tmp_path):
    # Block cptfast._C as if it had never been built.
    code = """
import sys, importlib.abc
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "cptfast._C":
            raise ImportError("blocked for the test")
sys.meta_path.insert(0, Block())
import cptfast, cptfast.data
from cptfast.data.formats import token_dtype_for_vocab
assert str(token_dtype_for_vocab(1000)) == "uint16"
try:
    cptfast.data.open_shard("x.bin", format="llmc")
except cptfast.errors.ExtensionNotBuiltError as error:
    print("ERROR:", error)
"""
    result = run_python(code, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "ERROR: cptfast's C++ extension (cptfast._C) is not built" in result.stdout
    assert "pip install --no-build-isolation" in result.stdout


def test_kernels_install_as_cptfast_kernels_only():
    assert run_python("import cptfast.kernels.cross_entropy").returncode == 0
    # From the source root the folder is on sys.path: the kernels refuse to load bare.
    bare = run_python("import kernels.cross_entropy")
    assert bare.returncode != 0 and "must be imported as `cptfast.kernels`" in bare.stderr


def test_transformers_imports_from_the_source_root():
    # transformers probes for the Hugging Face `kernels` package; our folder must not pass
    # for it (nor break the probe).
    result = run_python("import transformers.models.llama.modeling_llama as m; "
                        "from transformers.utils import is_kernels_available; "
                        "print(is_kernels_available())")
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().endswith("False")


def test_import_is_cheap():
    # The CLI and the tokenizer workers import cptfast; torch must not come with it.
    result = run_python("import sys, cptfast, cptfast.cli; print('torch' in sys.modules)")
    assert result.stdout.strip() == "False", result.stderr


# The import direction: a module may import only layers below its own (or its own package).
LAYER = {"cli": 5, "benchmark": 4, "doctor": 3, "training": 4, "hf": 3, "data": 3,
         "ops": 2, "aot": 2, "perf_model": 1, "reference": 1, "_ext": 1, "_C": 0, "errors": 0,
         "kernels": 0}


def test_every_module_has_a_layer_and_every_layer_a_module():
    # The table is the whole package: a new module needs a layer, a removed one takes its own.
    package = ROOT / "cptfast"
    modules = {p.name.split(".")[0] for p in package.iterdir()
               if (p.suffix in (".py", ".so") or (p / "__init__.py").is_file())
               and p.name.split(".")[0] not in ("__init__", "__main__")}
    modules.add("kernels")  # kernels/ installs as cptfast.kernels
    assert modules == set(LAYER)


def cptfast_imports(path: Path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module
            yield from (f"{node.module}.{alias.name}" for alias in node.names)


def layer_of(module: str) -> int | None:
    parts = module.split(".")
    return LAYER.get(parts[1]) if parts[0] == "cptfast" and len(parts) > 1 else None


@pytest.mark.parametrize("path", sorted((ROOT / "cptfast").rglob("*.py"))
                         + sorted((ROOT / "kernels").rglob("*.py")),
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_point_down(path):
    relative = path.relative_to(ROOT).with_suffix("")
    if relative.parts[0] == "kernels":
        offending = [m for m in cptfast_imports(path) if m.split(".")[0] == "cptfast"]
        assert not offending, f"kernels/ must not import cptfast: {offending}"
        return
    if len(relative.parts) < 2 or relative.parts[1] in ("__init__", "__main__"):
        return  # the package root re-exports and the entry point calls the CLI
    own = LAYER[relative.parts[1]]
    for module in cptfast_imports(path):
        layer = layer_of(module)
        if layer is not None and module.split(".")[1] != relative.parts[1]:
            assert layer < own, f"{relative} (layer {own}) imports {module} (layer {layer})"


def test_build_requirements_cannot_pull_a_cuda_torch():
    # A `torch` build requirement would make pip download a CUDA build into the isolated
    # build environment; the extension is built against the installed torch instead.
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert not any(req.startswith("torch") for req in pyproject["build-system"]["requires"])
    assert pyproject["project"]["requires-python"] == ">=3.11"
    deps = " ".join(pyproject["project"]["dependencies"])
    for name in ("torch", "triton>=3.8", "transformers", "safetensors", "tokenizers", "numpy",
                 "tqdm"):
        assert name in deps


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    assert "<!-- test-command -->" in readme and "test-command" in ci


def test_data_demo_runs_offline(tmp_path, capsys):
    # `cptfast data-demo` is the demo's data half: its corpora, tokenizer and shard directories.
    import json

    from cptfast.cli import main
    assert main(["data-demo", "--output", str(tmp_path / "demo"), "--workers", "1"]) == 0
    out = capsys.readouterr().out
    assert "verified 4 shard directories" in out and "<|eos|>" in out
    for name in ("general", "domain", "general_eval", "domain_eval"):
        documents = len((tmp_path / "demo" / "corpus" / f"{name}.jsonl").read_text().splitlines())
        manifest = json.loads((tmp_path / "demo" / "shards" / name / "manifest.json").read_text())
        assert f"2. shards {name}: {documents:,} documents" in out
        assert sum(f["documents"] for f in manifest["files"]) == documents


def test_the_demo_is_train_without_arguments():
    # One demo, one code path: no `demo` subcommand beside `cptfast train`.
    from cptfast.cli import build_parser
    with pytest.raises(SystemExit):
        build_parser().parse_args(["demo"])
    args = build_parser().parse_args(["train"])
    assert args.config is None and args.demo_output == "cptfast-demo"


# Inside the trainer the same rule: the loop sits on its parts, which sit on the config.
TRAINING_LAYER = {"schedule": 0, "callbacks": 0, "distributed": 0, "checkpoint": 0, "vocab": 0,
                  "expansion": 0,
                  "config": 1, "recipes": 2, "evaluation": 2, "metrics": 2, "parts": 2,
                  "stream": 3, "loop": 4, "merge": 5, "demo": 5}


@pytest.mark.parametrize("path", sorted((ROOT / "cptfast" / "training").glob("*.py")),
                         ids=lambda p: p.name)
def test_trainer_modules_import_down(path):
    if path.stem == "__init__":
        return
    own = TRAINING_LAYER[path.stem]  # a new module gets a place here
    for module in cptfast_imports(path):
        parts = module.split(".")
        if parts[:2] == ["cptfast", "training"] and len(parts) > 2 and parts[2] in TRAINING_LAYER:
            layer = TRAINING_LAYER[parts[2]]
            assert layer < own, f"training/{path.name} (layer {own}) imports {module} " \
                                f"(layer {layer})"
