"""The lm-evaluation-harness model `smdm`: score and sample MDM and ARM checkpoints inside lm-eval.

Importing this module registers the class under the name "smdm" in lm-eval's
model registry. lm-eval 0.4.13 discovers models only through its built-in
table and imported modules (it reads no plugin entry points), so the
`smdm-lm-eval` command imports this module and then runs lm-eval's own
command line:

    smdm-lm-eval run --model smdm --model_args checkpoint=RUN_DIR,mc_samples=128 \
        --tasks hellaswag --include_path "$(python -m smdm.evaluate.offline_tasks)" \
        --metadata '{"data_dir": "/path/to/benchmarks"}'

`smdm evaluate --tasks ...` drives lm-eval's evaluator with the same class.

Context and continuation are split by lm-eval's `TemplateLM` rules (trailing
spaces of the context move to the continuation; an empty context becomes the
EOS token). An MDM scores a continuation with the Monte Carlo ELBO (a lower
bound on its log-likelihood) or the chain rule; an ARM's score is exact.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from lm_eval import utils as lm_eval_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model

from smdm.evaluate.likelihood import (
    MC_SCHEMES,
    arm_loglikelihood,
    mdm_chain_rule_loglikelihood,
    mdm_greedy_check,
    mdm_mc_loglikelihood,
)

log = logging.getLogger(__name__)

LIKELIHOOD_METHODS = ("mc", "chain")
GREEDY_MODES = ("auto", "always", "never")
# Tasks whose metrics read the greedy flag of loglikelihood. The MDM's greedy check costs one
# forward pass per continuation token, so greedy="auto" runs it only for these tasks.
GREEDY_TASK_PREFIXES = ("lambada",)


def parse_task_values(value: float | str | None, what: str) -> tuple[float, dict[str, float]]:
    """Parse a scale given as a number or as "task:value;task:value;default_value"; return (default, per task)."""
    if value is None or value == "":
        return 0.0, {}
    if isinstance(value, (int, float)):
        return float(value), {}
    default, per_task = 0.0, {}
    for item in str(value).replace(";", " ").split():
        name, sep, number = item.rpartition(":")
        try:
            parsed = float(number)
        except ValueError:
            raise ValueError(
                f"invalid {what} {value!r}: {item!r} is not a number or TASK:NUMBER; write for example "
                "0.5 or hellaswag:0.8;piqa:1.2"
            ) from None
        if sep:
            per_task[name] = parsed
        else:
            default = parsed
    return default, per_task


@register_model("smdm")
class SmdmLM(TemplateLM):
    """An smdm checkpoint (MDM or ARM) behind lm-eval's `LM` interface.

    Model arguments (`--model_args key=value,...`):
      checkpoint: checkpoint folder or run folder (its latest checkpoint); required.
      device, dtype: where and in which precision to run ("auto" picks CUDA when present).
      batch_size: canvases per forward pass.
      likelihood: "mc" (Monte Carlo ELBO, the default) or "chain" (chain rule), MDM only.
      mc_samples, mc_scheme, mc_batch, share_draws, seed: settings of the Monte Carlo ELBO.
      cfg: guidance scale w, a number or "task:w;task:w;default" (MDM only).
      greedy: "auto" (only for LAMBADA tasks), "always" or "never": compute the MDM's greedy check.
      max_new_tokens, steps, sampler: defaults of generate_until.
    """

    def __init__(
        self,
        checkpoint: str | None = None,
        device: str | None = "auto",
        dtype: str = "float32",
        batch_size: int | str | None = 32,
        max_batch_size: int | None = None,
        likelihood: str = "mc",
        mc_samples: int = 128,
        mc_scheme: str = "balanced",
        mc_batch: int = 32,
        share_draws: bool = True,
        cfg: float | str = 0.0,
        greedy: str = "auto",
        seed: int = 1234,
        max_new_tokens: int = 64,
        steps: int = 64,
        sampler: str = "low_confidence",
        model=None,
        tokenizer=None,
        **unused,
    ) -> None:
        super().__init__()
        from smdm.checkpoint import load_model
        from smdm.runtime import parse_dtype, resolve_device

        if unused:
            log.warning("smdm model ignores unknown model arguments %s", sorted(unused))
        if model is None:
            if not checkpoint:
                raise ValueError("the smdm model needs a checkpoint: pass --model_args checkpoint=PATH")
            model, tokenizer, _ = load_model(checkpoint, resolve_device(device or "auto"), parse_dtype(dtype))
        elif tokenizer is None:
            raise ValueError("pass the tokenizer together with an in-memory model")
        if likelihood not in LIKELIHOOD_METHODS:
            raise ValueError(f"likelihood={likelihood!r} is invalid; choose one of {LIKELIHOOD_METHODS}")
        if mc_scheme not in MC_SCHEMES:
            raise ValueError(f"mc_scheme={mc_scheme!r} is invalid; choose one of {MC_SCHEMES}")
        if greedy not in GREEDY_MODES:
            raise ValueError(f"greedy={greedy!r} is invalid; choose one of {GREEDY_MODES}")
        self.model = model.eval()
        self.smdm_tokenizer = tokenizer
        self._device = self.model.lm_head.weight.device
        self.batch_size = int(batch_size) if str(batch_size).isdigit() else 32
        self.likelihood = likelihood
        self.mc_samples = int(mc_samples)
        self.mc_scheme = mc_scheme
        self.mc_batch = int(mc_batch)
        self.share_draws = bool(share_draws)
        self.cfg_default, self.cfg_per_task = parse_task_values(cfg, "cfg")
        if not self.is_mdm and (self.cfg_default or any(self.cfg_per_task.values())):
            raise ValueError("classifier-free guidance needs an MDM checkpoint; drop cfg for an ARM")
        self.greedy = greedy
        self.seed = int(seed)
        self.max_new_tokens = int(max_new_tokens)
        self.steps = int(steps)
        self.sampler = sampler
        self._task_names: list[str | None] = []

    # The tokenizer interface of TemplateLM.
    @property
    def is_mdm(self) -> bool:
        return self.model.config.is_mdm

    @property
    def eot_token_id(self) -> int:
        return self.smdm_tokenizer.eos_id

    @property
    def max_length(self) -> int:
        return self.model.config.block_size

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.smdm_tokenizer.encode(string)

    def tok_decode(self, tokens: Sequence[int]) -> str:
        return self.smdm_tokenizer.decode(tokens)

    @property
    def tokenizer_name(self) -> str:
        return "smdm-" + self.smdm_tokenizer.identity[:16]

    def cfg_for(self, task_name: str | None) -> float:
        return self.cfg_per_task.get(task_name or "", self.cfg_default)

    # Scoring.
    def loglikelihood(self, requests, disable_tqdm: bool = False):
        # TemplateLM.loglikelihood keeps the order of the requests, so their task names line up with
        # the tokenised pairs that reach _loglikelihood_tokens.
        self._task_names = [getattr(request, "task_name", None) for request in requests]
        try:
            return super().loglikelihood(requests, disable_tqdm=disable_tqdm)
        finally:
            self._task_names = []

    def _wants_greedy(self, task_name: str | None) -> bool:
        if self.greedy == "auto":
            return bool(task_name) and task_name.startswith(GREEDY_TASK_PREFIXES)
        return self.greedy == "always"

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        pairs = [self._fit_window(context, continuation) for _, context, continuation in requests]
        tasks = self._task_names if len(self._task_names) == len(pairs) else [None] * len(pairs)
        if not self.is_mdm:
            results = arm_loglikelihood(self.model, pairs, batch_size=self.batch_size)
        else:
            results = self._mdm_scores(pairs, tasks)
        for (strings, _, _), result in zip(requests, results):
            if strings is not None:
                self.cache_hook.add_partial("loglikelihood", strings, result)
        return results

    def _fit_window(self, context: list[int], continuation: list[int]) -> tuple[list[int], list[int]]:
        """Keep the last tokens of a continuation that does not fit the model, the earlier ones becoming context.

        This is what lm-eval's Hugging Face model does with a too long request
        (it keeps the last max_length + 1 tokens), so scores stay comparable.
        An MDM keeps one context token on its canvas, an ARM reads one token
        fewer than it scores.
        """
        limit = self.max_length - 1 if self.is_mdm else self.max_length
        if len(continuation) <= limit:
            return list(context), list(continuation)
        log.warning("a continuation of %d tokens exceeds the model's window; scoring its last %d tokens",
                    len(continuation), limit)
        cut = len(continuation) - limit
        return list(context) + list(continuation[:cut]), list(continuation[cut:])

    def _mdm_scores(self, pairs: list, tasks: list[str | None], greedy_check: bool = True) -> list[tuple[float, bool]]:
        """Score MDM requests grouped by guidance scale; greedy checks only where asked."""
        scores = [0.0] * len(pairs)
        greedy = [False] * len(pairs)
        for scale in sorted({self.cfg_for(task) for task in tasks}):
            group = [i for i, task in enumerate(tasks) if self.cfg_for(task) == scale]
            subset = [pairs[i] for i in group]
            if self.likelihood == "chain":
                values = mdm_chain_rule_loglikelihood(self.model, subset, batch_size=self.batch_size, cfg=scale)
            else:
                values = mdm_mc_loglikelihood(
                    self.model, subset, mc_samples=self.mc_samples, batch_size=self.batch_size,
                    mc_batch=self.mc_batch, scheme=self.mc_scheme, share_draws=self.share_draws, cfg=scale,
                    seed=self.seed,
                )
            for i, value in zip(group, values):
                scores[i] = value
            checked = [i for i in group if greedy_check and self._wants_greedy(tasks[i])]
            if checked:
                flags = mdm_greedy_check(self.model, [pairs[i] for i in checked], batch_size=self.batch_size,
                                         cfg=scale)
                for i, flag in zip(checked, flags):
                    greedy[i] = flag
        return list(zip(scores, greedy))

    def rolling_windows(self, text: str) -> list[tuple[list[int], list[int]]]:
        """Split a text into lm-eval's disjoint rolling windows (context, continuation) that fit the model.

        An ARM reads block_size tokens to predict block_size; an MDM's canvas
        holds the context token too, so its windows are one token shorter.
        """
        max_seq_len = self.max_length if not self.is_mdm else self.max_length - 1
        windows = lm_eval_utils.get_rolling_token_windows(
            token_list=self.tok_encode(text), prefix_token=self.prefix_token_id, max_seq_len=max_seq_len,
            context_len=1,
        )
        return [lm_eval_utils.make_disjoint_window(window) for window in windows]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Return the log-likelihood of whole texts: exact for an ARM, the ELBO (a lower bound) for an MDM.

        Each text is split by lm-eval's rolling-window rule, every token is
        scored once, and the window scores are summed.
        """
        results = []
        for request in requests:
            (text,) = request.args
            windows = self.rolling_windows(text)
            if self.is_mdm:
                tasks = [request.task_name] * len(windows)
                values = [score for score, _ in self._mdm_scores(windows, tasks, greedy_check=False)]
            else:
                values = [score for score, _ in arm_loglikelihood(self.model, windows, batch_size=self.batch_size)]
            total = float(sum(values))
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), total)
            results.append(total)
        return results

    # Generation.
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Sample a continuation of each context and cut it at the first stop string."""
        from smdm.generate import SampleConfig, generate
        from smdm.sampling_api import encode_prompt

        outputs = []
        for index, request in enumerate(requests):
            context, gen_kwargs = request.args
            gen_kwargs = dict(gen_kwargs or {})
            until = gen_kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(gen_kwargs.pop("max_gen_toks", self.max_new_tokens))
            do_sample = bool(gen_kwargs.pop("do_sample", False))
            temperature = float(gen_kwargs.pop("temperature", 0.0)) if do_sample else 0.0
            ids = encode_prompt(self.smdm_tokenizer, context, self.model.config.kind)
            # Keep the most recent context when the prompt and the new tokens exceed the model's context.
            ids = ids[-max(1, self.max_length - max_new) :]
            max_new = min(max_new, self.max_length - len(ids))
            config = SampleConfig(max_new_tokens=max_new, steps=min(self.steps, max_new), temperature=temperature,
                                  sampler=self.sampler, seed=self.seed + index)
            prompt = torch.tensor([ids], dtype=torch.long, device=self._device)
            (row,) = generate(self.model, prompt, config, eos_id=self.smdm_tokenizer.eos_id)
            text = self.tok_decode(row)
            for stop in until:
                if stop and stop in text:
                    text = text[: text.index(stop)]
            self.cache_hook.add_partial("generate_until", (context, request.args[1]), text)
            outputs.append(text)
        return outputs


def cli_main() -> None:
    """Run lm-eval's own command line with the smdm model registered (the `smdm-lm-eval` command)."""
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()
