"""Zero-shot accuracy of MDM and ARM checkpoints, and the variance of MDM likelihood estimators.

Part 1 (variance): on the first --variance-docs documents of a multiple-choice
task, the MDM's Monte Carlo ELBO is estimated --repeats times with different
seeds for each number of draws K (= forward passes per answer). Reported per
scheme: the standard deviation of one answer's estimate, the standard
deviation of the difference between the answers of a document (what decides
accuracy), mean accuracy, and agreement with the predictions of the
reference scheme at --reference-samples draws and with those of a
--truth-samples estimate of the stratified+shared scheme ("truth").

Schemes: "reference" (per mini-batch of 32 stratified times, independent
Bernoulli masks, weight 1 / t, independent draws per answer), "stratified"
(mask counts stratified over all K draws, weight n / m), "stratified+shared"
(the same, with the draws shared by the answers of a document),
"balanced+shared" (shared draws whose masked positions tile one random
permutation, so each position is masked about equally often).

Part 2 (table): accuracy per offline task through lm-eval's evaluator for the
ARM, the MDM without guidance and the MDM with each guidance scale of --cfg.

Example (about 15 minutes on one busy CPU thread with the tiny quickstart models):
    MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=100000000000 PYTHONPATH=src python benchmarks/zero_shot_likelihood.py \
        --mdm runs/quickstart/mdm --arm runs/quickstart/arm --data-dir /data/benchmarks --out results.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections import defaultdict

import torch

SCHEMES = {
    "reference": dict(scheme="reference", share_draws=False),
    "stratified": dict(scheme="stratified", share_draws=False),
    "stratified+shared": dict(scheme="stratified", share_draws=True),
    "balanced+shared": dict(scheme="balanced", share_draws=True),
}


def task_requests(lm, task_name: str, docs: int, data_dir: str) -> tuple[list[list[tuple]], list[int]]:
    """Tokenised (context, continuation) pairs per document, as lm-eval builds them, and the gold indices."""
    from lm_eval.tasks import TaskManager

    from smdm.evaluate.offline_tasks import TASKS_DIR

    manager = TaskManager(include_path=str(TASKS_DIR), include_defaults=False, metadata={"data_dir": data_dir})
    task = manager.load([task_name])["tasks"][task_name]
    task.build_all_requests(limit=docs, rank=0, world_size=1)
    by_doc: dict[int, list] = defaultdict(list)
    gold: dict[int, int] = {}
    for instance in task.instances:
        context, continuation = instance.args
        pair = lm._encode_pair(context, continuation)
        by_doc[instance.doc_id].append(lm._fit_window(*pair))
        gold[instance.doc_id] = int(task.doc_to_target(instance.doc))
    order = sorted(by_doc)
    return [by_doc[d] for d in order], [gold[d] for d in order]


def variance_study(lm, args) -> dict:
    from smdm.evaluate.likelihood import mdm_mc_loglikelihood

    docs, gold = task_requests(lm, args.variance_task, args.variance_docs, args.data_dir)
    flat = [pair for doc in docs for pair in doc]
    sizes = [len(doc) for doc in docs]

    def split(values):
        out, start = [], 0
        for size in sizes:
            out.append(values[start : start + size])
            start += size
        return out

    def predictions(values):
        return [max(range(len(v)), key=v.__getitem__) for v in split(values)]

    report = {"task": args.variance_task, "documents": len(docs), "answers": len(flat), "rows": []}
    target_pred = None
    if not args.skip_reference:
        started = time.time()
        target = mdm_mc_loglikelihood(lm.model, flat, mc_samples=args.reference_samples, batch_size=args.batch_size,
                                      seed=10_000, **SCHEMES["reference"])
        target_pred = predictions(target)
        report.update({
            "reference_samples": args.reference_samples,
            "reference_accuracy": sum(p == g for p, g in zip(target_pred, gold)) / len(docs),
            "reference_seconds": time.time() - started,
        })
    # Both schemes estimate the same ELBO, so the lowest-variance one at many draws stands in for its exact value.
    truth = mdm_mc_loglikelihood(lm.model, flat, mc_samples=args.truth_samples, batch_size=args.batch_size,
                                 seed=20_000, **SCHEMES["stratified+shared"])
    truth_pred = predictions(truth)
    report.update({"truth_samples": args.truth_samples,
                   "truth_accuracy": sum(p == g for p, g in zip(truth_pred, gold)) / len(docs)})
    if target_pred is not None:
        report["reference_agreement_with_truth"] = sum(p == t for p, t in zip(target_pred, truth_pred)) / len(docs)
    print(json.dumps({k: v for k, v in report.items() if k != "rows"}), flush=True)

    def agreement(preds, reference):
        if reference is None:
            return None
        return statistics.mean(sum(p == t for p, t in zip(pr, reference)) / len(docs) for pr in preds)

    for name in args.schemes.split(","):
        settings = SCHEMES[name]
        for k in args.ks:
            runs = [
                mdm_mc_loglikelihood(lm.model, flat, mc_samples=k, batch_size=args.batch_size, seed=seed, **settings)
                for seed in range(args.repeats)
            ]
            per_answer = [statistics.stdev(values) for values in zip(*runs)]
            differences = []
            for doc_runs in zip(*(split(run) for run in runs)):
                # doc_runs: one list of answer scores per repeat; spread of (answer i - answer 0).
                for i in range(1, len(doc_runs[0])):
                    differences.append(statistics.stdev(r[i] - r[0] for r in doc_runs))
            preds = [predictions(run) for run in runs]
            report["rows"].append({
                "scheme": name, "forwards_per_answer": k,
                "std_answer": statistics.mean(per_answer),
                "std_difference": statistics.mean(differences),
                "accuracy": statistics.mean(sum(p == g for p, g in zip(pr, gold)) / len(docs) for pr in preds),
                "agreement_with_reference": agreement(preds, target_pred),
                "agreement_with_truth": agreement(preds, truth_pred),
            })
            print(json.dumps(report["rows"][-1]), flush=True)
    return report


def accuracy_table(args) -> dict:
    from smdm.evaluate.harness import SmdmLM
    from smdm.evaluate.zero_shot import run_tasks

    settings = []
    if args.arm:
        settings.append(("ARM", dict(checkpoint=args.arm)))
    for w in [] if args.skip_mdm_table else [0.0, *args.cfg]:
        settings.append((f"MDM w={w:g}", dict(checkpoint=args.mdm, cfg=w, mc_samples=args.table_mc_samples)))
    table = {}
    for label, model_args in settings:
        lm = SmdmLM(device="cpu", batch_size=args.batch_size, seed=1234, **model_args)
        started = time.time()
        results = run_tasks(lm, args.tasks, limit=args.table_limit, data_dir=args.data_dir, bootstrap_iters=1000)
        table[label] = {"seconds": time.time() - started, "results": results["results"]}
        print(label, json.dumps(results["results"]), flush=True)
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mdm", required=True, help="MDM run or checkpoint folder")
    parser.add_argument("--arm", default=None, help="ARM run or checkpoint folder (table only)")
    parser.add_argument("--data-dir", required=True, help="folder with the benchmark files")
    parser.add_argument("--variance-task", default="piqa")
    parser.add_argument("--variance-docs", type=int, default=10)
    parser.add_argument("--reference-samples", type=int, default=1024)
    parser.add_argument("--truth-samples", type=int, default=1024,
                        help="draws of the stratified+shared scheme whose decisions stand in for the exact ELBO's")
    parser.add_argument("--ks", default="8,32,128", help="Monte Carlo draws per answer choice to compare, comma-separated")
    parser.add_argument("--repeats", type=int, default=4, help="seeds per K for the standard deviations")
    parser.add_argument("--tasks", default="arc_easy,boolq,hellaswag,lambada_standard,openbookqa,piqa,social_iqa")
    parser.add_argument("--table-limit", type=int, default=40, help="documents per task in the table")
    parser.add_argument("--table-mc-samples", type=int, default=16)
    parser.add_argument("--cfg", default="1.0", help="guidance scales for the table besides w = 0, comma-separated")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--schemes", default=",".join(SCHEMES), help="schemes of the variance study, comma-separated")
    parser.add_argument("--skip-table", action="store_true")
    parser.add_argument("--skip-variance", action="store_true")
    parser.add_argument("--skip-reference", action="store_true",
                        help="skip the --reference-samples run of the reference scheme (no agreement with it)")
    parser.add_argument("--skip-mdm-table", action="store_true", help="table rows of the ARM only")
    parser.add_argument("--out", default=None, help="JSON file for the results")
    args = parser.parse_args()
    args.ks = [int(k) for k in args.ks.split(",")]
    args.cfg = [float(w) for w in args.cfg.split(",") if w]
    torch.set_num_threads(args.threads)

    from smdm.evaluate.harness import SmdmLM

    report = {"machine": platform.platform(), "processor": platform.processor(), "threads": args.threads,
              "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "args": {k: v for k, v in vars(args).items()}}
    if not args.skip_variance:
        lm = SmdmLM(checkpoint=args.mdm, device="cpu", batch_size=args.batch_size)
        report["variance"] = variance_study(lm, args)
    if not args.skip_table:
        report["table"] = accuracy_table(args)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as handle:
            json.dump(report, handle, indent=2, default=str)


if __name__ == "__main__":
    main()
