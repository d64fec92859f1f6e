"""Efficient Teacher (Xu et al., 2023; seed 004) for anchor-free YOLO heads and two-stage models.

A two-stage student (``two_stage`` capability: Faster R-CNN) takes the path in ``two_stage.py``
(same thresholds, Epoch Adaptor, hooks, checkpoint state and export metadata); what follows
describes the dense path.

One step after burn-in:

1. the EMA teacher detects on the weak view (one forward at ``teacher_scales`` - by default the
   view enlarged 1.2x, for the small objects a 1x teacher misses, which the loader draws from the
   file at that size (``teacher_view_size``) - class-aware NMS at the detection floor; several
   scales fuse scale-aware in ``assigner.multiscale_teacher_detections``)
   -> per-class thresholds split its boxes into reliable (>= tau2[c]), uncertain
   (tau1[c] <= s < tau2[c]) and dropped; the Epoch Adaptor records every score;
2. the kept boxes move into the strong view (boxes leaving it are dropped);
3. ONE student forward on [labeled images, strong views]: the labeled half gets the supervised
   loss (ultralytics' task-aligned loss, reproduced exactly by the PLA with all boxes
   reliable), the strong half the Pseudo Label Assigner loss (``assigner.py``), and the neck
   features of both halves feed the gradient-reversed domain discriminator (``adaptor.py``);

    L = L_sup + lambda_u * (w_cls L_u^cls + w_box L_u^box + w_dfl L_u^dfl [+ w_ld L_u^ld]) + da_weight * L_da

(L_u^ld: Localization Distillation of the teacher's edge distributions, ``ld_weight`` > 0 only.)

At each epoch end the Epoch Adaptor recomputes tau1[c], tau2[c] from that epoch's teacher
scores and the labeled class counts. The paper leaves the first SSOD epoch at the configured
defaults (0.1 / 0.6), which on a very large unlabeled set is a long stretch of thresholds never
measured against the teacher: ``first_update_images`` N > 0 brings the first update forward to
after N unlabeled images (the same formula over the images seen so far). The default, 0, is the
paper's behaviour: N = 256 measured no gain on the demo benchmark (docs/benchmarks.md, Run 6).
Losses follow ultralytics' scale (sums over images, as ``Detector.loss``), so ``lambda_u`` and
``da_weight`` mean what the paper's do.
"""

from __future__ import annotations

import logging
import re
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from ssod.training.data.batch import Batch
from ssod.training.engine.hooks import Hook
from ssod.training.methods.base import Method, register_method
from ssod.training.methods.efficient_teacher.adaptor import (
    THRESHOLD_RULES,
    DomainDiscriminator,
    EpochAdaptor,
    shrunk_class_counts,
)
from ssod.training.methods.efficient_teacher.dense_guidance import student_assignment, teacher_clusters
from ssod.training.methods.efficient_teacher.assigner import (
    PseudoLabelAssigner,
    class_maps,
    labeled_targets,
    max_stride,
    multiscale_teacher_detections,
    teacher_raw,
)
from ssod.training.methods.efficient_teacher.two_stage import two_stage_feature_channels, two_stage_losses
from ssod.training.models.frcnn import SIZE_DIVISIBLE
from ssod.training.pseudo import (
    PseudoLabels,
    QualityMeter,
    eval_mode,
    enlarged_side,
    hidden_pseudo_labels,
    select,
    true_pseudo_labels,
    weak_to_strong,
)
from ssod.training.pseudo_geometry import resample_maps
from ssod.training.strong_mix import MIX_MODES, mix_strong

if TYPE_CHECKING:
    from ssod.training.models.base import Detector

__all__ = ["EfficientTeacher", "EfficientTeacherHook"]

LOG = logging.getLogger("ssod")


def _key(name: str) -> str:
    return re.sub(r"[^0-9A-Za-z]+", "_", str(name)).strip("_") or "cls"


class EfficientTeacherHook(Hook):
    """Label statistics at the start, counters per epoch, Epoch Adaptor update at each epoch end."""

    def __init__(self, method: "EfficientTeacher"):
        self.method = method

    def before_train(self, trainer: Any) -> None:
        self.method.set_dataset(trainer.spec)

    def before_epoch(self, trainer: Any) -> None:
        self.method.start_epoch()

    def after_epoch(self, trainer: Any) -> None:
        self.method.end_epoch()


