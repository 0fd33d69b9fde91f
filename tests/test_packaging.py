"""One import name, a light core, an engine that knows nothing of its plugins.

* every import of the project is ``recorun.<package>``, never a bare ``framework`` or ``data``;
* ``recorun.framework`` imports nothing else of recorun, nor dask, prometheus_client,
  tritonclient or torch (read from the sources, and seen in a fresh interpreter);
* a wheel holds ``recorun/`` and its dist-info only;
* a user's ``data.py``, ``server.py``, ``framework.py``... beside their plugin shadow nothing;
* a workflow that needs a missing extra stops before the first event with exit code 2 and the
  ``pip install`` line (packages hidden from a subprocess by an import blocker: a fault the real
  install can also produce, tried for real in ``test_core_install_in_a_fresh_venv``).
"""
from __future__ import annotations

import ast
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("framework", "modules", "producers", "sonic_clients", "server", "data", "benchmarks",
            "farm", "monitoring")
SAMPLE = REPO / "data" / "samples" / "hlt_sample.root"
ENGINE_FORBIDDEN = ("dask", "distributed", "prometheus_client", "tritonclient", "torch",
                    "onnxruntime", "pytriton", "fastjet", "matplotlib")


def python_files(*folders: str) -> list[Path]:
    return [p for folder in folders for p in (REPO / folder).rglob("*.py")]


def imported_modules(path: Path) -> list[tuple[int, str, int]]:
    """(line, module, level) of every import statement of ``path``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name, 0) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            found.append((node.lineno, node.module or "", node.level))
    return found


def test_no_bare_imports_of_the_projects_packages():
    bare = [f"{path.relative_to(REPO)}:{line}: {module}"
            for path in python_files(*PACKAGES, "recorun", "tests", "examples")
            for line, module, level in imported_modules(path)
            if level == 0 and module.split(".")[0] in PACKAGES]
    assert bare == []


def test_the_engine_imports_nothing_else_of_recorun_nor_dask_prometheus_triton_or_torch():
    offending = []
    for path in python_files("framework"):
        for line, module, level in imported_modules(path):
            where = f"{path.relative_to(REPO)}:{line}: {'.' * level}{module}"
            top = module.split(".")[0]
            if level == 0 and (top in ENGINE_FORBIDDEN or top == "recorun"):
                offending.append(where)
            if level > 1 and module:            # ``from .. import __version__`` only
                offending.append(where)
    assert offending == []


@pytest.mark.subprocess
def test_importing_the_engine_loads_no_plugin_and_no_heavy_package():
    code = textwrap.dedent(f"""
        import sys
        import recorun.framework
        from recorun import Producer, Filter, InputTag, Param, Concurrency, hookimpl
        loaded = sorted(m for m in sys.modules
                        if m.split(".")[0] in {ENGINE_FORBIDDEN!r}
                        or (m.startswith("recorun.") and not m.startswith("recorun.framework")))
        print(loaded)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd="/", check=True)
    assert out.stdout.strip() == "[]", out.stdout


