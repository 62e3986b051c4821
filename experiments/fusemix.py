"""FuseMix on real frozen encoders: does latent mixup make alignment more data-efficient?

Frozen MobileNetV2 (ImageNet, 1280-d pooled) and all-MiniLM-L6-v2 (384-d) encode the pairs of
scikit-learn's digits and easy-VQA once (latent caches under <workdir>/cache). Adapters are
trained on a budget of the union of both train splits (1%, 10%, 100% of 4800 pairs), with and
without FuseMix, 3 seeds each, the same number of steps in every run; each run is evaluated on
both held-out test splits: text->image and image->text Recall@1/5/10 (several images share a
caption: any of them counts, see mllm_jax/train/retrieval.py) and zero-shot accuracy from
prompts of a template not used in training.

  nice -n 19 .venv/bin/python experiments/fusemix.py

writes <workdir>/results.json (every run and the mean ± std table), <workdir>/fusemix.png and
experiments/results/fusemix.md. Each run trains with the shared trainer in its own directory
<runs_dir>/<budget>_<method>_<seed> (checkpoints, metrics.jsonl, TensorBoard, plots); with
--runs_dir set they are kept and an interrupted run resumes there, otherwise they go to a
temporary directory deleted at the end. Adapters are smaller than the paper's (SPEC §6: e 512, n 4,
r 4) so that 18 runs fit a 2-core CPU; the flags set them.
"""

from __future__ import annotations

import json
import pathlib
import sys
import tempfile
import time

import jax
import matplotlib
import numpy as np
from absl import app, flags, logging

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from mllm_jax.data.latent_cache import open_latent_cache, write_latent_cache  # noqa: E402
from mllm_jax.data.paired_datasets import PAIR_SETS, load_pairs  # noqa: E402
from mllm_jax.models.fusion_adapter import AdapterConfig  # noqa: E402
from mllm_jax.recipes.fusemix import FuseMixConfig, train_fusemix  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", "runs/fusemix", "Caches, results.json and the plot go here.")
flags.DEFINE_string(
    "runs_dir", None, "Keep each run's trainer workdir here (default: a deleted temporary dir)."
)
flags.DEFINE_string("table", "experiments/results/fusemix.md", "Markdown results table.")
flags.DEFINE_list("budgets", ["0.01", "0.1", "1.0"], "Fractions of the train pairs.")
flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds (init, budget subset, data order, mixing).")
flags.DEFINE_integer("num_steps", 300, "Train steps per run (same for every budget).")
flags.DEFINE_integer("batch_size", 512, "Latent pairs per step (FuseMix mixes them to half).")
flags.DEFINE_integer("embed_dim", 256, "e: width of the shared space.")
flags.DEFINE_integer("num_blocks", 1, "n: residual blocks per adapter.")
flags.DEFINE_float("mlp_ratio", 0.5, "Block hidden width as a multiple of the latent width.")
flags.DEFINE_float("dropout", 0.6, "Dropout in the blocks (paper: 0.6).")
flags.DEFINE_float("learning_rate", 1e-3, "Peak AdamW learning rate (paper: 1e-3).")
flags.DEFINE_float("weight_decay", 0.1, "Weight decay on matrices (paper: 0.1).")
flags.DEFINE_float("alpha", 1.0, "Beta(alpha, alpha) of the mixing weight (paper: 1).")
flags.DEFINE_integer(
    "image_size", 112, "MobileNetV2 input (the 8x8 / 64x64 images are upscaled; 224 is ~5x slower)."
)

METRICS = ("t2i_r@1", "t2i_r@5", "t2i_r@10", "i2t_r@1", "i2t_r@5", "i2t_r@10", "zero_shot")


