"""Packaging: a missing extra is one line, `streamssl.__version__`, and pyproject's ranges against the code and pins.

The installed-wheel side (a clean venv, the ranges resolved by pip, a run and an encoder load) is .ci/wheel-smoke.
"""

from __future__ import annotations

import ast
import importlib.metadata
import json
import re
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

import streamssl
from streamssl.pipeline.config import ConfigError
from streamssl.pipeline.extras import require

ROOT = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]

# Stands in for packages that are not installed: the test venv has every extra, and uninstalling one from a
# shared venv is not an option. The finder answers an import of a blocked package exactly as Python answers an
# import of an absent one (ModuleNotFoundError naming it); .ci/wheel-smoke checks the real absence in a clean venv.
WITHOUT = textwrap.dedent("""
    import json, sys

    class Uninstalled:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
            return None

    BLOCKED = set(sys.argv[1].split(","))
    sys.meta_path.insert(0, Uninstalled())
    from streamssl.pipeline.cli import main
    for argv in json.loads(sys.argv[2]):
        code = main(argv)
        print(f"--- exit {code}", file=sys.stderr, flush=True)
""")


def test_a_missing_extra_is_one_line_naming_it(tmp_path: Path) -> None:
    # One process for every case: the CLI's imports (torch) dominate, at ~15 s on a loaded 2-core machine.
    cases = [
        (["run", "--data", "kafka://127.0.0.1:9/images", "--run-dir", str(tmp_path / "k"), "--metrics-port", "0"],
         "streamssl: error: kafka:// needs 'pip install streamssl[kafka]'"),
        (["produce", "--to", "kafka://127.0.0.1:9/images"],
         "streamssl: error: kafka:// needs 'pip install streamssl[kafka]'"),
        (["run", "--workers", "2", "--run-dir", str(tmp_path / "r"), "--metrics-port", "0"],
         "streamssl: error: --workers / --ray-address needs 'pip install streamssl[ray]'"),
        (["run", "--method", "forecast", "--run-dir", str(tmp_path / "s"), "--metrics-port", "0"],
         "streamssl: error: a series run needs 'pip install streamssl[series]'"),
        (["forecast", "--series", "electricity"],
         "streamssl: error: streamssl forecast needs 'pip install streamssl[series]'"),
        (["run", "--data", "s3://bucket/lake/", "--run-dir", str(tmp_path / "o"), "--metrics-port", "0"],
         "streamssl: error: s3:// needs 'pip install streamssl[s3]'"),
        (["run", "--run-dir", str(tmp_path / "t"), "--metrics-port", "0", "--set", "log.tensorboard=true"],
         "streamssl: error: log.tensorboard needs 'pip install streamssl[tensorboard]'"),
    ]
    done = subprocess.run([sys.executable, "-c", WITHOUT, "kafka,ray,pyarrow,s3fs,tensorboard",
                           json.dumps([argv for argv, _ in cases])],
                          capture_output=True, text=True, timeout=180, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    outputs = re.split(r"^--- exit (\d+)\n", done.stderr, flags=re.MULTILINE)
    for (argv, line), stderr, code in zip(cases, outputs[0::2], outputs[1::2], strict=False):
        assert (stderr, code) == (line + "\n", "2"), argv
    assert len(outputs) == 2 * len(cases) + 1 and outputs[-1] == ""
    for refused in ("k", "s", "t"):  # refused before the run dir is made
        assert not (tmp_path / refused).exists()


def test_require_names_the_extra_for_a_module_that_is_not_installed() -> None:
    with pytest.raises(ConfigError) as error:
        require("streamssl_no_such_package", "kafka", "kafka://")
    assert str(error.value) == "kafka:// needs 'pip install streamssl[kafka]'"
    with pytest.raises(ConfigError, match=r"\(no module named json.streamssl_no_such_package\)$"):
        require("json.streamssl_no_such_package", "kafka", "kafka://")  # a part of the package missing is named
    assert require("json", "kafka", "kafka://") is sys.modules["json"]


def test_the_version_is_the_installed_distributions() -> None:
    assert streamssl.__version__ == importlib.metadata.version("streamssl") == PROJECT["version"]
    assert re.fullmatch(r"\d+\.\d+\.\d+", streamssl.__version__)


def _requirements(extra: str | None = None) -> list[Requirement]:
    """The dependencies of the base install or of one extra, extras that name other extras expanded."""
    listed = PROJECT["dependencies"] if extra is None else PROJECT["optional-dependencies"][extra]
    found = []
    for requirement in map(Requirement, listed):
        if requirement.name == "streamssl":
            found += [inner for name in sorted(requirement.extras) for inner in _requirements(name)]
        else:
            found.append(requirement)
    return found


def test_all_is_every_feature_extra_and_test_has_all() -> None:
    features = {"kafka", "ray", "series", "onnx", "report", "s3", "tensorboard"}
    assert set(PROJECT["optional-dependencies"]) == features | {"all", "bench", "test"}
    assert {str(r) for r in _requirements("all")} == {str(r) for name in features for r in _requirements(name)}
    assert {str(r) for r in _requirements("all")} <= {str(r) for r in _requirements("test")}
    assert "default" in Requirement(PROJECT["optional-dependencies"]["ray"][0]).extras  # the Jobs API KubeRay needs


def test_the_pins_make_installs_lie_in_the_ranges() -> None:
    """requirements.txt (what CI tests) and requirements-bench.txt must be installs that pyproject's ranges allow."""
    pins = {}
    lines = [line for name in ("requirements.txt", "requirements-bench.txt") for line in (ROOT / name).read_text().split("\n")]
    for line in lines:
        if line.strip() and not line.startswith("#"):
            pin = Requirement(line)
            pins[canonicalize_name(pin.name)] = next(iter(pin.specifier)).version
    ranges = [r for name in [None, *PROJECT["optional-dependencies"]] for r in _requirements(name)]
    for requirement in ranges:
        pinned = pins.get(canonicalize_name(requirement.name))
        if pinned is not None:
            assert requirement.specifier.contains(pinned), f"{requirement} excludes the pin {pinned}"
    unpinned = {r.name for r in ranges if canonicalize_name(r.name) not in pins}
    assert unpinned == {"braceexpand"}  # webdataset's own dependency, imported by our code too


def _third_party_imports() -> set[str]:
    names = set()
    for package in ("pipeline", "streams", "models", "monitoring"):
        for path in (ROOT / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import):
                    names.update(alias.name.split(".")[0] for alias in node.names)
                elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                    names.add(node.module.split(".")[0])
    return names - set(sys.stdlib_module_names) - {"streamssl", "__future__"}


def test_every_package_the_code_imports_is_a_dependency_or_in_an_extra() -> None:
    declared = {canonicalize_name(r.name) for name in [None, *PROJECT["optional-dependencies"]] for r in _requirements(name)}
    distributions = importlib.metadata.packages_distributions()
    imported = _third_party_imports()
    assert {"torch", "kafka", "ray", "pyarrow", "PyEMD"} <= imported  # the scan sees lazy imports too
    missing = {name for name in imported if not {canonicalize_name(d) for d in distributions.get(name, [])} & declared}
    assert not missing, f"imported but neither a dependency nor in an extra: {sorted(missing)}"
