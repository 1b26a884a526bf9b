"""Decoding speed at the 19M size with random weights (speed only, no quality).

Setting: the 19M configuration of "Scaling up Masked Diffusion Models on Text"
(Nie et al., arXiv 2410.18514) with a 32,000-id vocabulary, a 64-token prompt
and 256 new tokens, batch 1. The script times the MDM samplers at several step counts, the KV-cached ARM,
and Hugging Face transformers' generate on a LlamaForCausalLM with the same ARM
weights. For the MDM it also times the bare network passes of the uncached
sampler, so the share of time spent in the sampler itself is visible.

Run (from the repository root):
  MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=100000000000 PYTHONPATH=src python benchmarks/sampler_speed.py
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from smdm.config import ModelConfig
from smdm.generate import SampleConfig, generate
from smdm.model import Transformer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from generation_frontier import compare_with_hf, to_hf_llama  # noqa: E402


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="19M")
    parser.add_argument("--vocab-size", type=int, default=32000)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3, help="alternating timed runs of smdm and HF generate")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--out", default="benchmarks/results/sampler_speed.json")
    return parser.parse_args()


def seconds_of(fn) -> float:
    fn()  # warm-up
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


@torch.no_grad()
def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    block = args.prompt_len + args.new_tokens
    torch.manual_seed(0)
    shape = dict(vocab_size=args.vocab_size, block_size=block)
    mdm = Transformer(ModelConfig.from_name(args.model, kind="mdm", **shape)).eval()
    arm = Transformer(ModelConfig.from_name(args.model, kind="arm", **shape)).eval()
    prompt = torch.randint(0, args.vocab_size, (1, args.prompt_len))
    G = args.new_tokens
    rows = []

    def record(name: str, seconds: float, **extra) -> None:
        rows.append({"name": name, "tokens_per_s": G / seconds, "seconds": seconds, **extra})
        print(json.dumps(rows[-1]), flush=True)

    for steps in (16, 64):
        config = SampleConfig(max_new_tokens=G, steps=steps, temperature=1.0, sampler="random", stop_at_eos=False)
        total = seconds_of(lambda: generate(mdm, prompt, config))
        canvas = torch.cat([prompt, torch.full((1, G), mdm.config.mask_id)], dim=1)
        network = seconds_of(lambda: [mdm(canvas, return_hidden=True) for _ in range(steps)])
        record(f"MDM random, {steps} steps", total, backbone_share=network / total)
    for steps in (16, 64):
        config = SampleConfig(max_new_tokens=G, steps=steps, temperature=1.0, sampler="low_confidence",
                              block_length=32, cache="dual", stop_at_eos=False)
        record(f"MDM low_confidence, blocks of 32, dual cache, {steps} steps",
               seconds_of(lambda: generate(mdm, prompt, config)))
    config = SampleConfig(max_new_tokens=G, temperature=1.0, stop_at_eos=False)
    record("ARM sampled, KV cache (smdm)", seconds_of(lambda: generate(arm, prompt, config)))
    for point in compare_with_hf(arm, to_hf_llama(arm), [prompt], G, 0, args.repeats):
        if "error" in point:
            rows.append(point)
            print(json.dumps(point), flush=True)
            continue
        extra = {key: value for key, value in point.items() if key not in ("name", "tokens_per_s")}
        record(point["name"], G / point["tokens_per_s"], **extra)

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "torch": torch.__version__, "rows": rows}, indent=2),
                   encoding="utf-8")


if __name__ == "__main__":
    main()
