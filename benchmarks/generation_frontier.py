"""Speed-quality frontier of MDM samplers against KV-cached ARM decoding.

The script runs each MDM sampler at several step counts, and the ARM with and
without its KV cache. For each it measures tokens/s, generative perplexity under
a separately trained judge ARM, and the mean unigram entropy of the samples (low
entropy flags repetitive text). It also times Hugging Face transformers' generate on a
LlamaForCausalLM that holds the same ARM weights, and measures how often the
approximate MDM caches reproduce the uncached tokens.

Prompts are the first --prompt-len tokens of validation windows; every run
generates --new-tokens tokens per prompt without stopping at EOS, so all rows
have equal length.

Run (from the repository root):
  MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=100000000000 PYTHONPATH=src python benchmarks/generation_frontier.py \\
      --mdm runs/quickstart/mdm --arm runs/quickstart/arm --judge runs/judge-arm --data runs/quickstart/data

On a GPU add `--device cuda --dtype bfloat16`. Timers wait for the device before
they read the clock.
NOTE: no GPU has run this script yet. Only --device cpu, in float32 and in bfloat16, has run.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import time
from pathlib import Path

import numpy as np
import torch

from smdm.checkpoint import load_model
from smdm.data.shards import TokenData, eval_windows
from smdm.generate import SampleConfig, generate
from smdm.model import Transformer


# Samples whose unigram entropy falls below this share of the validation text's are counted as degenerate.
ENTROPY_FLOOR = 0.9


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mdm", help="MDM checkpoint or run folder")
    parser.add_argument("--arm", help="ARM checkpoint or run folder of the same size and compute")
    parser.add_argument("--judge", help="larger ARM that scores the samples")
    parser.add_argument("--data", help="prepared data folder (validation split gives the prompts)")
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=96)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--batches", type=int, default=2, help="prompt batches per configuration")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--repeats", type=int, default=3, help="alternating timed runs of smdm and HF generate")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                        help="weights of the MDM, the ARM and the HF copy (the judge always scores in float32)")
    parser.add_argument("--out", default="benchmarks/results/generation_frontier.json")
    parser.add_argument("--plot", default="docs/generation_frontier.png")
    parser.add_argument("--merge", nargs="+", default=None,
                        help="results JSONs of repeated runs to combine into --out (fastest tokens/s of each)")
    parser.add_argument("--replot", default=None, help="redraw the plot from a results JSON without measuring")
    args = parser.parse_args()
    missing = [f"--{name}" for name in ("mdm", "arm", "judge", "data") if getattr(args, name) is None]
    if missing and not (args.replot or args.merge):
        parser.error(f"missing {', '.join(missing)}; give all four, --merge RESULTS_JSON ..., or --replot RESULTS_JSON")
    return args


# Hugging Face reference model.
def to_hf_llama(model: Transformer):
    """Build a transformers LlamaForCausalLM holding the same weights as an smdm ARM."""
    from transformers import LlamaConfig, LlamaForCausalLM

    c = model.config
    hf_config = LlamaConfig(
        vocab_size=c.vocab_size, hidden_size=c.n_embd, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.n_layer, num_attention_heads=c.n_head, num_key_value_heads=c.n_head,
        max_position_embeddings=c.block_size, rms_norm_eps=c.norm_eps, rope_theta=c.rope_base,
        hidden_act="silu", tie_word_embeddings=False, attention_bias=False, mlp_bias=False,
    )
    hf = LlamaForCausalLM(hf_config)
    state = {"model.embed_tokens.weight": model.wte.weight, "model.norm.weight": model.norm_f.weight,
             "lm_head.weight": model.lm_head.weight}
    for i, block in enumerate(model.blocks):
        prefix = f"model.layers.{i}."
        q, k, v = block.attn.qkv.weight.chunk(3, dim=0)  # rows: all q, then all k, then all v
        state.update({
            prefix + "self_attn.q_proj.weight": q, prefix + "self_attn.k_proj.weight": k,
            prefix + "self_attn.v_proj.weight": v, prefix + "self_attn.o_proj.weight": block.attn.proj.weight,
            prefix + "mlp.gate_proj.weight": block.mlp.gate.weight, prefix + "mlp.up_proj.weight": block.mlp.up.weight,
            prefix + "mlp.down_proj.weight": block.mlp.down.weight,
            prefix + "input_layernorm.weight": block.norm_1.weight,
            prefix + "post_attention_layernorm.weight": block.norm_2.weight,
        })
    missing, unexpected = hf.load_state_dict({k: v.detach().clone() for k, v in state.items()}, strict=False)
    missing = [m for m in missing if "rotary" not in m]
    if missing or unexpected:
        raise RuntimeError(f"weight mapping incomplete: missing {missing}, unexpected {unexpected}")
    return hf.eval()


# Quality metrics.
@torch.no_grad()
def generative_perplexity(judge: Transformer, prompts: torch.Tensor, samples: torch.Tensor) -> tuple[float, float]:
    """Return the judge's summed NLL (nats) of the samples given their prompts, and the token count."""
    device = next(judge.parameters()).device
    sequence = torch.cat([prompts, samples], dim=1).to(device)  # (B, P + G)
    logits = judge(sequence[:, :-1]).float()
    targets = sequence[:, 1:]
    nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, reduction="none")  # (B, P + G - 1)
    generated = nll[:, prompts.size(1) - 1 :]
    return generated.sum().item(), generated.numel()


