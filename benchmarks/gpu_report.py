"""The summary of one benchmarks/gpu.sh run: one JSON of every part and a short markdown table.

    python -m benchmarks.gpu_report PARTS_DIR OUT_DIR [--best]

PARTS_DIR holds what the parts wrote (any may be missing: a part that failed or ran out of
time is reported as missing): ceilings.json (benchmarks.ceilings), throughput.json
(benchmarks.throughput, the train step of JAX variants and the twin), profile_*.json
(benchmarks.profile_step, with the floor), memory_jax.json / memory_torch.json
(benchmarks.max_batch), end_to_end.json (benchmarks.throughput --end-to-end). Writes
OUT_DIR/gpu_results.json (all of them) and OUT_DIR/RESULTS_gpu.md, and prints the latter.
``--best`` prints only the --jax-variant SPEC of the fastest JAX train step in throughput.json
('' for the plain one, nothing when none ran).
"""

from __future__ import annotations

import glob
import json
import os
import sys

TARGET_IMAGES_PER_SEC = 5000.0
TARGET_VS_COMPILED = 1.5


def _load(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def load_parts(parts_dir: str) -> dict:
    parts = {}
    for name in ("ceilings", "throughput", "memory_jax", "memory_torch", "end_to_end"):
        parts[name] = _load(os.path.join(parts_dir, f"{name}.json"))
    profiles = sorted(glob.glob(os.path.join(parts_dir, "profile_*.json")))
    parts["profile"] = _load(profiles[-1]) if profiles else None
    return parts


def jax_train_rates(throughput: dict) -> dict:
    """runner -> images/s of every JAX train runner that ran."""
    return {name: r["images_per_sec"] for name, r in (throughput or {}).get("runners", {}).items()
            if name.startswith("jax_train") and r.get("images_per_sec")}


def best_variant(throughput: dict) -> str | None:
    """The --jax-variant SPEC of the fastest JAX train runner ('' = plain), or None."""
    rates = jax_train_rates(throughput)
    if not rates:
        return None
    best = max(rates, key=rates.get)
    return best.split("@", 1)[1] if "@" in best else ""


def _f(x, fmt="{:.1f}"):
    return "" if x is None else fmt.format(x)


def report(parts: dict) -> list[str]:
    lines = []
    c = parts["ceilings"]
    if c:
        lines.append(f"Ceilings ({c['device']}): copy {c['copy_gbs']:.0f} GB/s (read + written), "
                     f"{c['matmul_dtype']} matmul {c['matmul_tflops']:.1f} TFLOP/s.")
    else:
        lines.append("Ceilings: missing.")
    lines.append("")
    t = parts["throughput"]
    if t:
        runners = t.get("runners", {})
        twin = {k: (runners.get(f"torch_{k}_train") or {}).get("images_per_sec")
                for k in ("eager", "compiled")}
        lines += [f"Train step: {t['device']}, {t['backbone']} {t['image_size']} px, batch "
                  f"{t['batch']}, {t['dtype']}; medians of {t['windows']} windows of "
                  f"{t['steps_per_window']} steps.", "",
                  "| runner | images/s | / twin eager | / twin compiled | compile s |",
                  "|---|---:|---:|---:|---:|"]
        for name, r in runners.items():
            rate = r.get("images_per_sec")
            if not (name.endswith("_train") or "_train@" in name) or rate is None:
                continue
            ratios = [rate / twin[k] if twin[k] and name.startswith("jax") else None
                      for k in ("eager", "compiled")]
            lines.append(f"| {name} | {rate:.1f} | {_f(ratios[0], '{:.2f}x')} | "
                         f"{_f(ratios[1], '{:.2f}x')} | {_f(r.get('compile_s'))} |")
        for name, err in (t.get("errors") or {}).items():
            lines.append(f"\n{name}: {err[:300]}")
        numerics = {k: v for k, v in (t.get("numerics") or {}).items() if k != "jax_train"}
        if numerics:
            lines += ["", "Numerics: each variant's first step from the same state and batch "
                      "against jax_train's (flax BatchNorm), relative differences:", "",
                      "| variant | loss | grad norm | BatchNorm statistics |",
                      "|---|---:|---:|---:|"]
            for name, row in numerics.items():
                lines.append(f"| {name} | {row.get('loss', 0):.1e} | "
                             f"{row.get('grad_norm', 0):.1e} | {row.get('batch_stats', 0):.1e} |")
        rates = jax_train_rates(t)
        if rates:
            best = max(rates, key=rates.get)
            ok_rate = rates[best] >= TARGET_IMAGES_PER_SEC
            vs = rates[best] / twin["compiled"] if twin["compiled"] else None
            ok_ratio = vs is not None and vs >= TARGET_VS_COMPILED
            lines += ["", f"Best JAX train step: {best} {rates[best]:.1f} images/s "
                      f"(target {TARGET_IMAGES_PER_SEC:.0f}: {'met' if ok_rate else 'not met'}), "
                      + (f"{vs:.2f}x the twin's torch.compile (target {TARGET_VS_COMPILED}x: "
                         f"{'met' if ok_ratio else 'not met'})." if vs else
                         "no torch.compile figure in this run.")]
    else:
        lines.append("Train step: missing.")
    lines.append("")
    p = parts["profile"]
    if p:
        from benchmarks import step_floor  # pylint: disable=import-outside-toplevel

        jax_section = p["sections"].get("cmil_jax train step", {})
        fl = p["floor"]
        lines += [f"Profile of {p['variant'] or 'jax_train'} against the floor "
                  f"({fl['inputs']['copy_gbs']:.0f} GB/s, {fl['inputs']['matmul_tflops']:.0f} "
                  f"TFLOP/s): wall {_f(jax_section.get('wall_ms_per_step'), '{:.2f}')} ms/step, "
                  f"floor {fl['total']['ms']:.2f} ms/step "
                  f"({fl['inputs']['batch'] / fl['total']['ms'] * 1e3:.0f} images/s).", "",
                  *step_floor.compare(fl, jax_section.get("kinds_ms_per_step"))]
    else:
        lines.append("Profile: missing.")
    lines.append("")
    for key in ("memory_jax", "memory_torch"):
        m = parts[key]
        if not m:
            lines.append(f"{key}: missing.")
        elif "error" in m:
            lines.append(f"{key}: {m['error']}")
        else:
            lines.append(f"Largest batch, {m['framework']}"
                         f"{' ' + m['variant'] if m.get('variant') else ''}: {m['max_batch']} "
                         f"({_f(m.get('images_per_sec'))} images/s; limit "
                         f"{m['limit_bytes'] / 1e9:.1f} GB; tried "
                         + ", ".join(str(r["batch"]) for r in m["tried"]) + ").")
    e = parts["end_to_end"]
    if e:
        e2e = e.get("end_to_end") or {}
        if "jax_train_end_to_end_images_per_sec" in e2e:
            lines.append(f"End to end: {e2e['jax_train_end_to_end_images_per_sec']:.1f} images/s "
                         f"against {e2e['jax_train_device_only_images_per_sec']:.1f} device only "
                         f"({e2e['end_to_end_vs_device_only']:.2f}).")
        else:
            lines.append(f"End to end: {e2e.get('error', 'no figure')}")
    return lines


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) == 2 and argv[1] == "--best":
        best = best_variant(_load(os.path.join(argv[0], "throughput.json")))
        if best is not None:
            print(best)
        return
    if len(argv) != 2:
        raise SystemExit("usage: python -m benchmarks.gpu_report PARTS_DIR OUT_DIR [--best]")
    parts_dir, out_dir = argv
    parts = load_parts(parts_dir)
    with open(os.path.join(out_dir, "gpu_results.json"), "w") as f:
        json.dump(parts, f, indent=1)
    text = "\n".join(report(parts)) + "\n"
    with open(os.path.join(out_dir, "RESULTS_gpu.md"), "w") as f:
        f.write(text)
    print(text, flush=True)


if __name__ == "__main__":
    main()