def build_caches(workdir: pathlib.Path) -> dict[str, object]:
    """Opens (writing first if absent) the latent cache of every pair set and split."""
    from mllm_jax.encoders.minilm import SentenceEncoder
    from mllm_jax.encoders.mobilenet_v2 import MobileNetV2Encoder

    caches, encoders = {}, None
    for name in PAIR_SETS:
        for split in ("train", "test"):
            directory = workdir / "cache" / f"{name}_{split}"
            if not (directory / "meta.json").exists():
                if encoders is None:
                    encoders = (MobileNetV2Encoder(size=FLAGS.image_size), SentenceEncoder())
                started = time.perf_counter()
                write_latent_cache(
                    load_pairs(name, split), *encoders, directory,
                    encoder_names=(f"mobilenet_v2@{FLAGS.image_size}", "all-MiniLM-L6-v2"),
                )  # fmt: skip
                logging.info("encoded %s/%s in %.0f s", name, split, time.perf_counter() - started)
            caches[f"{name}_{split}"] = open_latent_cache(directory)
    return caches


def summarize(runs: list[dict]) -> dict:
    """{budget: {"fusemix"|"no_mix": {dataset: {metric: [mean, std]}}}} over seeds."""
    table: dict = {}
    for run in runs:
        cell = table.setdefault(str(run["budget"]), {}).setdefault(run["method"], {})
        for dataset, metrics in run["eval"].items():
            for metric, value in metrics.items():
                cell.setdefault(dataset, {}).setdefault(metric, []).append(value)
    for methods in table.values():
        for datasets in methods.values():
            for metrics in datasets.values():
                for metric, values in metrics.items():
                    metrics[metric] = [float(np.mean(values)), float(np.std(values)), len(values)]
    return table


def markdown_table(table: dict, pairs_of: dict, command: str, seconds: float) -> str:
    lines = [
        "# FuseMix on frozen MobileNetV2 + all-MiniLM-L6-v2 latents",
        "",
        f"Command (wall time {seconds / 60:.1f} min on a shared 2-core CPU):",
        "",
        f"    {command}",
        "",
        "Mean ± std over seeds. t2i: every test caption queries the test images, a hit when any "
        "of the top-K images has that caption (images share captions); i2t: every test image "
        "queries the distinct test captions (i2t R@10 is 1 by construction for digits' 10 "
        "captions); zero-shot: nearest class prompt, from a template unseen in training.",
        "",
    ]
    for dataset in ("digits_test", "easy_vqa_test"):
        lines += [f"## {dataset}", ""]
        header = "| budget (pairs) | FuseMix | " + " | ".join(METRICS) + " |"
        lines += [header, "|" + "---|" * (len(METRICS) + 2)]
        for budget, methods in table.items():
            for method in ("no_mix", "fusemix"):
                metrics = methods[method][dataset]
                cells = [f"{metrics[m][0]:.3f} ± {metrics[m][1]:.3f}" for m in METRICS]
                label = f"{float(budget):.0%} ({pairs_of[budget]})"
                lines.append(f"| {label} | {'yes' if method == 'fusemix' else 'no'} | "
                             + " | ".join(cells) + " |")  # fmt: skip
        lines.append("")
    return "\n".join(lines)


