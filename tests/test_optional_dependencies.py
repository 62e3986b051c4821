"""The library works on the core install: no module needs an extra to import, and what does need
one fails with an error naming it (plots are skipped with one warning instead).

A child Python blocks the extras' packages (as if not installed), imports every library module
and calls what needs them.
"""

import json
import os
import subprocess
import sys
import textwrap

# Top-level names of what the extras install (pyproject.toml [project.optional-dependencies]).
EXTRAS_PACKAGES = (
    "easy_vqa", "matplotlib", "sklearn", "skimage", "tokenizers", "safetensors", "tensorboard",
)  # fmt: skip

CHILD = textwrap.dedent(
    """
    import importlib, importlib.abc, json, logging, pathlib, pkgutil, sys

    BLOCKED = set(sys.argv[1].split(","))
    WORKDIR = pathlib.Path(sys.argv[2])


    class Uninstalled(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
            return None


    sys.meta_path.insert(0, Uninstalled())
    warnings = []
    handler = logging.Handler()
    handler.emit = lambda record: warnings.append(record.getMessage())
    handler.setLevel(logging.WARNING)
    logging.getLogger().addHandler(handler)

    import mllm_jax

    # Command modules define absl flags (some share names), so they are imported by their
    # commands' tests; every other module is imported here.
    COMMANDS = ("__main__", "prepare_cli")
    names = [
        m.name
        for m in pkgutil.walk_packages(mllm_jax.__path__, "mllm_jax.")
        if m.name.rpartition(".")[2] not in COMMANDS
    ]
    import_errors = {}
    for name in names:
        try:
            importlib.import_module(name)
        except Exception as e:
            import_errors[name] = repr(e)


    def error_of(call):
        try:
            call()
        except Exception as e:
            return [type(e).__name__, str(e)]
        return None


    from mllm_jax.data.builders import easy_vqa, easy_vqa_questions
    from mllm_jax.data.paired_datasets import load_digits_pairs
    from mllm_jax.encoders import minilm
    from mllm_jax.sweeps.aggregate import Group, MetricStats
    from mllm_jax.sweeps.plot import plot_groups
    from mllm_jax.train.plots import plot_curves

    errors = {
        "easy_vqa_split": error_of(lambda: easy_vqa_questions.load_split("train")),
        "easy_vqa_answers": error_of(lambda: easy_vqa.ANSWERS),
        "digits": error_of(lambda: load_digits_pairs("train")),
        "minilm_tokenizer": error_of(lambda: minilm.load_tokenizer(WORKDIR / "tokenizer.json")),
    }
    records = [{"step": 1, "loss": 2.0, "accuracy": 0.5}, {"step": 2, "loss": 1.0}]
    plots = [str(p) for p in plot_curves(records, WORKDIR / "plots")]
    plots += [str(p) for p in plot_curves(records, WORKDIR / "plots", prefix="again_")]
    group = Group(label="a", points=["a"], num_done=1, stats={"m": MetricStats(1.0, 0.0, 1)})
    sweep_plot = plot_groups([group], ["m"], WORKDIR / "results.png")
    print(json.dumps({
        "modules": len(names),
        "import_errors": import_errors,
        "errors": errors,
        "plots": plots,
        "sweep_plot": None if sweep_plot is None else str(sweep_plot),
        "plot_warnings": [w for w in warnings if "PNG" in w],
        "files": sorted(str(p.relative_to(WORKDIR)) for p in WORKDIR.rglob("*")),
    }))
    """
)


def test_library_without_the_extras(tmp_path):
    env = os.environ | {"JAX_PLATFORMS": "cpu"}
    result = subprocess.run(
        [sys.executable, "-c", CHILD, ",".join(EXTRAS_PACKAGES), str(tmp_path)],
        capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-5000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])

    assert report["modules"] > 50
    assert report["import_errors"] == {}
    expected_extra = {
        "easy_vqa_split": "demo",
        "easy_vqa_answers": "demo",
        "digits": "fusemix",
        "minilm_tokenizer": "fusemix",
    }
    for call, extra in expected_extra.items():
        kind, message = report["errors"][call]
        assert kind == "ModuleNotFoundError", (call, kind, message)
        assert f"pip install 'mllm_jax[{extra}]'" in message, (call, message)
    # No PNGs, no plots directory, one warning for the whole process.
    assert report["plots"] == [] and report["sweep_plot"] is None
    assert report["files"] == []
    assert len(report["plot_warnings"]) == 1, report["plot_warnings"]
    assert "mllm_jax[plots]" in report["plot_warnings"][0]
