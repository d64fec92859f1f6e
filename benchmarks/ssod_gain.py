"""SSOD gain on the demo data at 10% labels, same budget for every row (issue 3).

    python benchmarks/ssod_gain.py [--epochs 20] [--steps 125] [--imgsz 160] [--batch 16] [--burn-in 8]

Rows: supervised on the labeled 10%, mean_teacher, efficient_teacher, efficient_teacher without
adaptive thresholds, without domain adaptation, and the 100%-labeled oracle. Every row runs the
same number of optimiser steps (epochs x steps) with the same labeled batch size and LR schedule;
SSOD rows add an unlabeled batch of the same size per step after burn-in. Prints mAP50-95, mAP50
and the fraction of the supervised-to-oracle gap each row closes, then the cost of an SSOD step
against a supervised step over the same number of student images.

Shared burn-in: burn-in is supervised-only and draws the same labeled batches for every method,
so the supervised row saves its epoch-``burn_in`` checkpoint and every SSOD row starts from it
(``burn_in_from``; tests/test_trainer.py checks a forked run equals a full one bit for bit).
The SSOD rows' minutes therefore count only their post-burn-in epochs; the table says so.
Defaults: full-width yolov8n, 160 px, 20 epochs x 125 steps, burn-in 8. At 10 epochs (the budget
of benchmarks/supervised_demo.py) supervised training on the 200 labeled images is still improving
and every SSOD row loses to it (docs/benchmarks.md Runs 2-6); at 20 the SSOD rows gain (Runs 6-18).
Neither budget converges supervised training: at 20 x 184 steps every row rises by 2.5-6.4 points
and efficient_teacher's share of the gap falls from ~40% to 36% (Run 17), so compare rows within
one budget, never across. The price, with ``--jobs 2`` (one thread per process, two processes at
a time on 2 cores): 63 minutes for the six rows and the step cost, timed as one run on an AMD EPYC
with AVX512-BF16 (Run 18: 17 min per supervised row, 22-24 per SSOD row after the shared burn-in);
CPUs without hardware bf16 run the teacher in float32 and take longer (earlier hosts: 20-35 and 25-45
minutes). ``--jobs 2`` schedules the rows by itself (supervised and oracle first, each SSOD row as
soon as a slot is free and the supervised row has written ``epoch8.pt``); by hand, run the supervised
row first and give other processes ``--burn-in-from <its run>/weights/epoch8.pt``. One run per row
moves by points with the training seed (``--seed``) and
the data draw (``--data-seed``): run several folders and pool them with
``benchmarks/ssod_gain_table.py``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

from ssod.config import parse_overrides, resolve_config
from ssod.training.data.demo import make_demo_dataset
from ssod.training.engine.plots import save_figure
from ssod.training.engine.trainer import Trainer, next_run_dir

ROWS = {
    "supervised": ("supervised", 0.1, {}),
    "mean_teacher": ("mean_teacher", 0.1, {}),
    "efficient_teacher": ("efficient_teacher", 0.1, {}),
    "et_fixed_thresholds": ("efficient_teacher", 0.1, {"adaptive_thresholds": False}),
    "et_no_domain_adapt": ("efficient_teacher", 0.1, {"domain_adaptation": False}),
    "oracle_100pct": ("supervised", 1.0, {}),
}
# Not run by default (--rows ...,et_ignore_low): variants probing why a method loses (docs/benchmarks.md).
EXTRA_ROWS = {
    "et_ignore_low": ("efficient_teacher", 0.1, {"ignore_low_score": True}),
    "et_ignore_low_lambda1": ("efficient_teacher", 0.1, {"ignore_low_score": True, "lambda_u": 1.0}),
    "et_lambda1_plain_pla": ("efficient_teacher", 0.1, {"lambda_u": 1.0, "uncertain_box_loc": 1.0}),
    "et_lambda1": ("efficient_teacher", 0.1, {"lambda_u": 1.0}),
    # the paper's lambda (the default until Run 19), and the two ablations at lambda 1 (the default since)
    "et_lambda3": ("efficient_teacher", 0.1, {"lambda_u": 3.0}),
    "et_lambda2": ("efficient_teacher", 0.1, {"lambda_u": 2.0}),  # weights either side of the default (Run 19)
    "et_lambda05": ("efficient_teacher", 0.1, {"lambda_u": 0.5}),
    "et_shrunk_prior": ("efficient_teacher", 0.1, {"class_prior": "shrunk"}),
    "mt_decay099": ("mean_teacher", 0.1, {"teacher_decay": 0.99}),  # et_decay099: below
    # uncertain boxes as ignore regions instead of soft targets (DSL's ignore band; uncertain_targets)
    "et_uncertain_ignore": ("efficient_teacher", 0.1, {"uncertain_targets": "ignore"}),
    "et_uncertain_vector": ("efficient_teacher", 0.1, {"uncertain_targets": "vector"}),  # every class's score
    # tau1 at 1.5x the expected box count (Epoch Adaptor beta): a wider uncertain band of soft positives
    "et_beta15": ("efficient_teacher", 0.1, {"beta": 1.5}),
    "et_lambda1_fixed_thresholds": ("efficient_teacher", 0.1, {"lambda_u": 1.0, "adaptive_thresholds": False}),
    "et_lambda1_no_domain_adapt": ("efficient_teacher", 0.1, {"lambda_u": 1.0, "domain_adaptation": False}),
    "et_rampup": ("efficient_teacher", 0.1, {"unsup_warmup_epochs": 3.0}),
    "et_lambda1_rampup": ("efficient_teacher", 0.1, {"lambda_u": 1.0, "unsup_warmup_epochs": 3.0}),
    "mt_rampup": ("mean_teacher", 0.1, {"unsup_warmup_epochs": 3.0}),
    # the teacher also on a 1.6x weak view for small objects (teacher_scales, SED's larger teacher scale)
    "et_multiscale": ("efficient_teacher", 0.1, {"teacher_scales": [1.0, 1.6]}),
    "et_lambda1_multiscale": ("efficient_teacher", 0.1, {"lambda_u": 1.0, "teacher_scales": [1.0, 1.6]}),
    # Instant-Teaching's mosaic / mixup of the pseudo-labeled strong images, with the labeled ones in the pool
    "et_mosaic": ("efficient_teacher", 0.1, {"strong_mix": "mosaic"}),
    "et_mixup": ("efficient_teacher", 0.1, {"strong_mix": "mixup"}),
    # the student's strong view without SED's three cutout passes (trainer aug strong_cutout): each hides 2-20% of
    # the image, small objects whole, and every pseudo box they hide is dropped (Run 5: -13% boxes per image)
    "et_no_cutout": ("efficient_teacher", 0.1, {}, {"aug": {"strong_cutout": False}}),
    "mt_no_cutout": ("mean_teacher", 0.1, {}, {"aug": {"strong_cutout": False}}),
    # the cutouts drawn as before but painted after the teacher: one that would hide a pseudo box is skipped
    "et_spare_cutout": ("efficient_teacher", 0.1, {}, {"aug": {"strong_cutout": "spare_objects"}}),
    "mt_spare_cutout": ("mean_teacher", 0.1, {}, {"aug": {"strong_cutout": "spare_objects"}}),
    # Consistent-Teacher's per-class GMM thresholds in place of the class counts (Run 26)
    "et_gmm_thresholds": ("efficient_teacher", 0.1, {"threshold_rule": "gmm"}),
    # Localization Distillation (seed 003) of the teacher's edge distributions, LD's GFL weight (= DFL's) and T
    "et_ld": ("efficient_teacher", 0.1, {"ld_weight": 1.0}),
    # SED's strong view: the weak view's geometry (flip, letterbox; the teacher always at the larger scale)
    "et_strong_geo_weak": ("efficient_teacher", 0.1, {}, {"aug": {"strong_geometry": "weak"}}),
    # DTG-SSOD's dense teacher guidance (seed 002, assignment: inverse_nms): Inverse NMS Clustering assigns the
    # student's positions (Run 30); with the paper's Rank Matching (beta 3), and with IoU member targets as well
    "et_inverse_nms": ("efficient_teacher", 0.1, {"assignment": "inverse_nms"}),
    "et_inverse_nms_rm3": ("efficient_teacher", 0.1, {"assignment": "inverse_nms", "rm_weight": 3.0}),
    # Rank Matching at the paper's balance on ultralytics' scale (3 / 12: per member, beta 3 weighs ~12x the class loss)
    "et_inverse_nms_rm025": ("efficient_teacher", 0.1, {"assignment": "inverse_nms", "rm_weight": 0.25}),
    "et_inverse_nms_iou_rm3": ("efficient_teacher", 0.1, {"assignment": "inverse_nms", "inc_target": "iou",
                                                          "rm_weight": 3.0}),
    # class-agnostic teacher NMS: no second box of another class on the same object (Run 32)
    "et_nms_agnostic": ("efficient_teacher", 0.1, {"nms_agnostic": True}),
    "et_mixup_no_cutout": ("efficient_teacher", 0.1, {"strong_mix": "mixup"}, {"aug": {"strong_cutout": False}}),
    "et_scales_1_14": ("efficient_teacher", 0.1, {"teacher_scales": [1.0, 1.4]}),  # fused, 2.96x the pixels of [1.0]
    # one teacher pass at 1.4x or 1.2x instead of two (1.96x / 1.44x the pixels of the plain teacher, not 3.56x)
    "et_lambda1_scale14": ("efficient_teacher", 0.1, {"lambda_u": 1.0, "teacher_scales": [1.4]}),
    "et_scale14": ("efficient_teacher", 0.1, {"teacher_scales": [1.4]}),
    "et_scale12": ("efficient_teacher", 0.1, {"teacher_scales": [1.2]}),  # 1.44x the pixels: the defaults since Run 13
    "et_one_scale": ("efficient_teacher", 0.1, {"teacher_scales": [1.0]}),  # the paper's teacher (defaults until Run 13)
    "et_lambda1_scale12": ("efficient_teacher", 0.1, {"lambda_u": 1.0, "teacher_scales": [1.2]}),
    # the two ablations on the Run-13 defaults (efficient_teacher's own rows ran the 1x teacher)
    "et_scale12_fixed_thresholds": ("efficient_teacher", 0.1, {"teacher_scales": [1.2], "adaptive_thresholds": False}),
    "et_scale12_no_domain_adapt": ("efficient_teacher", 0.1, {"teacher_scales": [1.2], "domain_adaptation": False}),
    # tau2 at 80% of the tau1 count instead of the paper's 60%: the 1.2x teacher's reliable set is
    # 93% precise at 56% recall, and misses cost twice what false positives do (Run 9)
    "et_alpha08": ("efficient_teacher", 0.1, {"teacher_scales": [1.2], "alpha": 0.8}),
    # the teacher's EMA decay after burn-in (teacher_decay, default 0.995: ~200-step memory) at half and
    # 2.5x that memory: the 20-epoch benchmark has 1,500 SSOD steps
    "et_decay099": ("efficient_teacher", 0.1, {"teacher_decay": 0.99}),
    "et_decay0998": ("efficient_teacher", 0.1, {"teacher_decay": 0.998}),
    # the defaults run with --burn-in 6 (forked from that epoch of the same supervised run): 14 SSOD
    # epochs instead of 12 from a weaker first teacher; the SSOD rows' val curves still rise at epoch 20
    "et_burnin6": ("efficient_teacher", 0.1, {}),
    # the defaults once the loader draws the teacher's 1.2x weak view from the file (Method.teacher_view_size)
    # instead of the method upsampling the imgsz view: the same config as et_blur_scaled, newer code
    "et_view_from_file": ("efficient_teacher", 0.1, {}),
    # the defaults once the teacher pseudo-labels in bf16 on CPUs with AMX (teacher_precision auto, the
    # default since Run 16; float32 before): the same config as et_view_from_file, newer code
    "et_teacher_bf16": ("efficient_teacher", 0.1, {}),
    # two unlabeled images per labeled one in each step (trainer-level unlabeled_ratio, the 4th element:
    # trainer overrides): Soft Teacher and DTG sample 1:4. lambda weighs each part per image of its own
    # batch, so the rows are twice the pseudo-labelled images per step at the defaults' weight (cost
    # measured against supervised on as many student images). Run 16 ran them on the code before that
    # convention (losses summed over all images) with lambda_u 1.5 / 0.5: the same losses.
    "et_ratio2": ("efficient_teacher", 0.1, {}, {"unlabeled_ratio": 2}),
    "mt_ratio2": ("mean_teacher", 0.1, {}, {"unlabeled_ratio": 2}),
    # the two ablations at 1:2
    "et_ratio2_fixed_thresholds": ("efficient_teacher", 0.1, {"adaptive_thresholds": False}, {"unlabeled_ratio": 2}),
    "et_ratio2_no_domain_adapt": ("efficient_teacher", 0.1, {"domain_adaptation": False}, {"unlabeled_ratio": 2}),
    # SED's blur sigma scaled to the view (views.BLUR_REF_PX), the defaults since it was introduced: the same
    # configs as et_scale12 / mean_teacher, whose results in earlier runs had the unscaled blur
    "et_blur_scaled": ("efficient_teacher", 0.1, {"teacher_scales": [1.2]}),
    "mt_blur_scaled": ("mean_teacher", 0.1, {}),
    # the class term at lambda 1, box and DFL at lambda 3: the teacher's wrong labels are mostly
    # wrong classes on right boxes (Run 11), so its boxes may bear more weight than its classes
    "et_lambda1_box3": ("efficient_teacher", 0.1, {"lambda_u": 1.0, "unsup_box_weight": 3.0, "unsup_dfl_weight": 3.0}),
    "et_plain_pla": ("efficient_teacher", 0.1, {"uncertain_box_loc": 1.0}),
    "et_loc_gate": ("efficient_teacher", 0.1, {"uncertain_box_loc": 0.85}),  # the default before Run 10
    "et_labeled_norm": ("efficient_teacher", 0.1, {"unsup_norm": "labeled"}),  # the default since 2026-12-02
    "et_pseudo_norm": ("efficient_teacher", 0.1, {"unsup_norm": "pseudo"}),  # the default before
    "et_labeled_norm_lambda1": ("efficient_teacher", 0.1, {"unsup_norm": "labeled", "lambda_u": 1.0}),
    "et_teacher_bg": ("efficient_teacher", 0.1, {"unsup_background": "teacher"}),
    "et_teacher_bg_lambda1": ("efficient_teacher", 0.1, {"unsup_background": "teacher", "lambda_u": 1.0}),
    # Unbiased Teacher's choice: pseudo labels teach classification only (no box / DFL loss on unlabeled images)
    "et_cls_only": ("efficient_teacher", 0.1, {"unsup_box_weight": 0.0, "unsup_dfl_weight": 0.0}),
    # the first per-class thresholds after 256 unlabeled images instead of a whole epoch (Run 6: no gain)
    "et_first_update_early": ("efficient_teacher", 0.1, {"first_update_images": 256}),
    # Unbiased Teacher's strong labeled views: half the labeled images also get the strong photometric chain
    # after the switch; sup_strong_labeled is its control (supervised, the same labeled views, forked likewise)
    "et_strong_labeled": ("efficient_teacher", 0.1, {}, {"aug": {"strong_labeled_p": 0.5}}),
    "sup_strong_labeled": ("supervised", 0.1, {}, {"aug": {"strong_labeled_p": 0.5}, "fork_burn_in": True}),
    # diagnostic upper bound: the hidden labels as perfect pseudo labels through the same loss path
    "et_hidden_labels": ("efficient_teacher", 0.1, {"pseudo_source": "hidden_labels"}),
    "et_hidden_labels_lambda1": ("efficient_teacher", 0.1, {"pseudo_source": "hidden_labels", "lambda_u": 1.0}),
    # diagnostic: the teacher's pseudo labels without its false positives (its misses kept)
    "et_teacher_true_lambda1": ("efficient_teacher", 0.1, {"pseudo_source": "teacher_true", "lambda_u": 1.0}),
}


def forks(entry: tuple) -> bool:
    """Whether a row starts from the supervised row's burn-in checkpoint: every SSOD row, and
    supervised rows marked ``fork_burn_in`` (controls that change only what follows the switch)."""
    method, _, _, *trainer_kw = entry
    return method != "supervised" or bool(trainer_kw and trainer_kw[0].get("fork_burn_in"))


def config(args, data: Path, method: str, method_cfg: dict, name: str, **kw) -> dict:
    kw.setdefault("burn_in_epochs", args.burn_in)
    if args.aug:
        kw["aug"] = {**parse_overrides([a for a in args.aug.split(",") if a.strip()], "--aug"), **kw.get("aug", {})}
    if method == "supervised" and args.burn_in > 0:
        kw.setdefault("save_period", args.burn_in)  # epoch<burn_in>.pt: the SSOD rows start from it
    return resolve_config(
        None, data=str(data), model=args.model, width=args.width, depth=args.depth, method=method,
        epochs=args.epochs, steps_per_epoch=args.steps, imgsz=args.imgsz, batch=args.batch,
        workers=args.workers, out=args.out, name=name,
        val_interval=args.val_interval, seed=args.seed, method_cfg=method_cfg,
        teacher_precision=args.teacher_precision, **kw,
    )


def step_cost(args, data: Path, method_name: str = "efficient_teacher", n: int = 20,
              method_cfg: dict | None = None, unlabeled_ratio: int = 1) -> dict:
    """Seconds per step: an SSOD method (B labeled + uB unlabeled) vs supervised on (1 + u)B labeled.

    The two trainers take turns step by step (median of ``n`` each after 2 warm-up steps), so
    whatever else slows the machine meanwhile slows both alike.
    """
    runs = {}
    for label, method, batch, mcfg in (("supervised_same_images", "supervised", (1 + unlabeled_ratio) * args.batch, {}),
                                       ("ssod", method_name, args.batch, method_cfg or {})):
        cfg = config(args, data, method, mcfg, f"cost-{label}", burn_in_epochs=0, unlabeled_ratio=unlabeled_ratio)
        cfg["batch"], cfg["workers"] = batch, 0
        t = Trainer(cfg)
        t.method.epoch, t.method.burn_in = 0, False
        for hook in t.hooks:
            hook.before_train(t)
        batches = []
        for lab, unl in t.loader.epoch(0, with_unlabeled=t.method.uses_unlabeled):
            batches.append((lab, unl))
            if len(batches) == n + 2:
                break
        runs[label] = (t, batches, [])
    for i in range(n + 2):
        for t, batches, times in runs.values():
            lab, unl = batches[i % len(batches)]
            t0 = time.perf_counter()
            t.run_step(lab, unl)
            t.ema.update(t.student)
            if i >= 2:  # warm-up excluded
                times.append(time.perf_counter() - t0)
    out = {label: sorted(times)[len(times) // 2] for label, (_, _, times) in runs.items()}
    out["overhead"] = out["ssod"] / out["supervised_same_images"] - 1
    return out


def _read_results(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def _save_row(path: Path, row: str, result: dict) -> dict:
    """Merge one row into the results file (re-read under a lock: parallel rows share it)."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        results = {**_read_results(path), row: result}
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(results, indent=2))
        tmp.replace(path)
    return results


