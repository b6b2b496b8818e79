"""A run's test results beside the paper's numbers for one of its tables.

    python -m cmil_jax.compare --table a1 --workdir runs/comp
    python -m cmil_jax.compare --table a2 --workdir runs/comp --workdir runs/ffpp \
        --workdir runs/joint
    python -m cmil_jax.compare --table seq_deepfake --workdir runs/comp --workdir runs/attr

Tables (cmil_jax/paper.py): `a1` (supplementary Table A1, the loss ablation), `a2` (Table A2,
separate and joint training), `seq_deepfake` (the Seq-DeepFake benchmark). Each --workdir is a
trained run: its config.json says what it is (which Table A1 setting its loss fields match; a
sequence, binary or joint run) and the test records of its metrics.jsonl (written by training
and by `--mode eval`) give its values. Which record and metric stand for each of the paper's
columns is the one table RUN_METRICS below. Prints a markdown table, rates in %: the paper's
rows, then one row per run with the difference to the paper's matching row in brackets, and
where each value comes from. Exit status 0, or 2 when a run directory, its files, or every
value the table needs is missing (the message names what and how to produce it).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

from cmil_jax import evaluation
from cmil_jax import paper

@dataclasses.dataclass(frozen=True)
class RunMetric:
    """Where a run keeps one of the paper's columns.

    test_set: 'sequence' (data.name of a sequence or joint run whose data.subset is `subset`),
      'binary' (data.name of a binary run, data.joint_name of a joint run) or 'celebdf' (a
      celebdf/* test record of a binary or joint run, which `--mode eval` with
      configs/cross_eval.py:celebdf writes).
    metrics: keys of that test record; with several, each is shown (the paper does not say
      whether its AUCs are frame or video level).
    """

    test_set: str
    metrics: tuple
    subset: str = ""


RUN_METRICS = {
    # [ours] the supplementary's "Ranking Acc." read as Fixed-Acc (docs/reproduce.md).
    "ranking_acc": RunMetric("sequence", ("fixed_acc",), "facial_components"),
    "ffpp_auc": RunMetric("binary", ("auc", "video_auc")),
    "celebdf_auc": RunMetric("celebdf", ("auc", "video_auc")),
    "comp_fixed_acc": RunMetric("sequence", ("fixed_acc",), "facial_components"),
    "comp_adaptive_acc": RunMetric("sequence", ("adaptive_acc",), "facial_components"),
    "attr_fixed_acc": RunMetric("sequence", ("fixed_acc",), "facial_attributes"),
    "attr_adaptive_acc": RunMetric("sequence", ("adaptive_acc",), "facial_attributes"),
}
METRIC_LABELS = {"fixed_acc": "Fixed-Acc", "adaptive_acc": "Adaptive-Acc",
                 "auc": "frame AUC", "video_auc": "video AUC"}

# The paper's row a Table A2 run belongs to, by kind of run.
A2_ROWS = {"joint": "joint", "sequence": "separate", "binary": "separate"}


class CompareError(Exception):
    """A run directory or record that cannot be compared; the message says what is missing."""


@dataclasses.dataclass
class Run:
    """One run directory: its recorded config and its newest test records."""

    workdir: str
    config: dict
    records: list

    @property
    def kind(self) -> str:
        """'joint', 'binary' (one class) or 'sequence'."""
        if self.config["data"].get("joint_name"):
            return "joint"
        return "binary" if self.config["model"].get("num_classes", 5) == 1 else "sequence"

    @property
    def select_metrics(self) -> list:
        return [m.strip() for m in self.config["eval"].get("select_metrics", "").split(",")
                if m.strip()]


def load_run(workdir: str) -> Run:
    """The run in `workdir`; CompareError naming the missing or unreadable file."""
    if not os.path.isdir(workdir):
        raise CompareError(f"{workdir} is not a directory (expected a run's --workdir)")
    path = os.path.join(workdir, "config.json")
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except FileNotFoundError as e:
        raise CompareError(f"{path} does not exist: {workdir} is not a training run") from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CompareError(f"{path} is not valid JSON ({e}); it is the run's recorded config") \
            from e
    if not all(isinstance(config.get(s), dict) for s in ("model", "data", "loss", "eval")):
        raise CompareError(f"{path}: expected the config sections model, data, loss and eval")
    try:
        records = evaluation.test_records(workdir)
    except FileNotFoundError as e:
        raise CompareError(f"{e} (train, or test the run with --mode eval)") from e
    except ValueError as e:
        raise CompareError(str(e)) from e
    return Run(workdir, config, records)


def test_set_name(run: Run, spec: RunMetric) -> str | None:
    """The dataset name of `run` holding `spec`'s column, or None when the run has none."""
    data = run.config["data"]
    if spec.test_set == "sequence":
        if run.kind == "binary" or (spec.subset and data.get("subset") != spec.subset):
            return None
        return data["name"]
    if spec.test_set == "binary":
        return {"binary": data["name"], "joint": data.get("joint_name")}.get(run.kind)
    if run.kind == "sequence":
        return None  # cross-dataset AUCs belong to binary and joint runs
    names = [_dataset(run, r) for r in run.records]
    found = [n for n in names if n.split("/")[0] == spec.test_set]
    return found[-1] if found else f"{spec.test_set}/*"


def _dataset(run: Run, record: dict) -> str:
    """The dataset a test record is of (records written before they named it: data.name)."""
    return record.get("dataset") or run.config["data"]["name"]


def find_value(run: Run, spec: RunMetric, metric: str):
    """(value, record) of `metric` on `spec`'s test set: from the best checkpoint for that
    metric when the run kept one (best_<metric>), else from the best checkpoint of its first
    selection metric. (None, None) when the run has no such record."""
    dataset = test_set_name(run, spec)
    if dataset is None:
        return None, None
    on_set = [r for r in run.records if _dataset(run, r) == dataset]
    for checkpoint in [f"best_{metric}"] + [f"best_{m}" for m in run.select_metrics[:1]]:
        for record in reversed(on_set):
            if record.get("checkpoint") == checkpoint and record.get(metric) is not None:
                return float(record[metric]), record
    return None, None


def a1_setting(run: Run) -> str:
    """The Table A1 setting whose loss fields the run's config matches; CompareError if none."""
    loss = run.config["loss"]
    table = paper.TABLES["a1"]
    for name, fields in table.settings.items():
        if all(abs(float(loss[f.split(".")[1]]) - v) < 1e-9 for f, v in fields.items()):
            return name
    given = ", ".join(f"{f}={loss[f.split('.')[1]]}" for f in next(iter(table.settings.values())))
    raise CompareError(f"{run.workdir}/config.json: the loss fields ({given}) match no setting "
                       f"of Table A1 ({', '.join(table.settings)})")


def paper_row(table: paper.Table, run: Run) -> str | None:
    """The paper's row a run is compared with (its difference is shown against it)."""
    if table.name == "a1":
        return a1_setting(run)
    if table.name == "a2":
        return A2_ROWS[run.kind]
    return "CMIL"


def _pct(value) -> str:
    return "-" if value is None else f"{value:.2f}"


def compare(table_name: str, workdirs) -> str:
    """The markdown comparison of the runs in `workdirs` with the paper's table `table_name`.

    Raises CompareError when a run cannot be read or no run has any value of the table."""
    table = paper.TABLES[table_name]
    runs = [load_run(w) for w in workdirs]
    columns = list(table.columns)
    lines = [f"# {table.title}", "", f"Paper: {table.source}. This project: the test split, "
             "rates in %, the difference to the paper's matching row in brackets.", ""]
    header = ["row"] + [table.columns[c] for c in columns]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, values in table.rows.items():
        lines.append("| " + " | ".join([f"paper: {name}"]
                                       + [_pct(values.get(c)) for c in columns]) + " |")
    sources, missing, found = [], [], 0
    for run in runs:
        row = paper_row(table, run)
        reference = table.rows.get(row, {})
        cells = []
        for column in columns:
            spec = RUN_METRICS[column]
            if test_set_name(run, spec) is None:
                cells.append("")  # not what this run trains (e.g. FF++ AUC of a Seq-FaceComp run)
                continue
            parts = []
            for metric in spec.metrics:
                value, record = find_value(run, spec, metric)
                if value is None:
                    missing.append(_missing(run, spec, metric))
                    continue
                found += 1
                pct = 100.0 * value
                diff = (f" ({pct - reference[column]:+.2f})" if column in reference else "")
                label = f" {METRIC_LABELS[metric]}" if len(spec.metrics) > 1 else ""
                parts.append(f"{pct:.2f}{diff}{label}")
                sources.append(f"{run.workdir}, {table.columns[column]}: `{metric}` of the "
                               f"{_dataset(run, record)} test record, checkpoint "
                               f"{record.get('checkpoint', '')}, step {record.get('step', '?')}"
                               + (f", video protocol {record['video_protocol']}"
                                  if record.get("video_protocol") else ""))
            cells.append("; ".join(parts) if parts else "-")
        if all(c == "" for c in cells):
            label = (f"this project: {run.workdir} (a {run.kind} run on "
                     f"{run.config['data']['name']}: no column of this table)")
        else:
            label = f"this project: {run.workdir} (beside {row})"
        lines.append("| " + " | ".join([label] + cells) + " |")
    if not found:
        trained = "; ".join(f"{r.workdir} is a {r.kind} run on {r.config['data']['name']}"
                            for r in runs)
        raise CompareError(f"no value of {table.title} in these runs: "
                           + ("; ".join(missing) if missing else
                              f"{trained}, which is not what the table reports"))
    lines.append("")
    if table.note:
        lines += [table.note, ""]
    if "ranking_acc" in columns:
        lines += ["Ranking Acc. is compared with Fixed-Acc (the supplementary does not define "
                  "it; docs/reproduce.md).", ""]
    lines += ["Values:", ""] + [f"- {s}" for s in sources]
    datasets = sorted({r.config["data"]["name"] for r in runs})
    lines += ["", "Runs trained on: " + ", ".join(datasets) + "."]
    if any(d.startswith("cmil_synthetic") for d in datasets):
        lines += ["", "Runs on the built-in synthetic faces show that training and testing work "
                  "end to end; their numbers are not comparable with the paper's."]
    if missing:
        lines += ["", "Missing:", ""] + [f"- {m}" for m in missing]
    return "\n".join(lines) + "\n"


def _missing(run: Run, spec: RunMetric, metric: str) -> str:
    """Why `metric` of `spec` is missing from `run`, and the command that tests it."""
    dataset = test_set_name(run, spec)
    if any(_dataset(run, r) == dataset for r in run.records):
        why = " (video-level figures need video frames)" if metric.startswith("video") else ""
        return f"{run.workdir}: the test records of {dataset} hold no '{metric}'{why}"
    if spec.test_set == "celebdf":
        command = f"--config configs/cross_eval.py:celebdf --workdir {run.workdir} --mode eval"
    else:
        command = f"--workdir {run.workdir} --mode eval"
    return (f"{run.workdir}: no test record with '{metric}' on {dataset} (test it: "
            f"python -m cmil_jax.main {command})")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m cmil_jax.compare",
        description="Print trained runs' test results beside the paper's numbers for one of "
                    "its tables (docs/reproduce.md).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--table", required=True, choices=sorted(paper.TABLES),
                        help="a1: supplementary Table A1; a2: Table A2; seq_deepfake: the "
                             "Seq-DeepFake benchmark (Fixed-Acc, Adaptive-Acc)")
    parser.add_argument("--workdir", required=True, action="append",
                        help="a trained run (repeat for several: e.g. a Seq-FaceComp, an FF++ "
                             "and a joint run for a2)")
    parser.add_argument("--out", default=None,
                        help="also write the table to this file (default: print only)")
    args = parser.parse_args(argv)
    try:
        text = compare(args.table, args.workdir)
    except CompareError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(text, end="", flush=True)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
