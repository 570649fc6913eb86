"""The notebooks are part of the product: execute them headless and fail on any cell error.

They run in this interpreter through IPython's own shell (magics, the inline matplotlib
backend and rich display outputs as in a Jupyter kernel), rather than in a kernel
process of their own, which would import torch and diffusers again for each notebook;
what they change in the process (grad mode, threads, random state, the working folder,
matplotlib's backend) is put back afterwards.
"""
from __future__ import annotations

import contextlib
import os
import pathlib
from typing import Iterator

import pytest
import torch

nbformat = pytest.importorskip("nbformat")
interactiveshell = pytest.importorskip("IPython.core.interactiveshell")

NOTEBOOKS = sorted((pathlib.Path(__file__).parent.parent / "notebooks").glob("*.ipynb"))


def test_both_notebooks_exist():
    assert [p.name for p in NOTEBOOKS] == ["inspect_cut_points.ipynb", "speed_vs_quality.ipynb"]


def test_the_readme_installs_what_opening_the_notebooks_needs():
    """The extra the notebooks README tells people to install brings Jupyter and a kernel."""
    import re
    import tomllib

    root = pathlib.Path(__file__).parent.parent
    readme = (root / "notebooks" / "README.md").read_text()
    extra = re.search(r"pip install -e '\.\[(\w+)\]'", readme).group(1)
    extras = tomllib.loads((root / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    needs = {re.split(r"[<>=]", requirement)[0] for requirement in extras[extra]}
    assert {"jupyterlab", "ipykernel", "matplotlib"} <= needs and "jupyter lab notebooks/" in readme


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_stored_without_outputs(path):
    notebook = nbformat.read(path, as_version=4)
    code = [c for c in notebook.cells if c.cell_type == "code"]
    assert code and all(not c.outputs and c.execution_count is None for c in code)


@contextlib.contextmanager
def process_state_kept(folder: pathlib.Path) -> Iterator[None]:
    """Run in ``folder``, then put back what a notebook may change in the process."""
    import matplotlib

    grad, threads = torch.is_grad_enabled(), torch.get_num_threads()
    rng, cwd = torch.get_rng_state(), os.getcwd()
    backend = matplotlib.get_backend()
    os.chdir(folder)
    try:
        yield
    finally:
        os.chdir(cwd)
        torch.set_grad_enabled(grad)
        torch.set_num_threads(threads)
        torch.set_rng_state(rng)
        import matplotlib.pyplot as plt

        plt.close("all")
        plt.switch_backend(backend)


class HeadlessShell(interactiveshell.InteractiveShell):
    """IPython's shell as a kernel runs it, without a GUI event loop (the inline backend
    needs none)."""

    def enable_gui(self, gui=None):
        pass


def execute(notebook, folder: pathlib.Path) -> None:
    """Run every code cell in order in a fresh IPython namespace, keeping each cell's rich
    outputs in ``cell.outputs``; a cell that raises fails the notebook with its error."""
    from IPython.utils.capture import capture_output

    shell = HeadlessShell.instance()
    shell.reset(new_session=True)
    with process_state_kept(folder):
        for index, cell in enumerate(c for c in notebook.cells if c.cell_type == "code"):
            with capture_output(display=True) as captured:
                result = shell.run_cell(cell.source, store_history=False)
            if result.error_before_exec or result.error_in_exec:
                error = result.error_before_exec or result.error_in_exec
                raise AssertionError(f"cell {index + 1} raised {type(error).__name__}: {error}\n"
                                     f"{cell.source}\n{captured.stdout}{captured.stderr}") from error
            cell.outputs = [{"data": output.data} for output in captured.outputs]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_without_errors(path, tmp_path):
    notebook = nbformat.read(path, as_version=4)
    execute(notebook, tmp_path)
    plotting = [c for c in notebook.cells if c.cell_type == "code" and "viz.plot_" in c.source]
    assert plotting
    for cell in plotting:  # every view was drawn, not just computed
        assert any("image/png" in o.get("data", {}) for o in cell.outputs), cell.source
