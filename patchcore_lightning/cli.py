"""``python lightning_cli.py test --config configs/<x>.yaml``: one command, every listed category."""

from __future__ import annotations

import logging
import os
import re
import signal
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ProgressBar, TQDMProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import TensorBoardLogger
from torchmetrics.functional.classification import binary_roc

from .backbones import WeightsError
from .data.mvtec import DataError, MVTecDataModule
from .metrics import METRIC_NAMES
from .model_io import SIDECAR_FILE, ModelFormatError
from .module import PatchCoreModule
from .reporting import (
    category_fingerprint,
    mean_row,
    overlay_strip,
    read_run_state,
    review_grid,
    roc_image,
    write_predictions,
    write_run_state,
    write_segmentation_images,
)

__all__ = ["CategoryProgressBar", "PatchCoreCLI", "main"]

log = logging.getLogger("patchcore_lightning")

TRAINER_DEFAULTS: dict[str, Any] = {
    "devices": 1,
    "use_distributed_sampler": False,  # MVTecDataModule shards without repeating images
    "enable_checkpointing": False,
    "enable_model_summary": False,
    "inference_mode": True,
}


class CategoryProgressBar(TQDMProgressBar):
    """The test progress bar, named after the category being evaluated: ``mvtec_bottle (1/15)``."""

    def on_test_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        super().on_test_batch_start(trainer, pl_module, batch, batch_idx, dataloader_idx)
        if batch_idx == 0 and trainer.datamodule is not None:
            dm = trainer.datamodule
            position = f"({dm.categories.index(dm.category) + 1}/{len(dm.categories)})"
            self.test_progress_bar.set_description(f"{dm.dataset_name} {position}")


