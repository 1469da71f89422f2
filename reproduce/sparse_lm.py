"""Price et al.'s sparsity-inducing activations in small decoder-only language models, end to
end: trained here on an offline corpus, validation perplexity side by side with ReLU, the
activation sparsity measured, and the decode speed of each under `dormant.sparse_inference`.

Corpus: the Python standard library's own sources (every machine with Python has them; the
script records the Python version and a hash of the bytes), byte-level tokens (vocabulary
256), the first 90% for training, the rest for validation. Models: OPT-style (fc1 -> act ->
fc2) and Llama-style (gated: act(gate) * up -> down) built from transformers configs, with
ReLU (the configs' own init) and with CReLU at target sparsity s in {0.85, 0.9}, V'(q*) = 0.7,
q* = 1: tau and m from `dormant.eoc.prescribe`, and the MLP's first projection (fc1 / gate)
drawn so that its pre-activations start at variance q* (its input is a LayerNorm/RMSNorm
output of unit variance) -- the edge-of-chaos prescription applied to the MLP's activation.
Same seeds, same budget for every variant.

    python reproduce/sparse_lm.py                 # 3 seeds x 2 models x 3 activations (~25 min)
    python reproduce/sparse_lm.py --quick         # 1 seed, 30 steps
    python reproduce/sparse_lm.py --pages-only    # rewrite docs/results.md from results.json
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import statistics
import sys
import sysconfig
import time
import warnings
from pathlib import Path

import torch

import dormant
from dormant import eoc
from dormant.activations import ClippedReLU
from dormant.report import write_block

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "docs" / "results" / "sparse_lm"
VARIANTS = {"ReLU": None, "CReLU s=0.85": 0.85, "CReLU s=0.9": 0.9}


def corpus(megabytes: float) -> tuple[torch.Tensor, str]:
    """The standard library's .py files in sorted order, as bytes (the first `megabytes`)."""
    lib = Path(sysconfig.get_paths()["stdlib"])
    skip = ("site-packages", "test", "idlelib", "lib2to3", "tkinter", "__pycache__")
    buf, limit = bytearray(), int(megabytes * 2 ** 20)
    for path in sorted(lib.rglob("*.py")):
        if any(part in skip or part.startswith("test") for part in path.relative_to(lib).parts):
            continue
        buf += path.read_bytes()
        if len(buf) >= limit:
            break
    data = bytes(buf[:limit])
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).long(), \
        hashlib.sha256(data).hexdigest()[:16]


def build(arch: str, d: int, layers: int, seq: int):
    import transformers as tf
    heads = max(1, d // 32)
    if arch == "opt":
        cfg = tf.OPTConfig(vocab_size=256, hidden_size=d, ffn_dim=4 * d, num_hidden_layers=layers,
                           num_attention_heads=heads, word_embed_proj_dim=d,
                           max_position_embeddings=seq + 64, activation_function="relu",
                           pad_token_id=0, bos_token_id=0, eos_token_id=0)
        return tf.OPTForCausalLM(cfg)
    cfg = tf.LlamaConfig(vocab_size=256, hidden_size=d, intermediate_size=(8 * d) // 3,
                         num_hidden_layers=layers, num_attention_heads=heads,
                         num_key_value_heads=heads, hidden_act="relu",
                         max_position_embeddings=seq + 64, pad_token_id=0, bos_token_id=0,
                         eos_token_id=0)
    return tf.LlamaForCausalLM(cfg)


def _mlps(model, arch: str):
    """(first projection, owner of the activation, attribute name) per layer."""
    if arch == "opt":
        return [(layer.fc1, layer, "activation_fn") for layer in model.model.decoder.layers]
    return [(layer.mlp.gate_proj, layer.mlp, "act_fn") for layer in model.model.layers]


@torch.no_grad()
def sparsify(model, arch: str, s: float, v_prime: float = 0.7) -> eoc.Prescription:
    """CReLU with the EoC tau and m for sparsity `s`; first projections at variance q*."""
    p = eoc.prescribe("crelu", s, 1.0, v_prime=v_prime)
    for proj, owner, attr in _mlps(model, arch):
        setattr(owner, attr, ClippedReLU(p.tau, p.m))
        fan_in = proj.weight.shape[1]
        sb2 = p.sigma_b2 if proj.bias is not None else 0.0
        proj.weight.normal_(0.0, math.sqrt(max(p.q_star - sb2, 1e-12) / fan_in))
        if proj.bias is not None:
            proj.bias.normal_(0.0, math.sqrt(p.sigma_b2))
    return p


def batches(tokens: torch.Tensor, seq: int, batch: int, g: torch.Generator):
    while True:
        start = torch.randint(0, len(tokens) - seq - 1, (batch,), generator=g)
        yield torch.stack([tokens[i:i + seq] for i in start.tolist()])


@torch.no_grad()
def perplexity(model, val: torch.Tensor, seq: int, n: int) -> float:
    model.eval()
    chunks = val[:n * seq].view(n, seq)
    losses = [float(model(input_ids=c[None], labels=c[None]).loss) for c in chunks]
    return math.exp(statistics.fmean(losses))


def sparsity(model, val: torch.Tensor, seq: int) -> float:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rows = dormant.diagnose(model, {"input_ids": val[:16 * seq].view(16, seq)}).rows
    return sum(r.sparsity * r.units for r in rows) / sum(r.units for r in rows)


@torch.inference_mode()
def decode_ratio(model, prompt: torch.Tensor, tokens: int, rounds: int = 3) -> float:
    """Greedy decode tokens/s under sparse_inference over dense (interleaved, medians)."""
    model.eval()

    def run():
        t = time.perf_counter()
        model.generate(prompt, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False,
                       pad_token_id=0)
        return time.perf_counter() - t
    dense, sparse = [], []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        handle = dormant.sparse_inference(model, {"input_ids": prompt})
    handle.remove()
    for _ in range(rounds):
        dense.append(run())
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            handle = dormant.sparse_inference(model, {"input_ids": prompt})
        try:
            sparse.append(run())
        finally:
            handle.remove()
    return statistics.median(dense) / statistics.median(sparse)


def train_one(arch: str, variant: str, seed: int, train, val, args) -> dict:
    torch.manual_seed(seed)
    model = build(arch, args.d, args.layers, args.seq)
    target = VARIANTS[variant]
    if target is not None:
        sparsify(model, arch, target)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, args.lr, total_steps=args.steps,
                                                pct_start=0.1)
    g = torch.Generator().manual_seed(seed)
    stream = batches(train, args.seq, args.batch, g)
    model.train()
    t0 = time.perf_counter()
    for step in range(args.steps):
        x = next(stream)
        loss = model(input_ids=x, labels=x).loss
        if not torch.isfinite(loss):
            return {"arch": arch, "variant": variant, "seed": seed, "diverged": step}
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
    return {"arch": arch, "variant": variant, "seed": seed,
            "val_ppl": perplexity(model, val, args.seq, args.eval_seqs),
            "sparsity": sparsity(model, val, args.seq),
            "decode_x": decode_ratio(model, val[:16][None], args.decode_tokens),
            "train_s": time.perf_counter() - t0}