def plot(table: dict, path: pathlib.Path) -> None:
    figure, axes = plt.subplots(1, 2, figsize=(10, 4))
    budgets = sorted(table, key=float)
    for axis, dataset in zip(axes, ("digits_test", "easy_vqa_test"), strict=True):
        for method, style in (("no_mix", "o--"), ("fusemix", "s-")):
            for metric in ("t2i_r@1", "zero_shot"):
                means = [table[b][method][dataset][metric][0] for b in budgets]
                stds = [table[b][method][dataset][metric][1] for b in budgets]
                axis.errorbar([float(b) for b in budgets], means, yerr=stds, fmt=style,
                              capsize=3, label=f"{metric} {method}")  # fmt: skip
        axis.set_xscale("log")
        axis.set_xlabel("fraction of train pairs")
        axis.set_title(dataset)
        axis.set_ylim(0, 1.02)
        axis.grid(alpha=0.3)
    axes[0].set_ylabel("score")
    axes[1].legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def train_all(train_caches, held_out, adapter, runs_dir: pathlib.Path) -> tuple[list, dict]:
    """Every (budget, method, seed) run, each in ``runs_dir/<budget>_<method>_<seed>``."""
    runs, pairs_of = [], {}
    for budget in FLAGS.budgets:
        for method in ("no_mix", "fusemix"):
            for seed in (int(s) for s in FLAGS.seeds):
                rng = np.random.default_rng(seed)
                selections = [
                    (cache, np.sort(rng.permutation(len(cache))[: max(2, round(float(budget)
                                                                                  * len(cache)))]))
                    for cache in train_caches
                ]  # fmt: skip
                config = FuseMixConfig(
                    adapter=adapter,
                    mix=method == "fusemix",
                    alpha=FLAGS.alpha,
                    batch_size=FLAGS.batch_size,
                    num_steps=FLAGS.num_steps,
                    learning_rate=FLAGS.learning_rate,
                    weight_decay=FLAGS.weight_decay,
                    seed=seed,
                )
                result = train_fusemix(
                    selections, config, workdir=runs_dir / f"{budget}_{method}_{seed}",
                    evaluate_on=held_out, progress=False,
                )  # fmt: skip
                pairs_of[budget] = result.num_pairs
                runs.append({
                    "budget": float(budget), "method": method, "seed": seed,
                    "num_pairs": result.num_pairs, "final_loss": result.losses[-1],
                    "train_seconds": round(result.train_seconds, 2),
                    "steps_per_second": round(result.steps_per_second, 2),
                    "eval": result.evaluations,
                })  # fmt: skip
                logging.info("%s", json.dumps(runs[-1]))
    return runs, pairs_of


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    started = time.perf_counter()
    workdir = pathlib.Path(FLAGS.workdir)
    # Runs of one budget and method compile the same step: compile it once.
    jax.config.update("jax_compilation_cache_dir", str(workdir / "xla_cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    caches = build_caches(workdir)
    train_caches = [caches[f"{name}_train"] for name in PAIR_SETS]
    held_out = {f"{name}_test": caches[f"{name}_test"] for name in PAIR_SETS}
    adapter = AdapterConfig(
        embed_dim=FLAGS.embed_dim,
        num_blocks=FLAGS.num_blocks,
        mlp_ratio=FLAGS.mlp_ratio,
        dropout=FLAGS.dropout,
    )
    with tempfile.TemporaryDirectory(prefix="fusemix_runs_") as temporary:
        runs_dir = pathlib.Path(FLAGS.runs_dir or temporary)
        runs, pairs_of = train_all(train_caches, held_out, adapter, runs_dir)
    table = summarize(runs)
    seconds = time.perf_counter() - started
    command = "nice -n 19 .venv/bin/python experiments/fusemix.py " + " ".join(sys.argv[1:])
    results = {
        "command": command.strip(),
        "wall_seconds": round(seconds, 1),
        "flags": {name: FLAGS[name].value for name in FLAGS_USED},
        "caches": {name: cache.meta["count"] for name, cache in caches.items()},
        "encoders": train_caches[0].meta["encoders"],
        "table": table,
        "runs": runs,
    }
    (workdir / "results.json").write_text(json.dumps(results, indent=1))
    plot(table, workdir / "fusemix.png")
    pathlib.Path(FLAGS.table).write_text(markdown_table(table, pairs_of, command.strip(), seconds))
    print(markdown_table(table, pairs_of, command.strip(), seconds))


FLAGS_USED = (
    "budgets", "seeds", "num_steps", "batch_size", "embed_dim", "num_blocks", "mlp_ratio",
    "dropout", "learning_rate", "weight_decay", "alpha", "image_size",
)  # fmt: skip

if __name__ == "__main__":
    app.run(main)