def unigram_entropy(samples: torch.Tensor) -> float:
    """Mean over samples of the entropy (nats) of each sample's own token frequencies."""
    entropies = []
    for row in samples.tolist():
        counts = np.bincount(row).astype(np.float64)
        p = counts[counts > 0] / len(row)
        entropies.append(float(-(p * np.log(p)).sum()))
    return float(np.mean(entropies))


# Runs.
def synchronize(model) -> None:
    """Wait for the model's device, so that a timer read after it includes all queued GPU work."""
    device = next(model.parameters()).device
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_generate(model, prompts: list[torch.Tensor], config: SampleConfig, pad_id: int) -> tuple[torch.Tensor, float]:
    """Generate for every prompt batch; return the samples (N, G) and the seconds spent generating."""
    generate(model, prompts[0][:1].tolist(), config, pad_id=pad_id)  # warm-up
    outputs, seconds = [], 0.0
    for batch_index, batch in enumerate(prompts):
        rows = range(batch_index * len(batch), (batch_index + 1) * len(batch))
        synchronize(model)
        start = time.perf_counter()
        new = generate(model, batch, config, pad_id=pad_id, row_seeds=rows)
        synchronize(model)
        seconds += time.perf_counter() - start
        outputs.append(torch.tensor(new))
    return torch.cat(outputs), seconds


@torch.no_grad()
def time_hf(
    hf, prompts: list[torch.Tensor], new_tokens: int, cache_implementation: str | None
) -> tuple[torch.Tensor, float]:
    """Run HF generate greedily on every prompt batch; return the new tokens (N, G) and the seconds spent."""
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0,
                  eos_token_id=None)
    if cache_implementation and cache_implementation != "dynamic":
        kwargs["cache_implementation"] = cache_implementation
    device = next(hf.parameters()).device
    hf.generate(prompts[0][:1].to(device), **kwargs)  # warm-up
    outputs, seconds = [], 0.0
    for batch in prompts:
        batch = batch.to(device)
        synchronize(hf)
        start = time.perf_counter()
        out = hf.generate(batch, attention_mask=torch.ones_like(batch), **kwargs)
        synchronize(hf)
        seconds += time.perf_counter() - start
        outputs.append(out[:, batch.size(1) :].cpu())
    return torch.cat(outputs), seconds


def compare_with_hf(arm, hf, prompts: list[torch.Tensor], new_tokens: int, pad_id: int, repeats: int) -> list[dict]:
    """Time greedy smdm ARM decoding and HF generate in alternation; keep each one's fastest of `repeats` runs.

    Alternating and taking the minimum keeps load from other processes from favouring either side.
    """
    greedy = SampleConfig(max_new_tokens=new_tokens, temperature=0.0, stop_at_eos=False)
    best = {"smdm": math.inf, "dynamic": math.inf, "static": math.inf}
    tokens = {}
    errors = {}
    for _ in range(repeats):
        tokens["smdm"], seconds = timed_generate(arm, prompts, greedy, pad_id)
        best["smdm"] = min(best["smdm"], seconds)
        for implementation in ("dynamic", "static"):
            if implementation in errors:
                continue
            try:
                tokens[implementation], seconds = time_hf(hf, prompts, new_tokens, implementation)
            except Exception as error:  # noqa: BLE001 - record a cache kind this transformers version rejects
                errors[implementation] = repr(error)
                continue
            best[implementation] = min(best[implementation], seconds)
    count = tokens["smdm"].numel()
    points = [{"name": "smdm ARM greedy (KV cache)", "tokens_per_s": count / best["smdm"]}]
    for implementation in ("dynamic", "static"):
        name = f"HF generate greedy ({implementation} cache)"
        if implementation in errors:
            points.append({"name": name, "error": errors[implementation]})
            continue
        points.append({"name": name, "tokens_per_s": count / best[implementation],
                       "same_tokens_as_smdm": (tokens[implementation] == tokens["smdm"]).double().mean().item()})
    return points


