"""A dress rehearsal of the paper recipe on one device: the whole training command, timed.

    python -m benchmarks.rehearsal [--minutes 8] [--batch 64] [--image-size 256] \
        [--num-train 4000] [--hf-home DIR] [--out DIR]
    python -m benchmarks.rehearsal --smoke          # the same path, tiny, on the CPU

`python -m cmil_jax.main --config configs/seqcomp.py` as shipped (ResNet-50 from ImageNet
weights, model.dtype 'auto', genuine / SBI / fake triples, 'batch' triples a step) on the
built-in synthetic faces (`data.name=cmil_synthetic/facial_components`), offline: the weights
come from a huggingface_hub cache, `--hf-home` (one holding timm/resnet50.tv_in1k), or else one
this script writes with random values in torchvision's layout (then the run measures the path,
not what ImageNet features are worth). The number of steps is estimated for `--minutes` from
`--rate` (images/s); a run still going at the time limit gets SIGTERM, which the trainer
answers with a checkpoint and exit 0 (no test then).

Reported (stdout, and rehearsal.json in --out): end-to-end images/s of the train windows after
the first (compilation and data build excluded; time_to_first_step_s says what they cost),
peak device memory (`peak_memory_gb`, where the backend reports it), the loss of the first and
last train windows, and every validation pass's Fixed-Acc, AUC p(x) and mAP.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REPO, FILENAME = "timm/resnet50.tv_in1k", "model.safetensors"


def write_random_weights(hf_home: str) -> str:
    """A ResNet-50 weights file with random values in a huggingface_hub cache under hf_home
    (the layout `hf_hub_download` reads offline); returns its path."""
    import hashlib  # pylint: disable=import-outside-toplevel

    import numpy as np  # pylint: disable=import-outside-toplevel
    from safetensors.numpy import save  # pylint: disable=import-outside-toplevel

    from cmil_jax import convert  # pylint: disable=import-outside-toplevel

    rng = np.random.default_rng(0)
    flat = {}
    for path, shape in convert.template("resnet50").items():
        value = (rng.standard_normal(shape) * 0.05).astype(np.float32)
        flat[path] = np.abs(value) + 0.5 if path[-1] == "var" else value
    state = convert.to_torch_state_dict(convert.unflatten(flat), "resnet50")
    data = save(state)
    folder = os.path.join(hf_home, "hub", "models--" + REPO.replace("/", "--"))
    commit = "0" * 40
    os.makedirs(os.path.join(folder, "snapshots", commit), exist_ok=True)
    os.makedirs(os.path.join(folder, "refs"), exist_ok=True)
    with open(os.path.join(folder, "refs", "main"), "w") as f:
        f.write(commit)
    path = os.path.join(folder, "snapshots", commit, FILENAME)
    with open(path, "wb") as f:
        f.write(data)
    print(f"random ResNet-50 weights in {path} (sha256 {hashlib.sha256(data).hexdigest()})")
    return path


def summarize(workdir: str) -> dict:
    """The figures of a finished (or stopped) run from its metrics.jsonl."""
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    train = [r for r in records if r["split"] == "train" and "loss" in r]
    first = next((r for r in records if "time_to_first_step_s" in r), {})
    rates = [r["images_per_sec"] for r in train[1:]]
    peaks = [r["peak_memory_gb"] for r in train if "peak_memory_gb" in r]
    val = [{k: r.get(k) for k in ("step", "fixed_acc", "auc", "map")}
           for r in records if r["split"] == "val"]
    return {
        "steps": train[-1]["step"] if train else 0,
        "time_to_first_step_s": first.get("time_to_first_step_s"),
        "images_per_sec_median": sorted(rates)[len(rates) // 2] if rates else None,
        "images_per_sec_windows": rates,
        "peak_memory_gb": max(peaks) if peaks else None,
        "loss_first": train[0]["loss"] if train else None,
        "loss_last": train[-1]["loss"] if train else None,
        "val": val,
        "tested": any(r["split"] == "test" for r in records),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--minutes", type=float, default=8.0)
    p.add_argument("--rate", type=float, default=3000.0,
                   help="images/s expected, for the number of steps")
    p.add_argument("--batch", type=int, default=64, help="triples a step")
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--num-train", type=int, default=4000)
    p.add_argument("--evals", type=int, default=6, help="validation passes in the run")
    p.add_argument("--hf-home", default="", help="a huggingface_hub home with the weights")
    p.add_argument("--out", default="rehearsal_out", help="workdir, data and rehearsal.json")
    p.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU")
    args = p.parse_args(argv)

    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    workdir, data_dir = os.path.join(out, "run"), os.path.join(out, "data")
    hf_home = args.hf_home or os.path.join(out, "hf")
    if not args.hf_home:
        write_random_weights(hf_home)
    sizes = dict(batch=args.batch, image_size=args.image_size, num_train=args.num_train,
                 num_eval=max(100, args.num_train // 10), extra=[])
    if args.smoke:
        sizes = dict(batch=4, image_size=64, num_train=48, num_eval=12,
                     extra=["--config.model.width=48", "--config.data.num_workers=0"])
    seconds = args.minutes * 60
    steps = 8 if args.smoke else max(10, int(seconds * args.rate / (3 * sizes["batch"])))
    every = max(1, steps // args.evals)
    cmd = [sys.executable, "-m", "cmil_jax.main", "--config", "configs/seqcomp.py",
           "--workdir", workdir, f"--config.data.data_dir={data_dir}",
           "--config.data.name=cmil_synthetic/facial_components",
           f"--config.data.synthetic.num_train={sizes['num_train']}",
           f"--config.data.synthetic.num_val={sizes['num_eval']}",
           f"--config.data.synthetic.num_test={sizes['num_eval']}",
           f"--config.data.image_size={sizes['image_size']}",
           f"--config.train.batch_size={sizes['batch']}", f"--config.train.num_steps={steps}",
           f"--config.train.log_every={max(1, every // 4)}", f"--config.train.eval_every={every}",
           f"--config.train.checkpoint_every={steps}",
           f"--config.train.weights_cache={os.path.join(out, 'weights')}",
           "--config.train.tensorboard=False", *sizes["extra"]]
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(PYTHONPATH=ROOT, HF_HOME=hf_home, HF_HUB_OFFLINE="1")
    if args.smoke:
        env["JAX_PLATFORMS"] = "cpu"
    print(f"{steps} steps of {sizes['batch']} triples at {sizes['image_size']} px, validation "
          f"every {every}; at most {seconds:.0f} s of training\n" + " ".join(cmd), flush=True)
    start = time.time()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env)
    try:
        # Compilation and the data build come on top of the training time.
        code = proc.wait(timeout=seconds + (600 if not args.smoke else 900))
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=120)
        print("stopped by SIGTERM at the time limit")
    result = {"exit": code, "wall_s": time.time() - start, "steps_planned": steps,
              "batch_triples": sizes["batch"], "image_size": sizes["image_size"],
              "weights": "random, hub-cache layout" if not args.hf_home else args.hf_home}
    if os.path.exists(os.path.join(workdir, "metrics.jsonl")):
        result.update(summarize(workdir))
    with open(os.path.join(out, "rehearsal.json"), "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps({k: v for k, v in result.items() if k != "images_per_sec_windows"},
                     indent=1))
    return 0 if code == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
