#!/usr/bin/env python3
"""PyTorch on CUDA doing the work of lqa's GPU check, on the same weights and token ids.

Adapted from ../shared/reference/timing.py (the CPU baseline) for a GPU: the model is the
transformers folder that `gpu_check --export DIR` writes (the default model's f32 weights as lqa
uses them) and every prompt and batch comes as token ids from DIR/ids.json, so no tokenizer,
GGUF reader or LatentQA checkout is needed; the LatentQA step is written out here as the paper's
code does it (target forward without gradient, hidden states of the read layer at the read
positions written over the decoder's placeholders at the write layer by a forward hook, the
cross-entropy of the label tokens, backward, AdamW), with explicit position ids for the left
padding (the paper's shift_position_ids).

Rows (medians after warm-ups, torch.cuda.synchronize() before each clock read):
  prefill_f32/bf16   forward of a 128-token prompt, batch 1, KV cache built, last logits
  decode_f32/bf16    64 greedy tokens with the KV cache after that prompt (prefill not timed)
  train_step         LIT step, batch 4: decoder = model + LoRA r16/alpha32/dropout 0.05 on
                     q,k,v,o,gate,up,down,lm_head (train mode), AdamW lr 3e-5, wd 0.01
  control_step_b1/4  control step: target + LoRA r16 on layers 0-15 (the 7 projections +
                     lm_head), gradient through the frozen decoder into the target, Adam 1e-4
  read_generate      target forward + 32 greedy decoder tokens with the patch (KV cache)
It also reports the top-5 of each parity prompt against lqa's on the device.

    python3 scripts/gpu_torch_timing.py --dir /tmp/lqa-gpu/export --out torch.json
"""

import argparse
import copy
import json
import statistics
import sys
import time

import torch
import torch.nn.functional as F

LORA_TRAIN_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"]
LORA_STEER_MODULES = ["gate_proj", "up_proj", "down_proj", "lm_head", "q_proj", "k_proj", "v_proj", "o_proj"]
DEV = "cuda"  # --device cpu: a dry run of the script on a machine without a GPU


def sync():
    if DEV == "cuda":
        torch.cuda.synchronize()


def measure(fn, warmup, runs):
    for _ in range(warmup):
        fn()
    sync()
    ts = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        sync()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts), ts


def load(model_dir, dtype, attn="sdpa"):
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    try:
        m = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, attn_implementation=attn)
    except TypeError:  # transformers < 4.56
        m = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=dtype, attn_implementation=attn)
    m = m.to(DEV).eval()
    for p in m.parameters():
        p.requires_grad = False
    return m


def padded(rows, pad):
    """Left-padded ids, attention mask and position ids (each row counts from 0)."""
    n = max(len(r) for r in rows)
    ids = [[pad] * (n - len(r)) + list(r) for r in rows]
    mask = [[0] * (n - len(r)) + [1] * len(r) for r in rows]
    pos = [[0] * (n - len(r)) + list(range(len(r))) for r in rows]
    t = lambda x: torch.tensor(x, device=DEV)  # noqa: E731
    return t(ids), t(mask), t(pos), [n - len(r) for r in rows]


def layers_of(m):
    for path in ("model.layers", "model.model.layers", "base_model.model.model.layers"):
        obj = m
        try:
            for part in path.split("."):
                obj = getattr(obj, part)
            return obj
        except AttributeError:
            continue
    raise AttributeError("no decoder layers found")


class WritePatch:
    """A forward hook on the decoder's write layer: rows' placeholder positions get the patch
    vectors (out of place, so autograd sees it), only on a forward that covers them."""

    def __init__(self):
        self.rows = self.cols = self.vals = None

    def __call__(self, module, inputs, output):
        if self.vals is None:
            return output
        hs = output[0] if isinstance(output, tuple) else output
        if hs.shape[1] <= int(self.cols.max()):
            return output
        hs = hs.index_put((self.rows, self.cols), self.vals.to(hs.dtype))
        return (hs,) + tuple(output[1:]) if isinstance(output, tuple) else hs


