"""Table A1 of the supplementary: the loss hyper-parameter ablation, as config overrides.

    python tools/sweep_table_a1.py --base_workdir runs/table_a1                   # demo size
    python tools/sweep_table_a1.py --base_workdir /tmp/a1 --ci                    # minutes
    python tools/sweep_table_a1.py --base_workdir runs/a1_r50 --config configs/seqcomp.py \
        --settings I,IV -- --config.data.data_dir=/data/tfds                      # paper size

Each setting (lambda_1, lambda_2, tau, alpha) trains one run with ``python -m cmil_jax.main``
in <base_workdir>/setting_<S> (its log in <base_workdir>/setting_<S>/sweep.log); a setting
whose run already holds test results is not run again (--rerun forces it). Arguments after
``--`` are passed to every run. The synthetic demo data is built once, in <base_workdir>/data.
The table (test metrics of the best checkpoint on val of the first selection metric, in %,
with the change against setting I and the paper's ranking accuracy) is printed and written to
<base_workdir>/table_a1.md.

The paper's numbers are ResNet-50 on Seq-FaceComp, 200 epochs; a demo or --ci run shows that
the sweep works, not the paper's values.
"""

import argparse
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cmil_jax import evaluation

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Setting -> (lambda_1, lambda_2, tau, alpha, the paper's ranking accuracy in %).
SETTINGS = {
    "I": (1.0, 1.0, 0.2, 1.0, 74.54),
    "II": (0.5, 1.0, 0.2, 1.0, 73.42),
    "III": (1.5, 1.0, 0.2, 1.0, 73.22),
    "IV": (1.0, 0.5, 0.2, 1.0, 72.33),
    "V": (1.0, 1.5, 0.2, 1.0, 74.12),
    "VI": (1.0, 1.0, 0.5, 1.0, 74.55),
    "VII": (1.0, 1.0, 0.2, 0.5, 72.27),
}

# A run of about a minute on a 2-core CPU: it checks the sweep, it says nothing about the method.
CI_OVERRIDES = (
    "--config.data.synthetic.num_train=200",
    "--config.data.synthetic.num_val=60",
    "--config.data.synthetic.num_test=60",
    "--config.data.image_size=64",
    "--config.data.num_workers=0",
    "--config.model.backbone_width=8",
    "--config.model.width=48",
    "--config.train.batch_size=16",
    "--config.train.num_steps=40",
    "--config.train.log_every=20",
    "--config.train.eval_every=20",
    "--config.train.checkpoint_every=40",
    "--config.eval.batch_size=30",
)

METRICS = ("fixed_acc", "adaptive_acc", "exact_match", "map", "auc")


def overrides(setting: str) -> list[str]:
    l1, l2, tau, alpha, _ = SETTINGS[setting]
    return [f"--config.loss.lambda1={l1}", f"--config.loss.lambda2={l2}",
            f"--config.loss.tau={tau}", f"--config.loss.alpha={alpha}"]


def command(config: str, workdir: str, setting: str, extra) -> list[str]:
    return [sys.executable, "-m", "cmil_jax.main", "--config", config, "--workdir", workdir,
            *overrides(setting), *extra]


def setting_result(workdir: str, metric: str):
    """The test record of the best-`metric` checkpoint of a run, or None."""
    try:
        records = evaluation.test_records(workdir)
    except FileNotFoundError:
        return None
    for r in records:
        if r.get("checkpoint") == f"best_{metric}" and not r.get("dataset"):
            return r
    return None


def table(results: dict, metric: str) -> str:
    """Markdown Table A1: settings, their hyper-parameters, our metrics (%), the paper's."""
    labels = {"fixed_acc": "Fixed-Acc", "adaptive_acc": "Adaptive-Acc",
              "exact_match": "exact match", "map": "mAP", "auc": "AUC"}
    head = ["Setting", "lambda_1", "lambda_2", "tau", "alpha"]
    head += [labels[m] + (" (vs I)" if m == metric else "") for m in METRICS]
    head += ["paper Ranking Acc."]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    ref = results.get("I")
    for s, (l1, l2, tau, alpha, paper) in SETTINGS.items():
        if s not in results:
            continue
        r = results[s]
        cells = [s, f"{l1:g}", f"{l2:g}", f"{tau:g}", f"{alpha:g}"]
        for m in METRICS:
            v = r.get(m) if r else None
            if v is None:
                cells.append("-")
                continue
            cell = f"{100 * v:.2f}"
            if m == metric and ref and ref.get(m) is not None:
                cell += f" ({100 * (v - ref[m]):+.2f})"
            cells.append(cell)
        paper_ref = SETTINGS["I"][4]
        cells.append(f"{paper:.2f} ({paper - paper_ref:+.2f})")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    extra = []
    if "--" in argv:
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1:]
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--base_workdir", required=True,
                        help="folder receiving one run per setting")
    parser.add_argument("--config", default="configs/seqcomp.py:demo_single",
                        help="config every setting starts from")
    parser.add_argument("--settings", default=",".join(SETTINGS),
                        help="comma-separated settings to run")
    parser.add_argument("--metric", default="fixed_acc",
                        help="selection metric whose best checkpoint is reported")
    parser.add_argument("--ci", action="store_true", help="tiny runs (about a minute each)")
    parser.add_argument("--rerun", action="store_true", help="run settings that have results")
    parser.add_argument("--dry_run", action="store_true", help="print the commands only")
    args = parser.parse_args(argv)

    settings = [s.strip() for s in args.settings.split(",") if s.strip()]
    unknown = [s for s in settings if s not in SETTINGS]
    if unknown:
        parser.error(f"unknown settings {unknown}; valid: {', '.join(SETTINGS)}")
    base = os.path.abspath(args.base_workdir)
    extra = list(CI_OVERRIDES if args.ci else ()) + extra
    if not any(a.startswith("--config.data.data_dir") for a in extra):
        extra.append(f"--config.data.data_dir={os.path.join(base, 'data')}")

    results = {}
    for s in settings:
        workdir = os.path.join(base, f"setting_{s}")
        cmd = command(args.config, workdir, s, extra)
        if args.dry_run:
            print(" ".join(cmd[1:]))
            continue
        done = setting_result(workdir, args.metric)
        if done is None or args.rerun:
            os.makedirs(workdir, exist_ok=True)
            print(f"setting {s}: training ({' '.join(overrides(s))})", flush=True)
            with open(os.path.join(workdir, "sweep.log"), "w") as log:
                proc = subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                      check=False)
            if proc.returncode != 0:
                print(f"setting {s}: failed (exit {proc.returncode}); see "
                      f"{os.path.join(workdir, 'sweep.log')}", flush=True)
            done = setting_result(workdir, args.metric)
        results[s] = done
        if done:
            print(f"setting {s}: {args.metric}={done.get(args.metric, float('nan')):.4f}",
                  flush=True)
    if args.dry_run:
        return 0
    text = table(results, args.metric)
    path = os.path.join(base, "table_a1.md")
    with open(path, "w") as f:
        f.write(f"# Table A1 sweep\n\n`{args.config}` {' '.join(extra)}\n\n"
                f"Test split, best checkpoint on val for {args.metric}; rates in %.\n\n{text}")
    print(text, end="")
    print(f"written {path}")
    return 0 if all(results.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