def table(results: list[dict]) -> str:
    from dormant.tables import Column, Stat, Table, mean_std
    t = Table([Column("model", align="left"), Column("activation", align="left"), "seeds",
               Column("val perplexity", fmt="{:.3f}"),
               Column("Δ vs ReLU (paired)", fmt="{:.3f}", sign=True),
               Column("sparsity %", fmt="{:.1f}"), Column("decode × dense", fmt="{:.2f}")])
    for arch in ("opt", "llama"):
        base = {r["seed"]: r["val_ppl"] for r in results
                if r["arch"] == arch and r["variant"] == "ReLU" and "val_ppl" in r}
        for variant in VARIANTS:
            rs = [r for r in results if r["arch"] == arch and r["variant"] == variant]
            ok = [r for r in rs if "val_ppl" in r]
            if not rs:
                continue
            stat = lambda xs: Stat(*mean_std(xs), len(xs)) if xs else None
            delta = [r["val_ppl"] - base[r["seed"]] for r in ok if r["seed"] in base]
            t.add("OPT-style" if arch == "opt" else "Llama-style (gated)",
                  variant + (f" ({len(rs) - len(ok)} diverged)" if len(ok) < len(rs) else ""),
                  len(ok), stat([r["val_ppl"] for r in ok]),
                  stat(delta) if variant != "ReLU" else None,
                  stat([100 * r["sparsity"] for r in ok]), stat([r["decode_x"] for r in ok]))
    return t.to_markdown()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--archs", default="opt,llama")
    p.add_argument("--d", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--megabytes", type=float, default=4.0)
    p.add_argument("--eval-seqs", type=int, default=64)
    p.add_argument("--decode-tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--pages-only", action="store_true", help="rewrite the page from results.json")
    p.add_argument("--out", default=str(OUT.parent), help="where results go (its sparse_lm/ "
                                                          "folder; results.md beside it)")
    p.add_argument("--root", help="unused: this script keeps no run directories")
    args = p.parse_args()
    if args.quick:
        args.seeds, args.steps, args.eval_seqs, args.decode_tokens = "0", 30, 8, 8
    out = Path(args.out) / "sparse_lm"
    path = out / "results.json"
    if not args.pages_only:
        torch.set_num_threads(args.threads)
        tokens, digest = corpus(args.megabytes)
        cut = int(0.9 * len(tokens))
        train, val = tokens[:cut], tokens[cut:]
        results = []
        for seed in [int(s) for s in args.seeds.split(",")]:
            for arch in args.archs.split(","):
                for variant in VARIANTS:
                    r = train_one(arch, variant, seed, train, val, args)
                    results.append(r)
                    print(json.dumps(r), flush=True)
        if args.quick:
            print(table(results))
            return
        out.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({
            "command": " ".join(["python", "reproduce/sparse_lm.py", *sys.argv[1:]]),
            "python": sys.version.split()[0], "corpus_sha256": digest,
            "corpus_bytes": len(tokens), "torch": torch.__version__,
            "options": {k: v for k, v in vars(args).items()
                        if k not in ("pages_only", "out", "root")},
            "results": results}, indent=1))
    saved = json.loads(path.read_text())
    text = table(saved["results"])
    print(text)
    write_block(Path(args.out).parent / "results.md", "sparse_lm", text)


if __name__ == "__main__":
    main()