def read_patches(target, ex_rows, pad, read_layer, grad):
    """The read layer's output at each example's read positions, as one [n, d] tensor, and
    the (row, column) pairs of the decoder placeholders they go to."""
    rids, rmask, rpos, rpads = padded([e["read_ids"] for e in ex_rows], pad)
    ctx = torch.enable_grad() if grad else torch.no_grad()
    with ctx:
        out = target(input_ids=rids, attention_mask=rmask, position_ids=rpos,
                     output_hidden_states=True, logits_to_keep=1)
    h = out.hidden_states[read_layer + 1]
    r_idx = [r for r, e in enumerate(ex_rows) for _ in e["read_take"]]
    c_idx = [rpads[r] + p for r, e in enumerate(ex_rows) for p in e["read_take"]]
    vals = h[torch.tensor(r_idx, device=DEV), torch.tensor(c_idx, device=DEV)]
    return vals


def latentqa_loss(target, decoder, hook, exs, pad, read_layer, grad_through_target):
    vals = read_patches(target, exs, pad, read_layer, grad_through_target)
    dids, dmask, dpos, dpads = padded([e["dec_ids"] for e in exs], pad)
    hook.rows = torch.tensor([r for r, e in enumerate(exs) for _ in e["write_positions"]], device=DEV)
    hook.cols = torch.tensor([dpads[r] + p for r, e in enumerate(exs) for p in e["write_positions"]],
                             device=DEV)
    hook.vals = vals
    logits = decoder(input_ids=dids, attention_mask=dmask, position_ids=dpos).logits
    hook.vals = None
    lr = torch.tensor([r for r, e in enumerate(exs) for _ in e["label_positions"]], device=DEV)
    lc = torch.tensor([dpads[r] + t for r, e in enumerate(exs) for t in e["label_positions"]], device=DEV)
    return F.cross_entropy(logits[lr, lc - 1].float(), dids[lr, lc])


def peft_model(model, modules, dropout, layers=None, inference=False):
    from peft import LoraConfig, get_peft_model

    kw = {"layers_to_transform": layers} if layers is not None else {}
    return get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=modules, bias="none",
                                            task_type="CAUSAL_LM", lora_dropout=dropout,
                                            inference_mode=inference, **kw))


def bench_prefill_decode(model, ids, label, warmup, runs):
    x = torch.tensor([ids], device=DEV)

    def prefill():
        with torch.inference_mode():
            return model(input_ids=x, use_cache=True, logits_to_keep=1)

    pre, _ = measure(prefill, warmup + 2, max(runs, 10))
    state = {}

    def decode():
        out = state["out"]
        with torch.inference_mode():
            for _ in range(64):
                nxt = int(out.logits[0, -1].argmax())
                out = model(input_ids=torch.tensor([[nxt]], device=DEV),
                            past_key_values=out.past_key_values, use_cache=True)

    ts = []
    for i in range(warmup + runs):
        state["out"] = prefill()
        sync()
        t0 = time.perf_counter()
        decode()
        sync()
        if i >= warmup:
            ts.append(time.perf_counter() - t0)
    dec = statistics.median(ts)
    return [{"bench": f"prefill_{label}", "median_s": pre, "tokens_per_s": 128 / pre},
            {"bench": f"decode_{label}", "median_s": dec, "tokens_per_s": 64 / dec}]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", required=True, help="the folder gpu_check --export wrote")
    ap.add_argument("--out", default=None)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"])
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--benches", default="decode,train,read,control",
                    help="comma-separated groups to run (a dry run on a CPU skips decode)")
    args = ap.parse_args()
    global DEV
    DEV = args.device
    if DEV == "cuda" and not torch.cuda.is_available():
        raise SystemExit("PyTorch sees no GPU")
    torch.manual_seed(0)
    with open(f"{args.dir}/ids.json") as f:
        ids = json.load(f)
    pad, rl = ids["pad_id"], ids["read_layer"]
    import transformers
    import peft

    res = {"versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                        "peft": peft.__version__, "python": sys.version.split()[0]},
           "gpu": torch.cuda.get_device_name(0) if DEV == "cuda" else "cpu", "attn_implementation": args.attn, "timings": []}
    T = res["timings"]
    t0 = time.perf_counter()
    model = load(args.dir, torch.float32, args.attn)
    print(f"[torch] loaded the exported model in {time.perf_counter() - t0:.1f}s on {res['gpu']}", flush=True)

    # parity with lqa on the device: each prompt's top-5
    top5, match = [], []
    with torch.inference_mode():
        for p, want in zip(ids["prompts"], ids["lqa_top5"]):
            lg = model(input_ids=torch.tensor([p], device=DEV), logits_to_keep=1).logits[0, -1]
            t = lg.float().topk(5).indices.tolist()
            top5.append(t)
            match.append(t == want)
    res["top5"], res["top5_equal_lqa"] = top5, match
    print(f"[torch] top-5 equal to lqa's on the device, per prompt: {match}", flush=True)

    groups = set(args.benches.split(","))
    if "decode" in groups:
        bench_decode_rows(model, ids, args, T)
    if "train" in groups or "read" in groups:
        bench_train_read(model, ids, args, T, pad, rl, groups)
    if "control" in groups:
        bench_control(model, ids, args, T, pad, rl)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)
    for r in T:
        print(f"[torch] {r['bench']}: {r['median_s']:.4f}s")