def mdm_configs(new_tokens: int, temperature: float) -> list[tuple[str, dict]]:
    configs = []
    for steps in (12, 24, 48, 96):
        configs.append((f"random/{steps}", dict(sampler="random", steps=steps)))
    for steps in (12, 24, 48, 96):
        configs.append((f"low_confidence/{steps}", dict(sampler="low_confidence", steps=steps)))
    for steps in (12, 24, 48, 96):
        blocks = dict(sampler="low_confidence", steps=steps, block_length=32)
        configs.append((f"low_confidence+blocks32/{steps}", blocks))
    for threshold in (0.9, 0.5, 0.2, 0.1):
        configs.append((f"threshold{threshold}+blocks32", dict(sampler="threshold", threshold=threshold,
                                                                steps=new_tokens, block_length=32)))
    for cache in ("prefix", "dual"):
        for steps in (24, 48, 96):
            configs.append((f"low_confidence+blocks32+{cache}/{steps}",
                            dict(sampler="low_confidence", steps=steps, block_length=32, cache=cache)))
        configs.append((f"threshold0.2+blocks32+{cache}", dict(sampler="threshold", threshold=0.2,
                                                                steps=new_tokens, block_length=32, cache=cache)))
    return [(name, {**c, "temperature": temperature, "max_new_tokens": new_tokens, "stop_at_eos": False})
            for name, c in configs]


def cache_agreement(model, prompts: list[torch.Tensor], new_tokens: int, pad_id: int) -> list[dict]:
    """Share of tokens and of whole rows that the cached samplers reproduce from the uncached one (greedy)."""
    results = []
    for sampler, extra in (("low_confidence", {"steps": 48}), ("threshold", {"steps": new_tokens, "threshold": 0.5})):
        base = dict(sampler=sampler, temperature=0.0, max_new_tokens=new_tokens, block_length=32, stop_at_eos=False,
                    **extra)
        reference, _ = timed_generate(model, prompts, SampleConfig(**base), pad_id)
        for cache in ("prefix", "dual"):
            cached, _ = timed_generate(model, prompts, SampleConfig(**base, cache=cache), pad_id)
            results.append({"sampler": sampler, **extra, "cache": cache,
                            "token_agreement": (cached == reference).double().mean().item(),
                            "row_agreement": (cached == reference).all(dim=1).double().mean().item()})
    return results


def speed_at_arm_perplexity(points: list[dict], arm: dict, min_entropy: float) -> dict:
    """Interpolate the MDM frontier's tokens/s at the ARM's generative perplexity (log-log, between neighbours).

    Points whose mean unigram entropy is below min_entropy are left out: repetitive
    text scores a low perplexity without being good text.
    """
    frontier = sorted((p for p in points if p["kind"] == "mdm" and p["unigram_entropy"] >= min_entropy),
                      key=lambda p: p["gen_ppl"])
    best, target = [], arm["gen_ppl"]
    for p in frontier:  # keep the Pareto front: faster than every point of lower perplexity
        if not best or p["tokens_per_s"] > best[-1]["tokens_per_s"]:
            best.append(p)
    below = [p for p in best if p["gen_ppl"] <= target]
    above = [p for p in best if p["gen_ppl"] > target]
    if not below:
        return {"reachable": False, "best_mdm_gen_ppl": best[0]["gen_ppl"] if best else None}
    lo = below[-1]
    if not above:
        speed = lo["tokens_per_s"]
    else:
        hi = above[0]
        w = (math.log(target) - math.log(lo["gen_ppl"])) / (math.log(hi["gen_ppl"]) - math.log(lo["gen_ppl"]))
        speed = math.exp((1 - w) * math.log(lo["tokens_per_s"]) + w * math.log(hi["tokens_per_s"]))
    # Any Pareto point at or below the target perplexity is at least as good, so take the fastest of them.
    speed = max(speed, max(p["tokens_per_s"] for p in below))
    return {"reachable": True, "mdm_tokens_per_s": speed, "ratio": speed / arm["tokens_per_s"]}


