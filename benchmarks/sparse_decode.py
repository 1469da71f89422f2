"""Greedy decode with a KV cache: dense vs compacted vs sparse vs both, interleaved in one run.

OPT-style (fc1 -> ReLU -> fc2, F = 4d) and Llama-style (gated ReLU, F = 8/3 d) decoders built
from config (nothing downloaded), at the activation sparsity of a random init and at planted
sparsities (default: init, 85% and 90% of a token's units exactly zero), with a share of units dead
on every token (`--dead`, default 25%: what `dormant.compact` removes). Variants:

    dense      the model as built
    compacted  `dormant.compact` on a probe of prompts (dead units removed)
    sparse     `dormant.sparse_inference` (consumers over the active units)
    both       compacted, then sparse

Prints, per model and sparsity: decode tokens/s (median over interleaved rounds) and the
ratio to dense (median over rounds of the ratio within a round), the MLP blocks alone (the
time the same decodes spent in them, timed by hooks around each layer's block), and next to
each ratio its bytes-read limit
(docs: ../shared/specs/sparse-inference.md §2): an OPT block must still read all of fc1
(2 / (2 - s) at sparsity s), a gated block all of `gate` (3 / (1 + 2 (1 - s))); whole-model
decode also reads attention and the LM head. At batch b a decode step reads, at best, the rows
of the units active in any of its b tokens (1 - s becomes that share, measured on the probe):
batch 4 and 16 show how the gain shrinks and where the dense product takes over.

    python benchmarks/sparse_decode.py                       # d = 2048, 4 layers, 128 tokens
    python benchmarks/sparse_decode.py --quick               # a smoke run (d = 256)
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import time
import warnings

import torch

import dormant
from dormant.rundir import machine


def build(arch: str, d: int, layers: int, vocab: int):
    import transformers as tf
    torch.manual_seed(0)
    heads = max(1, d // 64)
    if arch == "opt":
        cfg = tf.OPTConfig(vocab_size=vocab, hidden_size=d, ffn_dim=4 * d, num_hidden_layers=layers,
                           num_attention_heads=heads, word_embed_proj_dim=d,
                           max_position_embeddings=512, activation_function="relu")
        model = tf.OPTForCausalLM(cfg)
    else:
        cfg = tf.LlamaConfig(vocab_size=vocab, hidden_size=d, intermediate_size=(8 * d) // 3,
                             num_hidden_layers=layers, num_attention_heads=heads,
                             num_key_value_heads=heads, hidden_act="relu", mlp_bias=True,
                             bos_token_id=0, eos_token_id=0, pad_token_id=0)
        model = tf.LlamaForCausalLM(cfg)
    return model.eval()


def _producers(model, arch: str):
    if arch == "opt":
        return [layer.fc1 for layer in model.model.decoder.layers]
    return [layer.mlp.gate_proj for layer in model.model.layers]


@torch.no_grad()
def outputs(model, modules, prompts) -> list[torch.Tensor]:
    """What each of `modules` outputs on `prompts`, as (tokens, width)."""
    seen = []
    hooks = [m.register_forward_hook(lambda m, i, o: seen.append(o.reshape(-1, o.shape[-1])))
             for m in modules]
    try:
        model(prompts)
    finally:
        for h in hooks:
            h.remove()
    return seen


@torch.no_grad()
def plant(model, arch: str, prompts, sparsity: float | None, dead: float) -> None:
    """Biases that make a share `dead` of each layer's units dead on every token and, of the
    rest, enough zero per token for a total `sparsity` (layer by layer, on `prompts`)."""
    g = torch.Generator().manual_seed(0)
    for producer in _producers(model, arch):
        units = producer.out_features
        n_dead = int(dead * units)
        which = torch.randperm(units, generator=g)[:n_dead]
        (pre,) = outputs(model, [producer], prompts)
        live = torch.ones(units, dtype=torch.bool)
        live[which] = False
        if sparsity is not None:
            zero_live = 1 - (1 - sparsity) / (1 - dead)
            q = torch.quantile(pre[:, live].flatten().float(), zero_live)
            producer.bias[live] -= q
        producer.bias[which] = -1e4


@torch.no_grad()
def measured_sparsity(model, prompts) -> float:
    rows = dormant.diagnose(model, {"input_ids": prompts}).rows
    return sum(r.sparsity * r.units for r in rows) / sum(r.units for r in rows)


def _acts(model, arch: str):
    if arch == "opt":
        return [layer.activation_fn for layer in model.model.decoder.layers]
    return [layer.mlp.act_fn for layer in model.model.layers]


def active_share(outs: list[torch.Tensor], batch: int, groups: int = 64) -> float:
    """The share of a layer's units active in at least one of `batch` tokens (the rows the
    sparse path must read at least once per decode step), from each layer's activity on the
    probe tokens (`outs`: (tokens, units) booleans), over random groups of its tokens,
    averaged over groups and layers."""
    if batch == 1:                                   # exactly: 1 - the measured sparsity
        shares = [on.float().mean() for on in outs]
    else:
        g = torch.Generator().manual_seed(2)
        shares = [on[torch.randperm(on.shape[0], generator=g)[:batch]].any(0).float().mean()
                  for on in outs for _ in range(groups)]
    return float(torch.stack(shares).mean())


def limits(arch: str, d: int, f: int, layers: int, vocab: int, active: float,
           dead: float) -> dict:
    """Bytes of weights read per decode step, dense / variant, for the MLP block and the
    model; `active`: the share of units active in any token of the step."""
    mats = 2 if arch == "opt" else 3
    attn = 4 * d * d
    head = vocab * d

    def mlp(compacted: bool, sparse: bool) -> float:
        width = f * (1 - dead) if compacted else f
        act = f * active                          # rows of units active in the step's tokens
        first = width * d                         # fc1 / gate: read whole
        rest = (mats - 1) * (act if sparse else width) * d
        return first + rest
    out = {}
    for name, c, sp in (("compacted", True, False), ("sparse", False, True), ("both", True, True)):
        out[name] = (mlp(False, False) / mlp(c, sp),
                     (layers * (attn + mlp(False, False)) + head)
                     / (layers * (attn + mlp(c, sp)) + head))
    return out


@torch.inference_mode()
def decode(model, prompts, tokens: int):
    return model.generate(prompts, max_new_tokens=tokens, min_new_tokens=tokens,
                          do_sample=False, use_cache=True, pad_token_id=0)


def variants(model, probe):
    """dense, compacted, sparse, both (handles kept alive)."""
    out = {"dense": (model, None)}
    comp = copy.deepcopy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = dormant.compact(comp, {"input_ids": probe})
        sparse = copy.deepcopy(model)
        h1 = dormant.sparse_inference(sparse, {"input_ids": probe[:1]})
        both = copy.deepcopy(comp)
        h2 = dormant.sparse_inference(both, {"input_ids": probe[:1]})
    out["compacted"] = (comp, report)
    out["sparse"] = (sparse, h1)
    out["both"] = (both, h2)
    return out


class BlockClock:
    """Seconds spent in the MLP blocks of every layer during a decode: fc1 -> activation -> fc2
    (OPT-style) or the gated MLP module, timed by hooks around them, inside the decode itself
    (the caches and the interpreter as a decode leaves them; the hooks cost both variants
    alike)."""

    def __init__(self, model, arch: str):
        if arch == "opt":
            pairs = [(layer.fc1, layer.fc2) for layer in model.model.decoder.layers]
        else:
            pairs = [(layer.mlp, layer.mlp) for layer in model.model.layers]
        self.seconds, self._start, self._handles = 0.0, 0.0, []
        for first, last in pairs:
            self._handles.append(first.register_forward_pre_hook(self._enter))
            self._handles.append(last.register_forward_hook(self._leave))

    def _enter(self, module, args) -> None:
        self._start = time.perf_counter()

    def _leave(self, module, args, out) -> None:
        self.seconds += time.perf_counter() - self._start

    def close(self) -> None:
        for h in self._handles:
            h.remove()


def timed_decode(model, arch: str, prompts, tokens: int) -> tuple[float, float]:
    """(seconds of the whole decode, seconds of it spent in the MLP blocks)."""
    clock = BlockClock(model, arch)
    try:
        t = time.perf_counter()
        decode(model, prompts, tokens)
        return time.perf_counter() - t, clock.seconds
    finally:
        clock.close()


def _paired(times: dict, v: str) -> float:
    """Median over rounds of dense time / variant time, both measured in the same round
    (a drift of the machine's speed between rounds cancels)."""
    return statistics.median(d / t for d, t in zip(times["dense"], times[v]))


def run(args) -> list[str]:
    torch.set_num_threads(args.threads)
    lines = [f"machine: {machine(args.threads)}",
             f"d = {args.d}, {args.layers} layers, vocab {args.vocab}, {args.tokens} tokens "
             f"greedy with a KV cache, {args.rounds} interleaved rounds (ratios: median of the "
             f"rounds' ratios), dead units {args.dead:.0%}; MLP block: the time spent in the "
             f"MLP blocks of every layer within the same decodes", ""]
    head = ("| model | sparsity (measured) | batch | variant | tokens/s | × dense (limit) | "
            "MLP block × dense (limit) |")
    lines += [head, "|---|---|---:|---|---:|---:|---:|"]
    print("\n".join(lines), flush=True)
    g = torch.Generator().manual_seed(1)
    for arch in args.archs.split(","):
        for level in args.sparsities:
            model = build(arch, args.d, args.layers, args.vocab)
            probe = torch.randint(1, args.vocab, (16, 32), generator=g)
            plant(model, arch, probe, level, args.dead if level is not None else 0.0)
            s = measured_sparsity(model, probe)
            f = _producers(model, arch)[0].out_features
            on = [o != 0 for o in outputs(model, _acts(model, arch), probe)]
            vs = variants(model, probe)
            for batch in args.batches:
                lim = limits(arch, args.d, f, args.layers, args.vocab,
                             active_share(on, batch), args.dead if level else 0)
                prompts = torch.randint(1, args.vocab, (batch, 16), generator=g)
                times = {v: [] for v in vs}
                block = {v: [] for v in vs}
                for _ in range(args.rounds):               # interleaved
                    for v, (m, _) in vs.items():
                        whole, mlp = timed_decode(m, arch, prompts, args.tokens)
                        times[v].append(whole)
                        block[v].append(mlp)
                for v in vs:
                    t = statistics.median(times[v])
                    lm = (f" ({lim[v][1]:.2f})" if v in lim else "")
                    lb = (f" ({lim[v][0]:.2f})" if v in lim else "")
                    row = (f"| {arch} | {'init' if level is None else f'{level:.0%}'} "
                           f"({s:.1%}) | {batch} | {v} | {batch * args.tokens / t:.1f} | "
                           f"{_paired(times, v):.2f}{lm} | {_paired(block, v):.2f}{lb} |")
                    lines.append(row)
                    print(row, flush=True)
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--d", type=int, default=2048, help="hidden width (default 2048)")
    p.add_argument("--layers", type=int, default=4, help="decoder layers (default 4)")
    p.add_argument("--vocab", type=int, default=4096, help="vocabulary size (default 4096)")
    p.add_argument("--tokens", type=int, default=128, help="tokens decoded (default 128)")
    p.add_argument("--rounds", type=int, default=3,
                   help="interleaved rounds; ratios are the median of theirs (default 3)")
    p.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1),
                   help="torch threads (default: 2, or fewer cores)")
    p.add_argument("--dead", type=float, default=0.25,
                   help="share of units dead on every token (default 0.25)")
    p.add_argument("--archs", default="opt,llama",
                   help="opt (fc1 -> ReLU -> fc2) and/or llama (gated ReLU), comma-separated")
    p.add_argument("--sparsities", default="init,0.85,0.9",
                   help="planted zeros per token, comma-separated; init: none planted "
                        "(default init,0.85,0.9)")
    p.add_argument("--batches", default="1,4,16", help="batch sizes, comma-separated (default 1,4,16)")
    p.add_argument("--out", help="also write the table to this file")
    p.add_argument("--quick", action="store_true",
                   help="a smoke run: d = 256, 2 layers, 16 tokens, 90%% sparsity, batch 1, "
                        "one round")
    args = p.parse_args()
    if args.quick:
        args.d, args.layers, args.tokens, args.rounds = 256, 2, 16, 1
        args.sparsities, args.batches = "0.9", "1"
    args.sparsities = [None if x == "init" else float(x) for x in args.sparsities.split(",")]
    args.batches = [int(b) for b in args.batches.split(",")]
    lines = run(args)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