def bench_decode_rows(model, ids, args, T):
    T += bench_prefill_decode(model, ids["prefill_ids"], "f32", args.warmup, args.runs)
    print(f"[torch] {T[-2]['bench']} {T[-2]['median_s']:.4f}s; {T[-1]['bench']} {T[-1]['median_s']:.4f}s", flush=True)
    m16 = copy.deepcopy(model).to(torch.bfloat16)
    T += bench_prefill_decode(m16, ids["prefill_ids"], "bf16", args.warmup, args.runs)
    print(f"[torch] {T[-2]['bench']} {T[-2]['median_s']:.4f}s; {T[-1]['bench']} {T[-1]['median_s']:.4f}s", flush=True)
    del m16


def bench_train_read(model, ids, args, T, pad, rl, groups):
    # LIT step
    decoder = peft_model(copy.deepcopy(model), LORA_TRAIN_MODULES, 0.05)
    decoder.train()
    hook = WritePatch()
    handle = layers_of(decoder)[ids["write_layer"]].register_forward_hook(hook)
    opt = torch.optim.AdamW([p for p in decoder.parameters() if p.requires_grad], lr=3e-5, weight_decay=0.01)
    losses = []

    def lit_step():
        loss = latentqa_loss(model, decoder, hook, ids["lit"], pad, rl, False)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.detach())

    med, all_s = measure(lit_step, args.warmup, args.runs)
    if "train" in groups:
        T.append({"bench": "train_step", "median_s": med, "all_s": all_s,
                  "losses": [float(x) for x in losses]})
    print(f"[torch] train_step {med:.4f}s (losses {[round(float(x), 4) for x in losses]})", flush=True)

    # reading: target forward + 32 greedy tokens of the decoder with the patch
    decoder.eval()
    ex = ids["lit"][0]
    first_label = ex["label_positions"][0]
    prompt = ex["dec_ids"][:first_label]

    def read_generate():
        with torch.inference_mode():
            vals = read_patches(model, [ex], pad, rl, False)
            hook.rows = torch.zeros(len(ex["write_positions"]), dtype=torch.long, device=DEV)
            hook.cols = torch.tensor(ex["write_positions"], device=DEV)
            hook.vals = vals
            out = decoder(input_ids=torch.tensor([prompt], device=DEV), use_cache=True, logits_to_keep=1)
            hook.vals = None
            for _ in range(32):
                nxt = int(out.logits[0, -1].argmax())
                out = decoder(input_ids=torch.tensor([[nxt]], device=DEV),
                              past_key_values=out.past_key_values, use_cache=True)

    med, all_s = measure(read_generate, 1, args.runs)
    T.append({"bench": "read_generate", "median_s": med, "all_s": all_s, "new_tokens": 32,
              "tokens_per_s": 32 / med})
    print(f"[torch] read_generate {med:.4f}s", flush=True)
    handle.remove()


def bench_control(model, ids, args, T, pad, rl):
    # control steps
    for bs in (1, 4):
        target = peft_model(copy.deepcopy(model), LORA_STEER_MODULES, 0.1, layers=list(range(16)))
        dec = peft_model(copy.deepcopy(model), LORA_TRAIN_MODULES, 0.05, inference=True)
        dec.eval()
        for p in dec.parameters():
            p.requires_grad = False
        hook = WritePatch()
        h = layers_of(dec)[ids["write_layer"]].register_forward_hook(hook)
        opt = torch.optim.Adam([p for p in target.parameters() if p.requires_grad], lr=1e-4)
        exs = ids["control"][:bs]

        def control_step():
            loss = latentqa_loss(target, dec, hook, exs, pad, rl, True)
            loss.backward()
            opt.step()
            opt.zero_grad()

        med, all_s = measure(control_step, 1, args.runs)
        T.append({"bench": f"control_step_b{bs}", "median_s": med, "all_s": all_s})
        print(f"[torch] control_step_b{bs} {med:.4f}s", flush=True)
        h.remove()
        del target, dec, opt


if __name__ == "__main__":
    main()
