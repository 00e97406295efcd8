"""What ``pip install mini-vllm`` puts into an environment: one import name, ``mini_vllm``, holding
every source file of the design's top-level folders, and the ``mini-vllm`` command."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(300)
REPO = Path(__file__).resolve().parent.parent
# source folder -> where it lands in the installed package (pyproject.toml's package-dir)
LAYOUT = {
    "mini_vllm": "mini_vllm",
    "engine": "mini_vllm/engine",
    "actors": "mini_vllm/actors",
    "transport": "mini_vllm/transport",
    "bench": "mini_vllm/bench",
}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> zipfile.ZipFile:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--wheel-dir", str(out), str(REPO)],
        check=True,
        capture_output=True,
    )
    (path,) = out.glob("mini_vllm-*.whl")
    return zipfile.ZipFile(path)


def test_the_wheel_holds_one_import_name_and_every_source_file(wheel: zipfile.ZipFile) -> None:
    names = set(wheel.namelist())
    dist_info = {n for n in names if n.split("/")[0].endswith(".dist-info")}
    assert {n.split("/")[0] for n in names - dist_info} == {"mini_vllm"}
    top_level = next(n for n in dist_info if n.endswith("top_level.txt"))
    assert wheel.read(top_level).decode().split() == ["mini_vllm"]
    expected = {f"{target}/{py.name}" for folder, target in LAYOUT.items() for py in (REPO / folder).glob("*.py")}
    assert expected - names == set()
    entry_points = wheel.read(next(n for n in dist_info if n.endswith("entry_points.txt"))).decode()
    assert "mini-vllm = mini_vllm.cli:main" in entry_points


def test_outside_the_checkout_only_mini_vllm_imports(tmp_path: Path) -> None:
    probe = (
        "import importlib.util\n"
        "import mini_vllm\n"
        "from mini_vllm import LLM, Client, EngineArgs, SamplingParams, connect, open_service\n"
        "for name in mini_vllm.__all__:\n"
        "    getattr(mini_vllm, name)\n"
        "print(sorted(n for n in ('engine', 'actors', 'transport', 'bench') if importlib.util.find_spec(n)))\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_an_unknown_name_is_an_attribute_error() -> None:
    import mini_vllm

    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        _ = mini_vllm.Nope  # type: ignore[attr-defined]


def test_version_matches_the_distribution(capsys: pytest.CaptureFixture[str]) -> None:
    from importlib.metadata import version

    from mini_vllm import cli

    with pytest.raises(SystemExit) as stop:
        cli.main(["--version"])
    assert stop.value.code == 0
    assert capsys.readouterr().out.strip() == f"mini-vllm {version('mini-vllm')}"
