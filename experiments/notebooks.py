"""Run the project's notebooks headless from a fresh kernel (CI, tests, or by hand):

    python -m experiments.notebooks experiments/threshold_tuning.ipynb [--set TUNING_TARGET=recall>=0.9]

Parameters reach the notebook as environment variables, which its first cell reads (a name it does
not read is refused, not ignored); relative paths are read from the directory the command runs in;
``--save-to`` also writes the executed copy with its outputs.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
KERNEL = "python3"


def require_jupyter() -> None:
    """ImportError naming the extra when the notebook runner's dependencies are missing."""
    try:
        import ipykernel  # noqa: F401
        import jupyter_client  # noqa: F401
        import nbclient  # noqa: F401
        import nbformat  # noqa: F401
    except ImportError as e:
        raise ImportError(f"running notebooks needs nbclient, nbformat, jupyter-client and ipykernel ({e}); "
                          "install them with pip install 'aligner-inspector-pipeline[experiments]'") from e


def ensure_kernel(name: str = KERNEL) -> None:
    """A fresh venv may lack the ``python3`` kernelspec: install it into this environment."""
    require_jupyter()
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    try:
        KernelSpecManager().get_kernel_spec(name)
    except NoSuchKernel:
        from ipykernel.kernelspec import install

        install(prefix=sys.prefix, kernel_name=name)


def parameter_names(path: str | Path) -> list[str]:
    """The environment variables the notebook's code reads (``os.environ.get("NAME", ...)``)."""
    require_jupyter()
    import nbformat

    nb = nbformat.read(str(path), as_version=4)
    code = "\n".join(c.source for c in nb.cells if c.cell_type == "code")
    return sorted(set(re.findall(r"os\.environ\.get\(\s*[\"']([A-Za-z_][A-Za-z0-9_]*)[\"']", code)))


def run_notebook(path: str | Path, env: dict[str, str] | None = None, cwd: str | Path | None = None,
                 save_to: str | Path | None = None, timeout: int = 600):
    """Execute ``path`` top to bottom in a new kernel whose environment has ``env`` added, in
    ``cwd`` (default: the current directory, so relative paths mean what the caller meant);
    raises ``nbclient.exceptions.CellExecutionError`` (with the cell's traceback) on failure."""
    require_jupyter()
    import nbformat
    from nbclient import NotebookClient

    ensure_kernel()
    nb = nbformat.read(str(path), as_version=4)
    saved = {k: os.environ.get(k) for k in (env or {})}
    os.environ.update({k: str(v) for k, v in (env or {}).items()})
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("MPLBACKEND", "Agg")
    try:
        NotebookClient(nb, timeout=timeout, kernel_name=KERNEL,
                       resources={"metadata": {"path": str(cwd or Path.cwd())}}).execute()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        if save_to is not None:
            Path(save_to).parent.mkdir(parents=True, exist_ok=True)
            nbformat.write(nb, str(save_to))
    return nb


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m experiments.notebooks", description=__doc__.split("\n\n")[0])
    ap.add_argument("notebook")
    ap.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                    help="environment variable for the notebook's parameters cell (repeatable)")
    ap.add_argument("--save-to", default=None, help="write the executed notebook here")
    ap.add_argument("--timeout", type=int, default=600, help="seconds per cell")
    args = ap.parse_args(argv)
    if not Path(args.notebook).is_file():
        ap.error(f"{args.notebook}: no such notebook")
    known = parameter_names(args.notebook)
    env = {}
    for item in args.set:
        if "=" not in item:
            ap.error(f"--set {item!r}: expected NAME=VALUE")
        k, v = item.split("=", 1)
        if k not in known:
            ap.error(f"--set {k}: {args.notebook} does not read it; its parameters are {', '.join(known)}")
        env[k] = v
    from nbclient.exceptions import CellExecutionError

    try:
        run_notebook(args.notebook, env, save_to=args.save_to, timeout=args.timeout)
    except CellExecutionError as e:  # one line, not the kernel's coloured traceback
        ename, evalue = getattr(e, "ename", "Error"), re.sub(r"\x1b\[[0-9;]*m", "", str(getattr(e, "evalue", e)))
        print(f"error: {args.notebook}: {ename}: {evalue}", file=sys.stderr)
        return 2
    print(f"ran {args.notebook}" + (f" -> {args.save_to}" if args.save_to else ""), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