class PatchCoreCLI(LightningCLI):
    """LightningCLI over PatchCoreModule and MVTecDataModule with a top-level ``results_dir``."""

    def __init__(self, args: list[str] | None = None, run: bool = True) -> None:
        super().__init__(
            PatchCoreModule,
            MVTecDataModule,
            seed_everything_default=0,
            trainer_defaults=TRAINER_DEFAULTS,
            save_config_callback=None,
            args=args,
            run=run,
        )

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument(
            "--results_dir",
            type=str,
            default="results",
            help="Folder for results.csv, segmentation_images/ and the TensorBoard logs.",
        )
        parser.add_argument(
            "--resume",
            type=bool,
            default=False,
            help="Keep the categories results_dir/results.csv already holds when they were computed with "
            "the same models, data and settings (results_config.json); refuse to mix otherwise.",
        )

    @property
    def results_dir(self) -> Path:
        config = self.config[self.subcommand] if self.subcommand else self.config
        return Path(config.results_dir)

    def instantiate_trainer(self, **kwargs: Any) -> L.Trainer:
        trainer_config = {**self._get(self.config_init, "trainer", default={}), **kwargs}
        if trainer_config.get("default_root_dir") is None:
            trainer_config["default_root_dir"] = str(self.results_dir)  # TensorBoard logs under results_dir
        extra = []
        given = trainer_config.get("callbacks") or []
        if trainer_config.get("enable_progress_bar", True) is not False and not any(
            isinstance(c, ProgressBar) for c in given
        ):
            extra.append(CategoryProgressBar())
        return self._instantiate_trainer(trainer_config, extra)

    def fit(
        self,
        model: PatchCoreModule,
        datamodule: MVTecDataModule,
        ckpt_path: str | None = None,
        weights_only: bool | None = None,
        categories: list[str] | None = None,
    ) -> list[Path]:
        """Build every category's memory bank(s) from train/good; write the original's model folders.

        ``categories`` restricts the work to some of ``data.categories`` (used by ``test``).
        """
        _refuse_checkpoint(ckpt_path)
        _check_writable(self.results_dir)
        model.setup("fit")  # numeric settings (TF32) before any backbone runs
        device = self.trainer.strategy.root_device
        seed = self._get(self.config[self.subcommand], "seed_everything")
        seed = 0 if seed is None or seed is True else int(seed)
        if self.trainer.is_global_zero:
            datamodule.prepare_data()
        folders = []
        todo = categories if categories is not None else datamodule.categories
        for i, category in enumerate(todo):
            datamodule.select(category)
            datamodule.setup("fit")
            log.info("Building memory bank for [%s] (%d/%d)...", datamodule.dataset_name, i + 1, len(todo))
            members = model.build_members(datamodule.train_dataloader(), datamodule.imagesize, seed, device)
            folder = self.results_dir / "models" / datamodule.dataset_name
            if self.trainer.is_global_zero:
                model.save_members(folder, members, len(datamodule.train_dataset))
                log.info("model written to %s", folder)
            folders.append(folder)
        return folders

    def test(
        self,
        model: PatchCoreModule,
        datamodule: MVTecDataModule,
        ckpt_path: str | None = None,
        verbose: bool = True,
        weights_only: bool | None = None,
    ) -> dict[str, dict[str, float]]:
        """Evaluate every category of ``data.categories`` with its model; write results.csv after each."""
        _refuse_checkpoint(ckpt_path)
        _check_writable(self.results_dir)
        if not model.model_paths:
            model.model_paths = self._fitted_model_paths(model, datamodule)
        else:
            datamodule.prepare_data()
        categories = datamodule.categories
        n = len(categories)
        for i in range(n):
            model.model_path_for(i, n)  # fail before any work if the counts do not match
        results_dir = self.results_dir
        resume = bool(self._get(self.config[self.subcommand], "resume"))
        previous = read_run_state(results_dir) if resume else {}
        rows: dict[str, dict[str, float]] = {}
        fingerprints: dict[str, str] = {}
        for i, category in enumerate(categories):
            datamodule.select(category)
            model.select(i, n)
            name = datamodule.dataset_name
            fingerprints[name] = category_fingerprint(
                {
                    "dataset": name,
                    "data.root": str(Path(datamodule.root).resolve()),
                    "data.resize": datamodule.resize,
                    "data.imagesize": datamodule.imagesize,
                    "model.backbone_weights": model.backbone_weights,
                    "model.original_bn_warmup": model.original_bn_warmup,
                    "model.allow_tf32": model.allow_tf32,
                },
                model.model_path_for(i, n),
            )
            if name in previous:
                row, fingerprint = previous[name]
                if fingerprint != fingerprints[name]:
                    raise ValueError(
                        f"{results_dir / 'results.csv'} holds {name} computed with other models, data or settings; "
                        f"rerun without --resume true, or use another results_dir"
                    )
                rows[name] = row
                if self.trainer.is_global_zero:
                    log.info("Skipping dataset [%s] (%d/%d): already in results.csv (--resume)", name, i + 1, n)
                continue
            if self.trainer.is_global_zero:
                log.info("Evaluating dataset [%s] (%d/%d)...", name, i + 1, n)
            self.trainer.test(model, datamodule=datamodule, verbose=False)
            result = model.finish_category()
            rows[name] = {k: result[k] for k in METRIC_NAMES}
            if not self.trainer.is_global_zero:
                continue  # every file and log below is rank 0's
            for logger in self.trainer.loggers:
                logger.log_metrics({f"test/{name}/{k}": v for k, v in rows[name].items()}, step=i)
            for k in METRIC_NAMES:
                log.info("%s: %.3f", k, rows[name][k])
            write_run_state(results_dir, rows, fingerprints)
            if model.save_segmentation_images:
                self._save_segmentation_images(datamodule, result, results_dir / "segmentation_images" / name)
            if self._tensorboard is not None:
                self._log_category(datamodule, result, i)
        if self.trainer.is_global_zero and self._tensorboard is not None:
            self._log_run(model, datamodule, rows)
        if self.trainer.is_global_zero and verbose:
            _print_table(rows)
            print(f"results written to {results_dir / 'results.csv'}")
            random = sorted(name for name, digest in model.weights_sha256.items() if digest is None)
            if random:
                print(f"WARNING: {', '.join(random)} ran with RANDOM weights: these are not ImageNet PatchCore numbers")
        return rows

    def predict(
        self,
        model: PatchCoreModule,
        datamodule: MVTecDataModule,
        ckpt_path: str | None = None,
        return_predictions: bool | None = None,
        weights_only: bool | None = None,
    ) -> list[dict]:
        """Score every image under ``data.predict_dir``: predictions.csv, skipped.csv, heatmaps/."""
        _refuse_checkpoint(ckpt_path)
        results_dir = self.results_dir
        _check_writable(results_dir)
        model.predict_dir_out = results_dir
        self.trainer.predict(model, datamodule=datamodule, return_predictions=False)
        rows = model.predictions
        if self.trainer.world_size > 1:  # every rank scored its own shard
            gathered: list[list[dict]] = [[] for _ in range(self.trainer.world_size)]
            torch.distributed.all_gather_object(gathered, rows)
            rows = [row for part in gathered for row in part]
        rows = sorted(rows, key=lambda r: r["path"])
        if self.trainer.is_global_zero:
            scored = write_predictions(results_dir, rows, model.image_threshold, len(model.members))
            skipped = len(rows) - scored
            print(f"scored {scored} images -> {results_dir / 'predictions.csv'}, heatmaps in {results_dir / 'heatmaps'}")
            if skipped:
                print(f"skipped {skipped} unreadable files -> {results_dir / 'skipped.csv'}")
        return rows

    @property
    def _tensorboard(self):
        """The TensorBoard SummaryWriter of the trainer's logger, if it has one."""
        for logger in self.trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                return logger.experiment
        return None

    def _log_category(self, datamodule: MVTecDataModule, result: dict, step: int, per_kind: int = 4) -> None:
        """The cases to look at first (highest-scored normal, lowest-scored anomalous images) and ROCs."""
        writer, name = self._tensorboard, datamodule.dataset_name
        scores, labels = result["scores"].cpu(), result["labels"].cpu()
        normal, anomalous = (labels == 0).nonzero().flatten(), (labels == 1).nonzero().flatten()
        picks = [
            *normal[scores[normal].argsort(descending=True)[:per_kind]].tolist(),
            *anomalous[scores[anomalous].argsort()[:per_kind]].tolist(),
        ]
        if picks:
            dataset = datamodule.test_dataset
            strips = []
            for k in picks:
                index = int(result["indices"][k])
                sample = dataset.samples[index]
                caption = f"{sample.anomaly}/{sample.image.name}  score {float(scores[k]):.4f}"
                strips.append(
                    overlay_strip(dataset.display_image(index), result["masks"][k].cpu().numpy(), result["maps"][k], caption)
                )
            writer.add_image(f"{name}/hardest_cases", review_grid(strips), step, dataformats="CHW")
        curves = {}
        if len(normal) and len(anomalous):
            curves[f"image (AUROC {result['instance_auroc']:.4f})"] = binary_roc(scores.double(), labels)[:2]
        gt = (result["masks"] == 255).flatten().cpu()
        if bool(gt.any()) and not bool(gt.all()):
            maps = result["maps"].flatten().cpu()
            curves[f"pixel (AUROC {result['full_pixel_auroc']:.4f})"] = binary_roc(maps.double(), gt.long())[:2]
            writer.add_pr_curve(f"{name}/pixel_pr", gt.long(), maps.clamp(0, 1), step, num_thresholds=201)
        if curves:
            writer.add_image(f"{name}/roc", roc_image(curves), step, dataformats="CHW")

    def _log_run(self, model: PatchCoreModule, datamodule: MVTecDataModule, rows: dict[str, dict[str, float]]) -> None:
        """``test/mean/<metric>`` scalars and the resolved configuration as hparams."""
        writer = self._tensorboard
        means = mean_row(rows)
        for k, v in means.items():
            writer.add_scalar(f"test/mean/{k}", v, len(rows))
        hparams = {
            "results_dir": str(self.results_dir),
            "data.root": str(datamodule.root),
            "data.categories": ",".join(datamodule.categories),
            "data.resize": datamodule.resize,
            "data.imagesize": datamodule.imagesize,
            "model.model_paths": ",".join(model.model_paths),
            "model.backbone_weights": str(model.backbone_weights),
            "members": "; ".join(model.member_descriptions),
        }
        for i, member in enumerate(model.members, start=1):
            p = member.params
            hparams.update({
                f"member{i}.backbone": p.backbone,
                f"member{i}.layers": ",".join(p.layers),
                f"member{i}.dimensions": f"{p.pretrain_embed_dimension}/{p.target_embed_dimension}",
                f"member{i}.patchsize": p.patchsize,
                f"member{i}.anomaly_scorer_num_nn": p.anomaly_scorer_num_nn,
            })
        writer.add_hparams(hparams, {f"hparam/mean/{k}": v for k, v in means.items()}, run_name=".")
        writer.flush()

    def _fitted_model_paths(self, model: PatchCoreModule, datamodule: MVTecDataModule) -> list[str]:
        """``<results_dir>/models/mvtec_<category>`` for every category; built first where missing."""
        folders = {c: self.results_dir / "models" / f"mvtec_{c}" for c in datamodule.categories}
        missing = [c for c, folder in folders.items() if not (folder / SIDECAR_FILE).is_file()]
        present = [str(folders[c]) for c in datamodule.categories if c not in missing]
        if present:
            log.info("model.model_paths is empty: evaluating the models fit wrote in %s", ", ".join(present))
        if missing:
            log.info("model.model_paths is empty: building the memory banks of %s from the train split", missing)
            self.fit(model, datamodule, categories=missing)
        return [str(folders[c]) for c in datamodule.categories]

    @staticmethod
    def _save_segmentation_images(datamodule: MVTecDataModule, result: dict, folder: Path) -> None:
        dataset = datamodule.test_dataset
        indices = result["indices"].tolist()
        samples = [dataset.samples[i] for i in indices]
        images = [dataset.display_image(i) for i in indices]
        write_segmentation_images(folder, samples, images, result["masks"], result["maps"], result["scores"])
        log.info("segmentation images written to %s", folder)