@pytest.mark.subprocess
def test_the_server_side_imports_without_the_engine():
    """A GPU site imports the models with torch alone."""
    code = ("import sys, recorun.server.models, recorun.server.weights; "
            "print(sorted(m for m in sys.modules if m.startswith('recorun.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd="/", check=True)
    assert eval(out.stdout) == ["recorun.model_specs", "recorun.server", "recorun.server.models",
                                "recorun.server.weights"]


@pytest.mark.subprocess
def test_a_wheel_holds_only_recorun_and_its_dist_info(tmp_path):
    tree = tmp_path / "tree"                     # a copy: building writes build/ beside it
    shutil.copytree(REPO, tree, ignore=shutil.ignore_patterns(
        ".venv", ".git", "build", "out", "results", "*.egg-info", "__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps",
                    "--no-build-isolation", "--wheel-dir", str(tmp_path), str(tree)],
                   check=True, capture_output=True, text=True, timeout=300)
    (wheel,) = tmp_path.glob("recorun-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {name.split("/")[0] for name in names}
    assert tops == {"recorun", wheel.name.split("-py3")[0] + ".dist-info"}, tops
    for expected in ("recorun/__init__.py", "recorun/framework/scheduler.py",
                     "recorun/workflows/workflow_hlt.yaml", "recorun/data/samples/hlt_sample.root",
                     "recorun/server/trained/facile.pt",
                     "recorun/deploy/nginx/grpc_balancer.conf.template"):
        assert expected in names, expected
    assert not [n for n in names if n.startswith(("recorun/tests", "recorun/docs"))]
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)


@pytest.mark.subprocess
def test_the_workflows_and_deployment_files_import_as_packages():
    """``import recorun.workflows`` (the README's way to find them) in the editable install
    of this venv as in a wheel install."""
    code = ("import recorun.workflows as w, recorun.deploy as d, os; "
            "print(sorted(os.listdir(w.__path__[0]))); print(os.listdir(d.__path__[0]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd="/", check=True).stdout
    assert "workflow_hlt.yaml" in out and "nginx" in out


# -- a user's folder ------------------------------------------------------------------------------

USER_PLUGIN = '''
"""A physicist's own filter, named by path in the workflow."""
import numpy as np

from recorun import Concurrency, Filter, InputTag, Param


class EnergyCut(Filter):
    """Events whose rechits' summed energy passes ``minimum`` (GeV)."""

    concurrency = Concurrency.SHARED
    hits = InputTag("hcalRecHits")
    minimum = Param(float, 0.0)

    def filter(self, event):
        return float(np.sum(event.get(self.hits)["energy"])) >= self.minimum
'''


def user_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "analysis"
    folder.mkdir()
    for name in ("data", "server", "framework", "modules", "producers", "sonic_clients",
                 "benchmarks"):
        (folder / f"{name}.py").write_text(f"raise ImportError('user {name}.py imported')\n")
    (folder / "usercuts.py").write_text(USER_PLUGIN)
    (folder / "cuts.yaml").write_text(textwrap.dedent(f"""
        process: {{report_every_s: 0}}
        source: {{type: RootSource, files: ["{SAMPLE}"]}}
        modules:
          hcalRecHits: {{type: FacileProducer, digis: source:HcalDigi}}
          energyCut: {{type: "usercuts:EnergyCut", minimum: 100.0}}
        paths:
          cut: [energyCut]
    """))
    return folder


@pytest.mark.server
@pytest.mark.subprocess
def test_a_users_data_py_and_server_py_shadow_nothing(tmp_path):
    """The README's way to run a path-form plugin (PYTHONPATH=.) in a folder whose own modules
    have the names of recorun's old top-level packages: a SONIC workflow (FACILE on a local
    fallback server) runs as it does anywhere else."""
    folder = user_folder(tmp_path)
    report = tmp_path / "report.json"
    run = subprocess.run([str(Path(sys.executable).with_name("recorun")), "cuts.yaml", "-n",
                          "10", "--report-json", str(report), "-q"],
                         cwd=folder, env={**os.environ, "PYTHONPATH": "."}, capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    data = json.loads(report.read_text())
    assert data["events"]["read"] == 10 and data["events"]["failed"] == 0
    assert data["modules"]["hcalRecHits"]["details"]["client"] == "triton"
    assert data["modules"]["energyCut"]["type"] == "EnergyCut"
    assert data["paths"]["cut"]["visited"] == 10


# -- missing extras -------------------------------------------------------------------------------

BLOCKER = '''
import importlib.abc
import sys

BLOCKED = set(sys.argv[1].split(","))


class Blocker(importlib.abc.MetaPathFinder):
    """Makes the packages in BLOCKED look not installed."""

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None


sys.meta_path.insert(0, Blocker())
sys.argv = sys.argv[1:]
from {module} import main
sys.exit(main(sys.argv[1:]))
'''


def run_without(tmp_path: Path, packages: str, *args: str, module="recorun.framework.cli"):
    script = tmp_path / "without.py"
    script.write_text(BLOCKER.replace("{module}", module))
    return subprocess.run([sys.executable, str(script), packages, *args], capture_output=True,
                          text=True, timeout=300, cwd=tmp_path)


@pytest.mark.subprocess
@pytest.mark.parametrize("blocked, args, extra", [
    ("fastjet", [str(REPO / "workflows" / "workflow_hlt_nominal.yaml")], "recorun[jets]"),
    ("pytriton", [str(REPO / "workflows" / "workflow_hlt.yaml")], "recorun[server]"),
    ("torch", [str(REPO / "workflows" / "workflow_facile_inprocess.yaml")], "recorun[server]"),
    ("distributed", [str(REPO / "workflows" / "workflow_hlt_nominal.yaml"), "--executor",
                     "dask"], "recorun[farm]"),
    ("prometheus_client", [str(REPO / "workflows" / "workflow_hlt_nominal.yaml"),
                           "--metrics-port", "0"], "recorun[metrics]"),
])
def test_a_missing_extra_stops_before_the_first_event_naming_it(tmp_path, blocked, args, extra):
    run = run_without(tmp_path, blocked, *args, "-n", "2")
    assert run.returncode == 2, run.stderr
    assert f"pip install '{extra}'" in run.stderr
    assert not re.search(r"\b[1-9]\d* events read", run.stderr)      # before the first event


@pytest.mark.subprocess
def test_recorun_server_without_the_server_extra_says_so(tmp_path):
    run = run_without(tmp_path, "pytriton", "--models", "facile",
                      module="recorun.server.cli")
    assert run.returncode == 2
    assert "pip install 'recorun[server]'" in run.stderr and "nvidia-pytriton" in run.stderr


@pytest.mark.subprocess
def test_a_cpu_workflow_runs_without_any_extra(tmp_path):
    """Only the core's packages: a CPU workflow on ROOT input and output."""
    workflow = tmp_path / "cpu.yaml"
    out = tmp_path / "out.root"
    workflow.write_text(CPU_WORKFLOW.format(sample=SAMPLE, out=out))
    run = run_without(tmp_path, "torch,pytriton,onnxruntime,onnx,fastjet,distributed,dask,"
                                "prometheus_client,matplotlib", str(workflow), "-q")
    assert run.returncode == 0, run.stderr
    import uproot

    with uproot.open(out) as f:
        assert f["Events"].num_entries > 0


CPU_WORKFLOW = """
process: {{report_every_s: 0}}
source: {{type: RootSource, files: ["{sample}"]}}
modules:
  hcalRecHits: {{type: HcalSimpleReco, digis: source:HcalDigi}}
  towers: {{type: CaloTowerProducer, hits: hcalRecHits, geometry: hcal}}
  jets: {{type: TowerJetProducer, towers: towers, radius: 0.4}}
  htFilter: {{type: HTFilter, jets: jets, min_ht: 100.0}}
  output: {{type: RootOutput, products: [jets], file: "{out}", select_events: [HT]}}
paths: {{HT: [htFilter]}}
endpaths: {{out: [output]}}
"""


@pytest.mark.install
@pytest.mark.subprocess
def test_core_install_in_a_fresh_venv(tmp_path):
    """``pip install .`` with no extras in a new virtual environment: none of the heavy
    packages, a CPU workflow runs, workflows that need an extra exit 2 naming it."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    install = subprocess.run([str(python), "-m", "pip", "install", "--quiet", str(REPO)],
                             capture_output=True, text=True, timeout=900)
    assert install.returncode == 0, install.stderr[-3000:]
    listed = subprocess.run([str(python), "-m", "pip", "list", "--format", "json"],
                            capture_output=True, text=True, check=True)
    installed = {p["name"].lower() for p in json.loads(listed.stdout)}
    heavy = {"torch", "nvidia-pytriton", "onnxruntime", "onnx", "dask", "distributed",
             "matplotlib", "fastjet", "pytest", "prometheus-client"}
    assert installed & heavy == set()
    assert {"recorun", "numpy", "awkward", "uproot", "tritonclient"} <= installed

    recorun = venv / "bin" / "recorun"
    workflow, out = tmp_path / "cpu.yaml", tmp_path / "out.root"
    workflow.write_text(CPU_WORKFLOW.format(sample=SAMPLE, out=out))
    run = subprocess.run([str(recorun), str(workflow), "-q"], capture_output=True, text=True,
                         cwd=tmp_path, timeout=300)
    assert run.returncode == 0, run.stderr
    assert out.exists()
    installed_workflows = Path(subprocess.run(
        [str(python), "-c", "import recorun.workflows as w; print(w.__path__[0])"],
        capture_output=True, text=True, check=True, cwd=tmp_path).stdout.strip())
    for name, extra in (("workflow_hlt_nominal.yaml", "recorun[jets]"),
                        ("workflow_facile.yaml", "recorun[server]")):
        run = subprocess.run([str(recorun), str(installed_workflows / name), "-n", "2"],
                             capture_output=True, text=True, cwd=tmp_path, timeout=300)
        assert run.returncode == 2 and f"pip install '{extra}'" in run.stderr, run.stderr


@pytest.mark.subprocess
def test_every_missing_extra_is_named_at_once_and_check_finds_them(tmp_path):
    """workflow_hlt.yaml needs FastJet (jets, rho) and the server stack (its FACILE producer
    has no server configured: a local fallback server): one message, one pip line."""
    run = run_without(tmp_path, "fastjet,torch,pytriton",
                      str(REPO / "workflows" / "workflow_hlt.yaml"), "--check")
    assert run.returncode == 2, run.stderr
    assert "pip install 'recorun[jets,server]'" in run.stderr
    assert "module 'rho' (JetMedianRhoProducer) needs the Python package 'fastjet'" in run.stderr
    assert "module 'hcalRecHits' (FacileProducer) needs the Python package 'pytriton'" \
        in run.stderr
    assert "TrigReport" not in run.stdout