@register_method
class EfficientTeacher(Method):
    name = "efficient_teacher"
    uses_unlabeled = True

    CHOICES = {
        "unsup_norm": ("pseudo", "labeled"),
        "unsup_background": ("zero", "teacher"),
        "pseudo_source": ("teacher", "hidden_labels", "teacher_true"),
        "class_prior": ("labeled", "shrunk"),
        "threshold_rule": THRESHOLD_RULES,
        "uncertain_targets": ("soft", "ignore", "vector"),
        "strong_mix": MIX_MODES,
        "assignment": ("tal", "inverse_nms"),
        "inc_target": ("aligned", "iou"),
    }
    ANY_LENGTH = ("teacher_scales",)

    def __init__(self, cfg: dict[str, Any]):
        super().__init__(cfg)
        c = self.cfg
        if not 0.0 <= c["tau1"] <= c["tau2"] <= 1.0:
            raise ValueError(f"method 'efficient_teacher': need 0 <= tau1 <= tau2 <= 1, got {c['tau1']}, {c['tau2']}")
        if not all(1.0 <= x <= 4.0 for x in c["teacher_scales"]):
            raise ValueError(f"method 'efficient_teacher': teacher_scales must lie in [1, 4], got {c['teacher_scales']}")
        if len(set(c["teacher_scales"])) > 1 and 1.0 not in c["teacher_scales"]:
            raise ValueError("method 'efficient_teacher': several teacher_scales must include 1.0 (the pass for "
                             f"large objects), got {c['teacher_scales']}")
        if not 0.0 <= c["strong_mix_p"] <= 1.0:
            raise ValueError(f"method 'efficient_teacher': strong_mix_p must lie in [0, 1], got {c['strong_mix_p']}")
        if c["ld_weight"] < 0 or c["ld_temperature"] <= 0:
            raise ValueError(f"method 'efficient_teacher': need ld_weight >= 0 and ld_temperature > 0, got "
                             f"{c['ld_weight']}, {c['ld_temperature']}")
        if c["strong_mix"] != "none" and c["ld_weight"] > 0:
            raise ValueError("method 'efficient_teacher': ld_weight > 0 needs strong_mix: none (a mosaic or mixup "
                             "does not carry the teacher's edge distributions)")
        if c["strong_mix"] != "none" and c["unsup_background"] == "teacher":
            raise ValueError("method 'efficient_teacher': strong_mix needs unsup_background: zero (the teacher's dense "
                             "maps are read through the strong view's matrix, which a mosaic or mixup does not have)")
        if c["assignment"] == "inverse_nms":
            _check_dense_guidance(c)
        self.names: list[str] | None = None
        self.adaptor: EpochAdaptor | None = None
        self.disc: DomainDiscriminator | None = None
        self._pending_state: dict[str, Any] = {}
        self._label_stats: tuple[np.ndarray, int] | None = None
        self._epoch_tau: tuple[list[float], list[float]] | None = None
        self.meter = QualityMeter()
        self.da_acc: list[float] = []
        self.step_log: dict[str, float] = {}
        self._warned = False
        self.adaptor_updates = 0  # threshold updates so far (the early first one included)

    # --------------------------------------------------------------------------- setup
    def _ensure(self, names: list[str]) -> EpochAdaptor:
        """Create the per-class state once the classes are known (student or dataset)."""
        if self.adaptor is None:
            c = self.cfg
            self.names = list(names)
            self.adaptor = EpochAdaptor(
                len(names), c["tau1"], c["tau2"], c["alpha"], c["hist_bins"],
                c["tau1_bounds"], c["tau2_bounds"], c["tau_gap"], c["beta"], c["threshold_rule"],
            )
            if self._pending_state:
                self.adaptor.load_state_dict(self._pending_state)
            if self._label_stats is not None:
                self.adaptor.set_label_statistics(*self._label_stats)
        return self.adaptor

    def set_dataset(self, spec: Any) -> None:
        """Labeled class counts and image count from a ``DatasetSpec`` (the adaptor's prior;
        ``class_prior: shrunk`` shrinks the mix toward uniform, ``adaptor.shrunk_class_counts``)."""
        source = self.cfg["pseudo_source"]
        if source != "teacher" and not getattr(spec, "unlabeled_hidden", None):
            raise ValueError(
                f"method 'efficient_teacher': pseudo_source {source} needs `hidden_labels:` in the data "
                "yaml (the unlabeled images' ground truth, a diagnostic only)"
            )
        nc = len(spec.names)
        cls = [np.asarray(s.cls, dtype=np.int64).reshape(-1) for s in spec.train]
        flat = np.concatenate(cls) if cls else np.zeros(0, np.int64)
        image = np.repeat(np.arange(len(cls)), [len(c) for c in cls])
        keep = flat < nc
        per_image = np.bincount(image[keep] * nc + flat[keep], minlength=len(cls) * nc).reshape(len(cls), nc)
        counts = per_image.sum(0)
        if self.cfg["class_prior"] == "shrunk":
            shrunk = shrunk_class_counts(torch.from_numpy(per_image)).numpy()
            LOG.info("efficient_teacher: class prior shrunk toward uniform: %s",
                     ", ".join(f"{n} {a} -> {b:.1f}" for n, a, b in zip(spec.names, counts, shrunk)))
            counts = shrunk
        self.set_label_statistics(counts, len(spec.train), names=list(spec.names))

    def set_label_statistics(self, class_counts: Any, n_labeled_images: int, names: list[str] | None = None) -> None:
        self._label_stats = (np.asarray(class_counts), int(n_labeled_images))
        if names is not None:
            self._ensure(names)
        if self.adaptor is not None:
            self.adaptor.set_label_statistics(*self._label_stats)

    def extra_modules(self, student: "Detector | None" = None) -> nn.Module | None:
        """The domain discriminator (trained with the student: optimizer + checkpoint), or None.

        Sized from the student's neck: one dry forward of a small black image in eval mode.
        """
        if not self.cfg["domain_adaptation"]:
            return None
        if self.disc is None:
            if student is None:
                raise ValueError(
                    "efficient_teacher: extra_modules(student) needs the student to size the domain "
                    "discriminator to its neck features (or set domain_adaptation: false)"
                )
            p = next(student.parameters())
            if getattr(student, "two_stage", False):
                channels = two_stage_feature_channels(student)
            else:
                _require_dense(student)
                size = max(64, 2 * max_stride(student))
                with eval_mode(student):
                    feats, _ = student.forward_features(torch.zeros(1, 3, size, size, device=p.device, dtype=p.dtype))
                channels = [f.shape[1] for f in feats]
            self.disc = DomainDiscriminator(channels, hidden=int(self.cfg["da_hidden"])).to(p.device)
        return self.disc

    def teacher_view_size(self, imgsz: int, student: "Detector") -> int:
        """One teacher scale s != 1: the loader draws the weak view at s x ``imgsz`` (rounded as
        ``on_enlarged`` rounds) from the file, so the teacher sees the detail a larger input has
        (SED's larger teacher scale) rather than an upsampled ``imgsz`` view, at the same cost.
        Several scales fuse with the 1x pass, and ``unsup_background: teacher`` reads the teacher's
        maps on the student's grid: both keep the ``imgsz`` view and enlarge it here."""
        scales = set(self.cfg["teacher_scales"])
        if len(scales) > 1 or scales == {1.0} or self.cfg["unsup_background"] == "teacher":
            return int(imgsz)
        return max(int(imgsz), enlarged_side(imgsz, scales.pop(), _size_multiple(student)))

    def pass_scales(self, unlabeled: Batch) -> list[float]:
        """The scales to run the teacher at on ``unlabeled["weak"]``: [1.0] when the loader already
        drew it at the teacher's scale (``teacher_view_size``: larger than the strong view)."""
        if unlabeled["weak"].shape[-1] != unlabeled["strong"].shape[-1]:
            return [1.0]
        return [float(x) for x in self.cfg["teacher_scales"]]

    def hooks(self) -> list[Hook]:
        return [EfficientTeacherHook(self)]

    # --------------------------------------------------------------------------- epoch
    def start_epoch(self) -> None:
        self.meter.reset()
        self.da_acc = []
        self._epoch_tau = self._tau_lists() if self.adaptor is not None else None

    def end_epoch(self) -> bool:
        """Recompute the per-class thresholds (Epoch Adaptor). True if they were updated."""
        if self.adaptor is None or not self.cfg["adaptive_thresholds"] or self.burn_in:
            if self.adaptor is not None:
                self.adaptor.reset()
            return False
        updated = self.adaptor.update()
        self.adaptor_updates += int(updated)
        return updated

    def observe_teacher(self, adaptor: EpochAdaptor, scores: torch.Tensor, labels: torch.Tensor, n_images: int) -> None:
        """Feed one step's teacher scores to the adaptor; the very first update comes early, after
        ``first_update_images`` images, instead of a whole epoch at the default thresholds."""
        adaptor.observe(scores, labels, n_images)
        first = int(self.cfg["first_update_images"])
        if first > 0 and self.adaptor_updates == 0 and adaptor.images >= first and adaptor.update():
            self.adaptor_updates = 1
            self._epoch_tau = self._tau_lists()  # what this epoch mostly ran with, for the log
            LOG.info("efficient_teacher: first per-class thresholds from %d unlabeled images", first)

    def thresholds(self, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """Current (tau1, tau2) per class; fixed at the configured values without the adaptor."""
        a = self.adaptor
        assert a is not None
        if self.cfg["adaptive_thresholds"]:
            return a.tau1.to(device), a.tau2.to(device)
        nc = a.nc
        return (
            torch.full((nc,), self.cfg["tau1"], dtype=torch.float64, device=device),
            torch.full((nc,), self.cfg["tau2"], dtype=torch.float64, device=device),
        )

    def _tau_lists(self) -> tuple[list[float], list[float]]:
        t1, t2 = self.thresholds()
        return [float(x) for x in t1], [float(x) for x in t2]

    def diagnostic_source(self, weak: PseudoLabels, unlabeled: Batch) -> PseudoLabels:
        """The teacher's boxes, or what a diagnostic ``pseudo_source`` puts in their place (the
        hidden labels; the teacher's boxes that match one)."""
        source = self.cfg["pseudo_source"]
        if source == "hidden_labels":
            return hidden_pseudo_labels(unlabeled)
        if source == "teacher_true":
            return true_pseudo_labels(weak, unlabeled, self.cfg["quality_iou"])
        return weak

    # --------------------------------------------------------------------------- step
    def losses(
        self, labeled: Batch, unlabeled: Batch | None, student: "Detector", teacher: "Detector | None"
    ) -> dict[str, torch.Tensor]:
        if self.burn_in or unlabeled is None or teacher is None:
            sup, parts = student.loss(labeled)
            self.step_log = {f"sup_{k}": float(v) for k, v in parts.items()}
            return {"sup": sup}
        two_stage = bool(getattr(student, "two_stage", False))  # a capability, never the model name
        if not two_stage:
            _require_dense(student)
        c = self.cfg
        adaptor = self._ensure(student.names)
        if c["domain_adaptation"] and self.disc is None:
            raise RuntimeError(
                "efficient_teacher: domain_adaptation is on but extra_modules(student) was never called; "
                "its discriminator must be built and given to the optimizer before training"
            )
        if (self.cfg["adaptive_thresholds"] and c["threshold_rule"] == "counts" and adaptor.class_counts is None
                and not self._warned):
            LOG.warning(
                "efficient_teacher: no labeled class counts (set_dataset was not called); thresholds stay fixed"
            )
            self._warned = True

        if two_stage:
            if c["strong_mix"] != "none":
                raise ValueError("efficient_teacher: strong_mix (mosaic/mixup of pseudo-labeled images) is for dense "
                                 "YOLO students; this student is two-stage: set strong_mix: none")
            if c["nms_agnostic"]:
                raise ValueError("efficient_teacher: nms_agnostic (class-agnostic teacher NMS) is for dense YOLO "
                                 "students; this student is two-stage (its detector's own NMS): set nms_agnostic: false")
            if len(set(c["teacher_scales"])) > 1:
                raise ValueError(
                    "efficient_teacher: several teacher_scales (the fused multi-scale teacher) are for dense YOLO "
                    f"students; this student is two-stage: give one scale, e.g. [1.2], got {c['teacher_scales']}"
                )
            return two_stage_losses(self, labeled, unlabeled, student, teacher)

        # 1. teacher on the weak view; every score feeds the adaptor
        device = unlabeled["weak"].device
        tau1, tau2 = self.thresholds(device)
        floor = adaptor.floor() if c["adaptive_thresholds"] else float(tau1.min())
        # the 1x maps: for the 1x detection pass and/or the "teacher" background targets
        scales = self.pass_scales(unlabeled)
        need_1x = 1.0 in scales or c["unsup_background"] == "teacher"
        raw_t = teacher_raw(teacher, unlabeled["weak"]) if need_1x else None
        weak = multiscale_teacher_detections(teacher, unlabeled["weak"], floor, c["nms_iou"], c["max_det"], scales,
                                             raw=raw_t, agnostic=c["nms_agnostic"])
        bu = int(unlabeled["weak"].shape[0])
        if c["adaptive_thresholds"]:
            self.observe_teacher(adaptor, weak["scores"], weak["labels"], bu)
        weak = self.diagnostic_source(weak, unlabeled)
        below1 = weak["scores"] < tau1[weak["labels"]]
        # ignore regions: sub-tau1 boxes (ignore_low_score) and/or the uncertain band (uncertain_targets
        # ignore: DSL's ignore band, no soft targets and no background either)
        band = weak["scores"] < tau2[weak["labels"]] if c["uncertain_targets"] == "ignore" else torch.zeros_like(below1)
        ignored = (below1 & c["ignore_low_score"]) | (band & ~below1)
        low = select(weak, ignored) if c["ignore_low_score"] or c["uncertain_targets"] == "ignore" else None
        weak = select(weak, ~below1)
        weak["reliable"] = weak["scores"] >= tau2[weak["labels"]]
        # uncertain_box_loc >= 1 is the paper's plain PLA: no uncertain box gets box loss, however sharp
        sharp = weak["loc_quality"] >= c["uncertain_box_loc"] if c["uncertain_box_loc"] < 1.0 else False
        weak["box_ok"] = weak["reliable"] | sharp
        self.meter.add_images(bu)
        self.meter.add_quality("pl", weak, unlabeled, iou=c["quality_iou"])
        self.meter.add_quality("pl_reliable", select(weak, weak["reliable"]), unlabeled, iou=c["quality_iou"])

        guidance = None
        if c["assignment"] == "inverse_nms":  # DTG: the targets are the teacher's NMS clusters (the same
            # maps decoded again: the pass above stays, its NMS at the floor feeds the adaptor and the meter)
            if scales != [1.0]:
                raise ValueError("efficient_teacher: assignment: inverse_nms needs the teacher's pass on the weak view as "
                                 f"drawn (teacher_scales [1.0], or one scale drawn from the file), got {scales}")
            tal = student.criterion().assigner
            aligned = (float(tal.alpha), float(tal.beta)) if c["inc_target"] == "aligned" else None
            clusters = teacher_clusters(teacher, raw_t, tuple(unlabeled["weak"].shape[-2:]), tau1, c["nms_iou"],
                                        aligned)
            weak = clusters.heads
            weak["reliable"] = weak["scores"] >= tau2[weak["labels"]]
            weak["box_ok"] = weak["reliable"]
            guidance = clusters

        # 2. into the strong view
        if c["uncertain_targets"] == "ignore":
            weak = select(weak, weak["reliable"])
        if c["uncertain_targets"] != "vector":
            weak.pop("class_scores", None)
        if c["ld_weight"] <= 0:  # the edge distributions are LD's targets only
            weak.pop("edge_support", None)
            weak.pop("edge_dist", None)
        strong = weak_to_strong(weak, unlabeled, c["min_box_size"], c["min_visible"])
        kept = None
        if guidance is not None:  # each kept box's row in the strong view, -1 if it left it
            kept = torch.full((len(guidance.heads["scores"]),), -1, dtype=torch.long, device=device)
            kept[strong.pop("head")] = torch.arange(len(strong["scores"]), device=device)
        n_rel = int(strong["reliable"].sum())
        n_unc = len(strong["scores"]) - n_rel
        n_unc_box = int((strong["box_ok"] & ~strong["reliable"]).sum())
        self.meter.add_count("pl_reliable", n_rel)
        self.meter.add_count("pl_uncertain", n_unc)
        self.meter.add_count("pl_uncertain_box", n_unc_box)

        ignore = weak_to_strong(low, unlabeled, c["min_box_size"], c["min_visible"]) if low is not None else None
        labeled_t = labeled_targets(labeled)
        # Instant-Teaching's mosaic/mixup of the pseudo-labeled images (with the labeled ones as a pool)
        strong_img, strong, ignore = mix_strong(
            c["strong_mix"], unlabeled["strong"].to(labeled["img"].dtype), strong, ignore, labeled["img"], labeled_t,
            c["strong_mix_p"], c["min_box_size"], c["min_visible"],
        )
        self.record_targets(strong_img, strong)

        # 3. one student forward on labeled + strong images
        bl = int(labeled["img"].shape[0])
        img = torch.cat((labeled["img"], strong_img), 0)
        if c["domain_adaptation"]:
            feats, raw = student.forward_features(img)
        else:
            feats, raw = None, student.forward_raw(img)
        crit = student.criterion()
        sup = PseudoLabelAssigner(crit)([r[:bl] for r in raw], labeled_t)
        pla = PseudoLabelAssigner(crit, c["unsup_cls_weight"], c["unsup_box_weight"], c["unsup_dfl_weight"],
                                  c["ld_weight"], c["ld_temperature"], c["rm_temperature"])
        # "labeled": the unlabeled half is normalised by at least the labeled half's target mass
        # (per image), so scarce pseudo labels do not scale up every background position's loss
        norm = sup["norm"] * (bu / bl) if c["unsup_norm"] == "labeled" else None
        # "teacher": unassigned positions learn the teacher's own scores there (read through the
        # weak->strong matrices), not 0: an object the teacher saw below tau1 is not taught as background
        bg = None
        if c["unsup_background"] == "teacher":
            bg = resample_maps(
                class_maps(raw_t, int(teacher.reg_max)), unlabeled["M_weak"], unlabeled["M_strong"],
                int(unlabeled["strong"].shape[-1]),
            )
        assignment = None
        if guidance is not None:
            assert kept is not None
            assignment = student_assignment(
                guidance, kept, unlabeled["M_weak"], unlabeled["M_strong"], _grid(raw_t), _strides(teacher),
                _grid(raw), _strides(student),
            )
            self.meter.add_count("pl_members", int((assignment.index >= 0).sum()))
        uns = pla([r[bl:] for r in raw], strong, ignore, min_norm=norm, background=bg, assignment=assignment)
        if ignore is not None:
            self.meter.add_count("pl_ignore_regions", len(ignore["scores"]))
        lam = self.unsup_weight()
        # L = L_s + lambda * L_u with each part per image of its own batch (the papers' form), both at
        # ultralytics' scale of the labeled batch size: lambda weighs the same at any labeled:unlabeled
        # ratio (at 1:1 this is ultralytics' sum over all images)
        out = {
            "sup": (sup["box"] + sup["cls"] + sup["dfl"]) * bl,
            "unsup_cls": lam * bl * uns["cls"],
            "unsup_box": lam * bl * uns["box"],
            "unsup_dfl": lam * bl * uns["dfl"],
        }
        if c["ld_weight"] > 0:
            out["unsup_ld"] = lam * bl * uns["ld"]
        if guidance is not None and c["rm_weight"] > 0:
            out["unsup_rm"] = lam * bl * c["rm_weight"] * uns["rm"]
        self.step_log = {
            "lambda_u": lam,
            **{f"sup_{k}": float(sup[k].detach()) for k in ("box", "cls", "dfl")},
        }  # pseudo-label counts and da_acc are per-epoch method/ values (the meter), not repeated here
        if feats is not None and self.disc is not None:
            domain = torch.cat((torch.zeros(bl, device=img.device), torch.ones(bu, device=img.device)))
            da, acc = self.disc.loss(feats, domain, c["grl_coeff"])
            out["da"] = c["da_weight"] * da * (bl + bu)  # summed over images like the detection losses
            self.da_acc.append(float(acc))
        return out

    # --------------------------------------------------------------------------- reporting
    def log_values(self) -> dict[str, float]:
        out = dict(self.meter.values())
        if self.da_acc:
            out["da_acc"] = float(np.mean(self.da_acc))
        if self.adaptor is not None and self.names is not None:
            t1, t2 = self._epoch_tau or self._tau_lists()
            for name, a, b in zip(self.names, t1, t2):
                out[f"tau1_{_key(name)}"] = a
                out[f"tau2_{_key(name)}"] = b
        return out

    def state_dict(self) -> dict[str, Any]:
        if self.adaptor is None:
            return dict(self._pending_state)
        t1, t2 = self._tau_lists()
        return {"tau1": t1, "tau2": t2, "adaptive": bool(self.cfg["adaptive_thresholds"]),
                "updates": self.adaptor_updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.adaptor_updates = int(state.get("updates", 0))
        state = {k: state[k] for k in ("tau1", "tau2") if k in state}
        if self.adaptor is None:
            self._pending_state = state
        elif state:
            self.adaptor.load_state_dict(state)

    def export_metadata(self) -> dict[str, Any]:
        """Per-class thresholds travel with the exported teacher: tau2 = reliable score, tau1 = lowest used."""
        meta: dict[str, Any] = {"method": self.name}
        if self.adaptor is not None or self._pending_state:
            st = self.state_dict()
            meta.update({"tau1": st.get("tau1"), "tau2": st.get("tau2")})
            if self.names is not None:
                meta["names"] = list(self.names)
        return meta


def _check_dense_guidance(c: dict[str, Any]) -> None:
    """``assignment: inverse_nms`` reads one teacher pass's dense maps through the strong view's matrix."""
    why = []
    if len(set(c["teacher_scales"])) > 1:
        why.append(f"one teacher_scales value (got {c['teacher_scales']})")
    if c["strong_mix"] != "none":
        why.append("strong_mix: none")
    if c["unsup_background"] != "zero":
        why.append("unsup_background: zero")
    if c["uncertain_targets"] != "soft" or c["uncertain_box_loc"] < 1.0:
        why.append("uncertain_targets: soft and uncertain_box_loc: 1 (the per-position targets replace both)")
    if c["ld_weight"] > 0:
        why.append("ld_weight: 0")
    if c["pseudo_source"] != "teacher":
        why.append("pseudo_source: teacher")
    if c["rm_weight"] < 0 or c["rm_temperature"] <= 0:
        why.append("rm_weight >= 0 and rm_temperature > 0")
    if why:
        raise ValueError("method 'efficient_teacher': assignment: inverse_nms needs " + "; ".join(why))


def _size_multiple(model: "Detector") -> int:
    """What the model's input sides must be a multiple of: its largest stride (dense heads), or
    torchvision's ``size_divisible`` for two-stage models."""
    if getattr(model, "two_stage", False):
        return SIZE_DIVISIBLE
    return max_stride(model)


def _grid(raw: list[torch.Tensor]) -> list[tuple[int, int]]:
    return [(int(x.shape[-2]), int(x.shape[-1])) for x in raw]


def _strides(model: "Detector") -> list[float]:
    return [float(s) for s in torch.as_tensor(model.stride).flatten()]


def _require_dense(model: "Detector") -> None:
    need = ("criterion", "decode", "forward_features", "reg_max", "stride")
    missing = [n for n in need if not hasattr(model, n)]
    if missing:
        raise ValueError(
            f"efficient_teacher needs an anchor-free YOLO model (ultralytics Detect head) or a two-stage model; "
            f"model family '{getattr(model, 'family', type(model).__name__)}' lacks {missing}: use --method mean_teacher"
        )