def _print_table(rows: dict[str, dict[str, float]]) -> None:
    names = [*rows, "mean"]
    means = mean_row(rows)
    width = max(len(n) for n in names) + 2
    print("".join(["dataset".ljust(width), *(k.rjust(21) for k in METRIC_NAMES)]))
    for name in names:
        values = rows.get(name, means)
        print("".join([name.ljust(width), *(f"{values[k]:21.4f}" for k in METRIC_NAMES)]))


def _refuse_checkpoint(ckpt_path: str | None) -> None:
    if ckpt_path is not None:
        raise ValueError(
            f"ckpt_path={ckpt_path!r} is not used: PatchCore models are folders given in model.model_paths"
        )


def _check_writable(folder: Path) -> None:
    """Fail before any work when ``results_dir`` cannot hold our files."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-test-"):
            pass
    except OSError as err:
        raise ResultsDirError(f"results_dir {folder} cannot be written: {err.strerror or err}") from None


class ResultsDirError(RuntimeError):
    """results_dir cannot be created or written."""


_USER_ERRORS = (DataError, ModelFormatError, WeightsError, ResultsDirError, FileNotFoundError, PermissionError, ValueError)


def _one_line(err: BaseException) -> str:
    """The last line of an error's message, without the 'package.module.Error: ' that a DataLoader
    worker's re-raised exception carries."""
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
    message = lines[-1] if lines else type(err).__name__
    return re.sub(r"^(?:[A-Za-z_][\w]*\.)+[A-Za-z_]\w*(?:Error|Exception): ", "", message)


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time (it may be redirected between runs)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(args: list[str] | None = None) -> None:
    """Run the CLI; a bad input ends in one line on stderr and exit code 2 (PATCHCORE_DEBUG=1: traceback)."""
    if not log.handlers:
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _interrupt)  # SIGTERM ends the run like Ctrl+C: files stay whole
    try:
        PatchCoreCLI(args=args)
    except _USER_ERRORS as err:
        if os.environ.get("PATCHCORE_DEBUG"):
            raise
        print(f"error: {_one_line(err)}  (PATCHCORE_DEBUG=1 shows the traceback)", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted: results.csv holds the finished categories; rerun with --resume true", file=sys.stderr)
        sys.exit(130)