def run_parallel(ap: argparse.ArgumentParser, args, pending: list[str], table: dict, results_path: Path) -> None:
    """Run the pending rows as ``args.jobs`` processes at a time, ``cores // jobs`` threads each.

    Rows that start from the burn-in checkpoint wait until it exists; the supervised row gets its
    run directory up front (``--run-dir``), so its ``epoch<burn_in>.pt`` is known while it trains
    (checkpoints are written atomically, so the file is complete once it appears). Each row's
    output goes to ``<out>/logs/<row>.log``; a failed row is reported and the others go on.
    """
    out = Path(args.out)
    (out / "logs").mkdir(parents=True, exist_ok=True)
    threads = os.environ.get("SSOD_THREADS") or str(max(1, (os.cpu_count() or 1) // args.jobs))
    env = {**os.environ, "SSOD_THREADS": threads}
    needs_ckpt = {r for r in pending if forks(table[r]) and args.burn_in > 0}
    sup_dir = next_run_dir(out, "supervised") if "supervised" in pending else None
    ckpt = args.burn_in_from
    if needs_ckpt and ckpt is None:
        if sup_dir is None:
            ckpt = _supervised_burn_in(args, results_path, {}, sorted(needs_ckpt)[0])
        else:
            ckpt = str(sup_dir / "weights" / f"epoch{args.burn_in}.pt")
    queue = sorted(pending, key=lambda r: (r != "supervised", r in needs_ckpt))  # stable: table order otherwise
    running: dict[str, tuple[subprocess.Popen, float]] = {}
    print(f"{len(queue)} rows, {args.jobs} at a time, {threads} thread(s) each; logs in {out / 'logs'}", flush=True)
    while queue or running:
        for row, (proc, t0) in list(running.items()):
            if proc.poll() is not None:
                del running[row]
                state = "done" if proc.returncode == 0 else f"FAILED (exit {proc.returncode}, see logs/{row}.log)"
                print(f"  {row}: {state} after {(time.perf_counter() - t0) / 60:.1f} min", flush=True)
        ready = [r for r in queue if r not in needs_ckpt or Path(ckpt).exists()]
        for row in ready[: max(0, args.jobs - len(running))]:
            queue.remove(row)
            extra = {"rows": row, "jobs": 1, "burn_in_from": ckpt if row in needs_ckpt else None,
                     "run_dir": str(sup_dir) if row == "supervised" else None, "no_cost": True}
            with open(out / "logs" / f"{row}.log", "w") as log:
                proc = subprocess.Popen([sys.executable, sys.argv[0], *_argv(ap, args, **extra)],
                                        stdout=log, stderr=subprocess.STDOUT, env=env)
            running[row] = (proc, time.perf_counter())
            print(f"  {row}: started (pid {proc.pid})", flush=True)
        if not ready and not running and queue:
            raise SystemExit(f"rows {queue} wait for {ckpt}, which nothing running will write")
        time.sleep(2)


def _argv(ap: argparse.ArgumentParser, args, **override) -> list[str]:
    """Command-line options reproducing ``args`` (with ``override``) for a child process."""
    argv = []
    for action in ap._actions:
        if not action.option_strings or action.dest == "help":
            continue
        value = override.get(action.dest, getattr(args, action.dest))
        if value is None or value is False:
            continue
        argv += [action.option_strings[0]] if value is True else [action.option_strings[0], str(value)]
    return argv


def plot_rows(results: dict, out_png: Path, burn_in: int) -> Path:
    """Val mAP50-95 and pseudo-label precision / recall per epoch, one line per row (each row's results.csv)."""
    import csv

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_map, ax_pl) = plt.subplots(1, 2, figsize=(12, 4.5))
    for row, r in results.items():
        csv_path = Path(r["run"]) / "results.csv"
        if not csv_path.exists():
            continue
        with open(csv_path, newline="") as f:
            rows = list(csv.DictReader(f))
        pts = [(int(x["epoch"]), float(x["val/mAP50-95"])) for x in rows
               if x.get("val/mAP50-95") and int(x["epoch"]) >= burn_in - 2]  # from just before the switch
        (line,) = ax_map.plot(*zip(*pts), marker="o", ms=3, label=row) if pts else (None,)
        for key, style in (("method/pl_precision", "-"), ("method/pl_recall", "--")):
            pl = [(int(x["epoch"]), float(x[key])) for x in rows if x.get(key)]
            if pl and line is not None:
                ax_pl.plot(*zip(*pl), style, color=line.get_color(), label=f"{row} {key.split('_')[-1]}")
    for ax, title in ((ax_map, "val mAP50-95"), (ax_pl, "pseudo labels vs hidden labels (all kept, IoU 0.5)")):
        ax.axvline(burn_in + 0.5, color="gray", lw=0.8, ls=":")
        ax.set_xlabel("epoch")
        ax.set_title(title, fontsize=9)
        if ax.get_legend_handles_labels()[0]:  # no pseudo-label lines when only supervised rows ran
            ax.legend(fontsize=6, ncol=2, loc="lower right")
    return save_figure(fig, out_png)


def gap_closed(row: dict, sup: dict | None, orc: dict | None, metric: str) -> float | None:
    """The fraction of the supervised-to-oracle gap in ``metric`` that ``row`` closes (None without both ends)."""
    if not sup or not orc or orc[metric] <= sup[metric]:
        return None
    return (row[metric] - sup[metric]) / (orc[metric] - sup[metric])


def _gap_closed(row: dict, sup: dict | None, orc: dict | None, metric: str) -> str:
    """``gap_closed`` as a table cell ('' without both ends)."""
    g = gap_closed(row, sup, orc, metric)
    return "" if g is None else f"{g:.0%}"


def _supervised_burn_in(args, results_path: Path, results: dict, row: str) -> str:
    """The finished supervised row's epoch-``burn_in`` checkpoint (another process may have written the row)."""
    results = {**_read_results(results_path), **results}
    if "supervised" not in results:
        raise SystemExit(f"row {row} starts after the supervised row's burn-in: run 'supervised' first")
    return str(Path(results["supervised"]["run"]) / "weights" / f"epoch{args.burn_in}.pt")


def main(rows: dict = ROWS, cost_methods: tuple[str, ...] = ("efficient_teacher",), **defaults) -> None:
    """Run (or resume) the rows, print the table and the step cost; ``defaults`` override the CLI's."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--steps", type=int, default=125, help="optimiser steps per epoch (same for every row)")
    ap.add_argument("--burn-in", type=int, default=None, help="burn-in epochs for SSOD rows (default: 40%% of epochs)")
    ap.add_argument("--imgsz", type=int, default=160)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--model", default="yolov8n")
    ap.add_argument("--width", type=float, default=None, help="width multiplier (default: the model's own)")
    ap.add_argument("--depth", type=float, default=None)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0, help="training seed (batch order, augmentation, init)")
    ap.add_argument("--data-seed", type=int, default=0,
                    help="demo data draw: other images, objects and label split (a second sample of the data)")
    ap.add_argument("--val-interval", type=int, default=2)
    ap.add_argument("--teacher-precision", default="auto", choices=["auto", "fp32", "bf16"],
                    help="the trainer's teacher_precision for every row (auto: bf16 on CPUs with AMX or AVX512-BF16)")
    ap.add_argument("--rows", default=",".join(rows))
    ap.add_argument("--n-train", type=int, default=2000)
    ap.add_argument("--out", default="runs/bench-ssod")
    ap.add_argument("--data-root", default="runs/bench-data")
    ap.add_argument("--no-cost", action="store_true")
    ap.add_argument("--cost-rows", default=",".join(cost_methods),
                    help="rows (or method names) whose SSOD step is timed against a supervised one")
    ap.add_argument("--burn-in-from", default=None,
                    help="fork SSOD rows from this checkpoint (e.g. a running supervised row's epoch<burn-in>.pt) "
                         "instead of waiting for the supervised row to finish")
    ap.add_argument("--jobs", type=int, default=1,
                    help="rows run as N processes at once (cores // N threads each); SSOD rows start as soon as "
                         "the supervised row has written its burn-in checkpoint")
    ap.add_argument("--aug", default=None,
                    help="augmentation settings for every row, KEY=VALUE[,KEY=VALUE] (e.g. mosaic_p=1.0): "
                         "a table whose supervised burn-in the SSOD rows fork from uses them too")
    ap.add_argument("--run-dir", default=None, help=argparse.SUPPRESS)  # set by --jobs for the supervised row
    ap.set_defaults(**defaults)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(int(os.environ.get("SSOD_THREADS", os.cpu_count() or 1)))
    if args.burn_in is None:
        args.burn_in = round(0.4 * args.epochs)

    table = {**EXTRA_ROWS, **rows}
    unknown = [r for r in filter(None, args.rows.split(",")) if r not in table]
    if unknown:  # before any data is written
        raise SystemExit(f"unknown rows {unknown}: choose from {', '.join([*rows, *EXTRA_ROWS])}")
    sfx = f"-d{args.data_seed}" if args.data_seed else ""
    data = {r: make_demo_dataset(Path(args.data_root) / f"demo-r{r}{sfx}", seed=args.data_seed, labeled_ratio=r,
                                 n_train=args.n_train, progress=False)
            for r in (0.1, 1.0)}
    results_path = Path(args.out) / "ssod_gain.json"
    results = _read_results(results_path)
    pending = [r for r in filter(None, args.rows.split(",")) if r not in results]  # resumable: measured rows are kept
    if args.jobs > 1 and pending:
        run_parallel(ap, args, pending, table, results_path)
        results, pending = _read_results(results_path), []
    for row in pending:
        method, ratio, mcfg, *trainer_kw = table[row]
        kw = {k: v for k, v in (trainer_kw[0] if trainer_kw else {}).items() if k != "fork_burn_in"}
        if forks(table[row]) and args.burn_in > 0:
            kw["burn_in_from"] = args.burn_in_from or _supervised_burn_in(args, results_path, results, row)
        t0 = time.perf_counter()
        res = Trainer(config(args, data[ratio], method, mcfg, row, **kw), run_dir=args.run_dir).train()
        results[row] = {**res["metrics"], "minutes": (time.perf_counter() - t0) / 60, "run": res["run_dir"]}
        results = _save_row(results_path, row, results[row])
        print(f"{row}: {results[row]['mAP50-95']:.4f} / {results[row]['mAP50']:.4f} in {results[row]['minutes']:.1f} min", flush=True)

    sup, orc = results.get("supervised"), results.get("oracle_100pct")
    print(f"\nmachine: {platform.machine()} {platform.processor() or ''}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"model {args.model} width {args.width} depth {args.depth}, imgsz {args.imgsz}, batch {args.batch} "
          f"(+{args.batch} unlabeled), {args.epochs} epochs x {args.steps} steps, burn-in {args.burn_in} epochs\n")
    print("(SSOD rows start from the supervised row's burn-in checkpoint: their minutes cover the "
          f"{args.epochs - args.burn_in} post-burn-in epochs only)\n")
    print("| row | mAP50-95 | mAP50 | gap closed (mAP50-95) | gap closed (mAP50) | minutes |")
    print("|---|---|---|---|---|---|")
    order = [r for r in args.rows.split(",") if r in results] + [r for r in results if r not in args.rows.split(",")]
    for row, r in ((row, results[row]) for row in order):
        gaps = [_gap_closed(r, sup, orc, k) for k in ("mAP50-95", "mAP50")]
        print(f"| {row} | {r['mAP50-95']:.4f} | {r['mAP50']:.4f} | {gaps[0]} | {gaps[1]} | {r['minutes']:.1f} |")
    if results:
        print(f"\ncurves: {plot_rows(results, Path(args.out) / 'ssod_gain.png', args.burn_in)}")
    if not args.no_cost:
        for name in filter(None, args.cost_rows.split(",")):
            method, _, mcfg, *trainer_kw = table.get(name, (name, 0.1, {}))
            u = int((trainer_kw[0] if trainer_kw else {}).get("unlabeled_ratio", 1))
            c = step_cost(args, data[0.1], method, method_cfg=mcfg, unlabeled_ratio=u)
            print(f"\nstep cost (median s/step): supervised on {(1 + u) * args.batch} labeled {c['supervised_same_images']:.3f}, "
                  f"{name} {args.batch}+{u * args.batch} {c['ssod']:.3f} -> overhead {c['overhead']:+.0%}")


if __name__ == "__main__":
    main()
