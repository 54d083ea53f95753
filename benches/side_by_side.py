#!/usr/bin/env python3
"""lqa against PyTorch (the paper's stack), side by side in one window.

The machine's speed drifts 15-40 % between minutes, so a figure means something only as a
ratio against the peer measured alternately on the same CPU (../shared/bench/README.md). This
driver runs, N rounds: PyTorch's ../shared/reference/timing.py on the chosen benchmarks, then
lqa's cargo benches that measure the same thing (each given that round's PyTorch file through
LQA_BENCH_PYTORCH), and prints every round's figures, their ratios and the medians, with the
CPU kind. Standard library only; PyTorch runs in the venv of ../shared/reference/README.md.

    python3 benches/side_by_side.py [--rounds 3] [--bench prefill decode train_step ...]
        [--python /tmp/refenv/bin/python] [--weights f32|native|...] [--isa avx2] [--out FILE.json]

Ratios are lqa's speed-up (PyTorch's seconds over lqa's, or lqa's tokens/s over PyTorch's) and
lqa's peak RSS over PyTorch's.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
SHARED = os.path.join(ROOT, "..", "shared")
# timing.py's benchmark -> the cargo bench that measures it
LQA_BENCH = {
    "prefill": "model",
    "decode": "model",
    "train_step": "lit",
    "control_step_b1": "control",
    "control_step_b4": "control",
}


def cpu_kind():
    model, flags = "unknown CPU", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and model == "unknown CPU":
                    model = line.split(":", 1)[1].strip()
                elif line.startswith("flags") and not flags:
                    flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    isa = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2"
    extra = [x for x in ("avx512_vnni", "avx512_bf16", "amx_int8") if x in flags]
    return f"{model}, {isa}" + (f" ({', '.join(extra)})" if extra else "") + f", {os.cpu_count()} cores"


def run(cmd, env=None, what=""):
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if p.returncode != 0:
        sys.exit(f"{what} failed ({' '.join(cmd)}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return p.stdout


# What forces PyTorch's own kernels to AVX2 (`--isa avx2`): ATen's dispatch, oneDNN and MKL.
PYTORCH_AVX2 = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2",
                "MKL_ENABLE_INSTRUCTIONS": "AVX2"}


def pytorch_round(args, benches, out):
    env = dict(os.environ, **(PYTORCH_AVX2 if args.isa == "avx2" else {}))
    run([args.python, args.timing, "--bench", *benches, "--runs", str(args.runs),
         "--out", out, "--model-dir", args.model_dir], env=env, what="timing.py")
    with open(out) as f:
        rows = json.load(f)["results"]
    got = {}
    for r in rows:
        if r["bench"] in ("prefill", "decode"):
            got[r["bench"]] = (r["tokens_per_s"], "tok/s", r.get("peak_rss_mib"))
        else:
            got[r["bench"]] = (r["median_s"], "s", r.get("peak_rss_mib"))
    return got


def lqa_round(args, benches, pytorch_file):
    env = dict(os.environ, LQA_BENCH_PYTORCH=pytorch_file, LQA_BENCH_RUNS=str(args.runs))
    if args.weights:
        env["LQA_BENCH_WEIGHTS"] = args.weights
    if args.isa:
        env["LQA_ISA"] = args.isa
    got, of_bound = {}, {}
    for cargo_bench in sorted({LQA_BENCH[b] for b in benches}):
        out = run(["cargo", "bench", "--quiet", "--bench", cargo_bench], env=env,
                  what=f"cargo bench --bench {cargo_bench}")
        for line in out.splitlines():
            if line.startswith("json: "):
                r = json.loads(line[6:])
                got[r["bench"]] = (r["value"], r["unit"], r["peak_rss_mib"])
                if r.get("of_bound") is not None:
                    of_bound[r["bench"]] = r["of_bound"]
    return got, of_bound


def speedup(pt, lqa, unit):
    return pt / lqa if unit == "s" else lqa / pt


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--runs", type=int, default=5, help="measured runs per benchmark and round")
    ap.add_argument("--bench", nargs="+", default=["prefill", "decode", "train_step", "control_step_b1"],
                    choices=sorted(LQA_BENCH))
    ap.add_argument("--python", default="/tmp/refenv/bin/python")
    ap.add_argument("--timing", default=os.path.join(SHARED, "reference", "timing.py"))
    ap.add_argument("--model-dir", default=os.environ.get("LQA_MODEL_DIR", "/tmp/lqa-models"))
    ap.add_argument("--weights", default=None, help="lqa's `weights` load option (model bench)")
    ap.add_argument("--isa", default=None, choices=["avx2"],
                    help="avx2: lqa's own kernels (LQA_ISA) and PyTorch's (ATen, oneDNN, MKL) on "
                         "AVX2 on an AVX-512 CPU, as on AVX2-only machines (candle's other products "
                         "keep AVX-512)")
    ap.add_argument("--out", default=None, help="write every round's figures here (JSON)")
    args = ap.parse_args()
    if args.runs < 5:
        sys.exit("--runs must be at least 5 (timing.py's minimum)")
    for path, what in ((args.python, "--python"), (args.timing, "--timing")):
        if not os.path.exists(path):
            sys.exit(f"{what}: {path} does not exist (see ../shared/reference/README.md)")

    kind = cpu_kind() + (f"; lqa's and PyTorch's kernels forced to {args.isa}" if args.isa else "")
    print(f"CPU: {kind}")
    print("building the benches ...", flush=True)
    for b in sorted({LQA_BENCH[b] for b in args.bench}):
        run(["cargo", "bench", "--quiet", "--no-run", "--bench", b], what="cargo bench --no-run")

    rounds = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.rounds):
            pt_file = os.path.join(tmp, f"pytorch-{i}.json")
            pt = pytorch_round(args, args.bench, pt_file)
            lq, lq_bound = lqa_round(args, args.bench, pt_file)
            rounds.append({"pytorch": pt, "lqa": lq, "lqa_of_bound": lq_bound})
            print(f"\nround {i + 1} of {args.rounds}")
            print("| benchmark | PyTorch | lqa | lqa speed-up | lqa of its bound | PyTorch peak RSS MiB | lqa peak RSS MiB | RSS ratio |")
            print("|---|---|---|---|---|---|---|---|")
            for b in args.bench:
                if b not in pt or b not in lq:
                    print(f"| {b} | {pt.get(b, ('-',))[0]} | {lq.get(b, ('-',))[0]} | - | - | - | - | - |")
                    continue
                (pv, unit, prss), (lv, _, lrss) = pt[b], lq[b]
                fb = f"{100 * lq_bound[b]:.0f} %" if b in lq_bound else "-"
                print(f"| {b} | {pv:.3f} {unit} | {lv:.3f} {unit} | {speedup(pv, lv, unit):.2f}x | {fb} | "
                      f"{prss:.0f} | {lrss:.0f} | {lrss / prss:.2f} |", flush=True)

    print(f"\nmedians over {args.rounds} rounds ({kind})")
    print("| benchmark | lqa speed-up per round | median | lqa of its bound per round | RSS ratio per round | median |")
    print("|---|---|---|---|---|---|")
    summary = {}
    for b in args.bench:
        sp = [speedup(r["pytorch"][b][0], r["lqa"][b][0], r["pytorch"][b][1])
              for r in rounds if b in r["pytorch"] and b in r["lqa"]]
        rs = [r["lqa"][b][2] / r["pytorch"][b][2]
              for r in rounds if b in r["pytorch"] and b in r["lqa"]]
        if not sp:
            continue
        fb = [r.get("lqa_of_bound", {}).get(b) for r in rounds]
        fb = [x for x in fb if x is not None]
        summary[b] = {"speedup": statistics.median(sp), "rss_ratio": statistics.median(rs)}
        if fb:
            summary[b]["of_bound"] = statistics.median(fb)
        print(f"| {b} | {', '.join(f'{x:.2f}x' for x in sp)} | {statistics.median(sp):.2f}x | "
              f"{', '.join(f'{100 * x:.0f} %' for x in fb) or '-'} | "
              f"{', '.join(f'{x:.2f}' for x in rs)} | {statistics.median(rs):.2f} |")
    if args.out:
        tmp_out = args.out + ".tmp"
        with open(tmp_out, "w") as f:
            json.dump({"cpu": kind, "rounds": rounds, "median": summary}, f, indent=1)
        os.replace(tmp_out, args.out)


if __name__ == "__main__":
    main()