def plot(points: list[dict], hf_points: list[dict], reference: dict, min_entropy: float, path: Path) -> None:
    """Draw generative perplexity against tokens/s; hollow markers are samples below the entropy floor."""
    import re

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    fig, ax = plt.subplots(figsize=(9, 6))
    families: dict[str, list[dict]] = {}
    for p in points:
        family = re.sub(r"threshold[0-9.]+", "threshold", p["name"].split("/")[0]) if p["kind"] == "mdm" else p["name"]
        families.setdefault(family, []).append(p)
    colors = plt.get_cmap("tab20").colors
    handles = []
    for index, (family, members) in enumerate(families.items()):
        members = sorted(members, key=lambda p: p["tokens_per_s"])
        color = colors[index % len(colors)]
        is_arm = members[0]["kind"] == "arm"
        linestyle = "-" if len(members) > 1 else "none"
        marker = "*" if is_arm else "o"
        ax.plot([p["tokens_per_s"] for p in members], [p["gen_ppl"] for p in members], color=color, linestyle=linestyle)
        handles.append(Line2D([], [], color=color, marker=marker, linestyle=linestyle, label=family))
        for p in members:
            degenerate = p["unigram_entropy"] < min_entropy
            ax.plot(p["tokens_per_s"], p["gen_ppl"], marker=marker, markersize=14 if is_arm else 6,
                    color=color, markerfacecolor="none" if degenerate else color)
    ax.axhline(reference["gen_ppl"], color="black", linestyle="--", linewidth=1)
    handles.append(Line2D([], [], color="black", linestyle="--", label="validation text (real continuations)"))
    for p in hf_points:
        ax.axvline(p["tokens_per_s"], color="grey", linestyle=":", linewidth=1)
        ax.text(p["tokens_per_s"], ax.get_ylim()[1], f" {p['name']}", rotation=90, va="top", fontsize=7, color="grey")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("tokens/s (log)")
    ax.set_ylabel("generative perplexity under the judge ARM (log)")
    ax.set_title("MDM samplers vs ARM decoding, tiny-0.8M models of equal compute\n"
                 "(temperature 1; hollow: unigram entropy below the floor, i.e. repetitive text)", fontsize=10)
    ax.legend(handles=handles, fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def merge_runs(runs: list[dict]) -> dict:
    """Combine repeated runs: every configuration keeps its fastest tokens/s, as the least disturbed by other load.

    The samples are seeded, so the runs must agree on every generative perplexity; a mismatch raises.
    """
    merged = json.loads(json.dumps(runs[-1]))
    for point in merged["points"] + [p for p in merged["hf"] if "tokens_per_s" in p]:
        for run in runs:
            twin = next(p for p in run["points"] + run["hf"] if p["name"] == point["name"])
            if "gen_ppl" in point and not math.isclose(twin["gen_ppl"], point["gen_ppl"], rel_tol=1e-9):
                raise ValueError(f"runs disagree on the samples of {point['name']}; rerun with the same settings")
            point["tokens_per_s"] = max(point["tokens_per_s"], twin.get("tokens_per_s", 0.0))
    arm_point = next(p for p in merged["points"] if p["name"] == "ARM (KV cache)")
    min_entropy = merged["speed_ratio_at_arm_gen_ppl"]["min_unigram_entropy"]
    merged["speed_ratio_at_arm_gen_ppl"] = {"min_unigram_entropy": min_entropy,
                                            **speed_at_arm_perplexity(merged["points"], arm_point, min_entropy)}
    merged["speed_ratio_without_entropy_floor"] = speed_at_arm_perplexity(merged["points"], arm_point, 0.0)
    merged["merged_from"] = [run["date"] for run in runs]
    return merged


def main() -> None:
    args = parse_args()
    if args.merge:
        result = merge_runs([json.loads(Path(path).read_text(encoding="utf-8")) for path in args.merge])
        Path(args.out).write_text(json.dumps(result, indent=2), encoding="utf-8")
        args.replot = args.out
    if args.replot:
        result = json.loads(Path(args.replot).read_text(encoding="utf-8"))
        plot(result["points"], [p for p in result["hf"] if "tokens_per_s" in p], result["validation_text"],
             result["speed_ratio_at_arm_gen_ppl"]["min_unigram_entropy"], Path(args.plot))
        return
    torch.set_num_threads(args.threads)
    data = TokenData(args.data)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    mdm, tokenizer, _ = load_model(args.mdm, device)
    arm, arm_tokenizer, _ = load_model(args.arm, device)
    judge, judge_tokenizer, _ = load_model(args.judge, device)
    mdm, arm = mdm.to(dtype), arm.to(dtype)
    if not (tokenizer.identity == arm_tokenizer.identity == judge_tokenizer.identity == data.tokenizer.identity):
        raise ValueError("the MDM, ARM, judge and data must share one tokenizer")
    window = args.prompt_len + args.new_tokens
    windows = torch.from_numpy(eval_windows(data.split("val"), window, args.batch_size * args.batches).astype(np.int64))
    prompts = list(windows[:, : args.prompt_len].split(args.batch_size))
    all_prompts = windows[:, : args.prompt_len]
    pad_id = tokenizer.pad_id

    points = []

    def record(name: str, kind: str, samples: torch.Tensor, seconds: float, extra: dict | None = None) -> None:
        nll, count = generative_perplexity(judge, all_prompts, samples)
        point = {"name": name, "kind": kind, "tokens_per_s": samples.numel() / seconds,
                 "gen_ppl": math.exp(nll / count), "unigram_entropy": unigram_entropy(samples), **(extra or {})}
        points.append(point)
        print(json.dumps(point), flush=True)

    # The reference: real continuations from the validation split.
    reference = windows[:, args.prompt_len :]
    nll, count = generative_perplexity(judge, all_prompts, reference)
    data_point = {"gen_ppl": math.exp(nll / count), "unigram_entropy": unigram_entropy(reference)}
    print("validation text:", json.dumps(data_point), flush=True)

    arm_common = dict(max_new_tokens=args.new_tokens, temperature=args.temperature, stop_at_eos=False)
    for cache in ("auto", "none"):
        samples, seconds = timed_generate(arm, prompts, SampleConfig(**arm_common, cache=cache), pad_id)
        record("ARM (KV cache)" if cache == "auto" else "ARM (no cache)", "arm", samples, seconds)
    for name, settings in mdm_configs(args.new_tokens, args.temperature):
        samples, seconds = timed_generate(mdm, prompts, SampleConfig(**settings), pad_id)
        record(name, "mdm", samples, seconds, {"steps": settings["steps"]})

    # Hugging Face transformers generate on the same ARM weights (greedy, both sides).
    hf = to_hf_llama(arm).to(device, dtype)
    probe = all_prompts[:2].to(device)
    with torch.no_grad():
        logit_gap = (hf(probe).logits.float() - arm(probe).float()).abs().max().item()
    hf_points = compare_with_hf(arm, hf, prompts, args.new_tokens, pad_id, args.repeats)
    for p in hf_points:
        print(json.dumps(p), flush=True)

    agreement = cache_agreement(mdm, prompts, args.new_tokens, pad_id)
    for row in agreement:
        print(json.dumps(row), flush=True)

    arm_point = next(p for p in points if p["name"] == "ARM (KV cache)")
    min_entropy = ENTROPY_FLOOR * data_point["unigram_entropy"]
    ratio = {"min_unigram_entropy": min_entropy, **speed_at_arm_perplexity(points, arm_point, min_entropy)}
    ratio_any = speed_at_arm_perplexity(points, arm_point, 0.0)
    print("the same without the entropy floor:", json.dumps(ratio_any), flush=True)
    print("MDM/ARM speed at the ARM's generative perplexity:", json.dumps(ratio), flush=True)

    result = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "torch": torch.__version__, "threads": args.threads, "args": vars(args), "validation_text": data_point,
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "points": points, "hf": hf_points, "hf_max_logit_gap": logit_gap, "cache_agreement": agreement,
        "speed_ratio_at_arm_gen_ppl": ratio, "speed_ratio_without_entropy_floor": ratio_any,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2), encoding="utf-8")
    plot(points, [p for p in hf_points if "tokens_per_s" in p], data_point, min_entropy, Path(args.plot))
    print(f"wrote {out} and {args.plot}")


if __name__ == "__main__":
    main()
