"""``python lightning_cli.py {test,fit,predict} --config configs/<x>.yaml``: one command, every listed category.

The CLI runs Lightning's loops once per category (``trainer.test`` / ``trainer.fit``), as the
original's multi-category run does, keeps results.csv and its resume state, and reports bad input
in one line. The work itself is the module's; the files are the callbacks'.
"""

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
from lightning.pytorch.callbacks import ProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import TensorBoardLogger

from .backbones import WeightsError
from .callbacks import CategoryProgressBar, ModelFolderWriter, PredictionWriter, SegmentationImages, TensorBoardReport
from .data.datamodule import AnomalyDataModule
from .data.images import DataError
from .export import ExportOptions, export_folders
from .metrics import METRIC_NAMES, THRESHOLD_NAMES
from .model_io import SIDECAR_FILE, ModelFormatError
from .module import PatchCoreModule, frozen_model_strategy
from .reporting import category_fingerprint, mean_row, read_run_state, write_run_state

__all__ = ["PatchCoreCLI", "PatchCoreTrainer", "main"]

log = logging.getLogger("patchcore_lightning")

TRAINER_DEFAULTS: dict[str, Any] = {
    "devices": 1,
    "use_distributed_sampler": False,  # the data module shards without repeating images
    "enable_checkpointing": False,
    "enable_model_summary": False,
    "inference_mode": True,
    "max_epochs": 1,  # fit is one pass over the training images
    "num_sanity_val_steps": 0,
    "log_every_n_steps": 1,  # fit logs nothing per step; a larger interval only earns a warning on small sets
}


class PatchCoreTrainer(L.Trainer):
    """Lightning's Trainer with ``export``, the subcommand LightningCLI builds from this signature."""

    def export_models(
        self, model: PatchCoreModule, datamodule: AnomalyDataModule, export: ExportOptions = ExportOptions()  # noqa: B008
    ) -> list[Path]:
        """Export every folder of model.model_paths to ONNX (and OpenVINO IR) under <results_dir>/export/."""
        return export_folders(model, datamodule, self.default_root_dir, export)

    # The subcommand's name; the function keeps another so that its argument group is not named
    # ``export`` as well (jsonargparse names a method's group after it, and ``--export.*`` is the options').
    export = export_models


class PatchCoreCLI(LightningCLI):
    """LightningCLI over PatchCoreModule and AnomalyDataModule, with ``results_dir`` and ``resume``."""

    def __init__(self, args: list[str] | None = None, run: bool = True) -> None:
        self._logger: TensorBoardLogger | None = None
        super().__init__(
            PatchCoreModule,
            AnomalyDataModule,
            seed_everything_default=0,
            trainer_defaults=TRAINER_DEFAULTS,
            save_config_callback=None,
            trainer_class=PatchCoreTrainer,
            args=args,
            run=run,
        )

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument(
            "--results_dir",
            type=str,
            default="results",
            help="Folder for results.csv, segmentation_images/, models/, predictions and the TensorBoard logs.",
        )
        parser.add_argument(
            "--resume",
            type=bool,
            default=False,
            help="Keep the categories results_dir/results.csv already holds when they were computed with "
            "the same models, data and settings (results_config.json); refuse to mix otherwise.",
        )

    def _config(self, config) -> Any:
        return config[self.subcommand] if self.subcommand else config

    @property
    def results_dir(self) -> Path:
        return Path(self._config(self.config).results_dir)

    def instantiate_trainer(self, **kwargs: Any) -> L.Trainer:
        """Lightning's Trainer from the config, writing under ``results_dir``: TensorBoard by default,
        our callbacks added, and a DDP strategy that leaves the frozen model unwrapped."""
        config = self._config(self.config_init)["trainer"]
        results_dir = self.results_dir
        kwargs.setdefault("default_root_dir", config.get("default_root_dir") or str(results_dir))
        if config.get("logger") in (None, True):
            if self._logger is None:  # one TensorBoard run for every category
                self._logger = TensorBoardLogger(results_dir, name="lightning_logs", default_hp_metric=False)
            kwargs.setdefault("logger", self._logger)
        given = list(config.get("callbacks") or [])
        ours = [SegmentationImages(results_dir), TensorBoardReport(), PredictionWriter(results_dir),
                ModelFolderWriter(results_dir)]
        if config.get("enable_progress_bar", True) is not False and not any(isinstance(c, ProgressBar) for c in given):
            ours.append(CategoryProgressBar())
        kwargs.setdefault("callbacks", [*given, *ours])
        strategy = frozen_model_strategy(kwargs.get("strategy", config.get("strategy")))
        if strategy is not None:
            kwargs["strategy"] = strategy
        return super().instantiate_trainer(**kwargs)

    # ------------------------------------------------------------------ the subcommands
    def fit(
        self,
        model: PatchCoreModule,
        datamodule: AnomalyDataModule,
        ckpt_path: str | None = None,
        weights_only: bool | None = None,
        categories: list[str] | None = None,
    ) -> list[Path]:
        """Build every category's model from its train/good images (``trainer.fit``, one per category);
        each is written to ``<results_dir>/models/<dataset>``. ``categories`` restricts the work."""
        _refuse_checkpoint(ckpt_path)
        _check_writable(self.results_dir)
        todo = categories if categories is not None else datamodule.categories
        folders = []
        for i, category in enumerate(todo):
            datamodule.select(category)
            log.info("Building memory bank for [%s] (%d/%d)...", datamodule.dataset_name, i + 1, len(todo))
            self.instantiate_trainer().fit(model, datamodule=datamodule)  # a fresh fit loop per category
            folders.append(ModelFolderWriter(self.results_dir).folder(datamodule.dataset_name))
        return folders

    def test(
        self,
        model: PatchCoreModule,
        datamodule: AnomalyDataModule,
        ckpt_path: str | None = None,
        verbose: bool = True,
        weights_only: bool | None = None,
    ) -> dict[str, dict[str, float]]:
        """Evaluate every category of ``data.categories`` with its model; results.csv and thresholds.csv after each."""
        _refuse_checkpoint(ckpt_path)
        results_dir = self.results_dir
        _check_writable(results_dir)
        categories = datamodule.categories
        paths = model.hparams.model_paths or self._fitted_model_paths(model, datamodule)
        folders = [_model_path(paths, i, len(categories)) for i in range(len(categories))]  # fails before any work
        previous = read_run_state(results_dir) if self._config(self.config).resume else {}
        rows: dict[str, dict[str, float]] = {}
        fingerprints: dict[str, str] = {}
        h = model.hparams
        for i, (category, folder) in enumerate(zip(categories, folders)):
            datamodule.select(category)
            model.select_model(folder)
            name = datamodule.dataset_name
            settings = {
                "dataset": name,
                "data.benchmark": datamodule.hparams.benchmark,
                "data.root": str(Path(datamodule.hparams.root).resolve()),
                "data.resize": datamodule.hparams.resize,
                "data.imagesize": datamodule.hparams.imagesize,
                "model.backbone_weights": h.backbone_weights,
                "model.original_bn_warmup": h.original_bn_warmup,
                "model.allow_tf32": h.allow_tf32,
            }
            fingerprints[name] = category_fingerprint(settings, folder)
            if name in previous:
                row, fingerprint = previous[name]
                if fingerprint != fingerprints[name]:
                    raise ValueError(
                        f"{results_dir / 'results.csv'} holds {name} computed with other models, data or settings; "
                        f"rerun without --resume true, or use another results_dir"
                    )
                rows[name] = row
                if self.trainer.is_global_zero:
                    log.info("Skipping dataset [%s] (%d/%d): already in results.csv (--resume)", name, i + 1, len(folders))
                continue
            if self.trainer.is_global_zero:
                log.info("Evaluating dataset [%s] (%d/%d)...", name, i + 1, len(folders))
            self.trainer.test(model, datamodule=datamodule, verbose=False)
            rows[name] = {k: model.result[k] for k in METRIC_NAMES + THRESHOLD_NAMES}
            if self.trainer.is_global_zero:
                for k in METRIC_NAMES:
                    log.info("%s: %.3f", k, rows[name][k])
                write_run_state(results_dir, rows, fingerprints)
        if self.trainer.is_global_zero:
            self._log_run(model, datamodule, rows)
            if verbose:
                _print_table(rows)
                print(f"results written to {results_dir / 'results.csv'}, F1-max thresholds to {results_dir / 'thresholds.csv'}")
                random = sorted(name for name, digest in model.backbone_cache.sha256.items() if digest is None)
                if random:
                    print(f"WARNING: {', '.join(random)} ran with RANDOM weights: these are not ImageNet PatchCore numbers")
        return rows

    def predict(
        self,
        model: PatchCoreModule,
        datamodule: AnomalyDataModule,
        ckpt_path: str | None = None,
        return_predictions: bool | None = None,
        weights_only: bool | None = None,
    ) -> None:
        """Score every image under ``data.predict_dir``: predictions.csv, skipped.csv, heatmaps/."""
        _refuse_checkpoint(ckpt_path)
        _check_writable(self.results_dir)
        self.trainer.predict(model, datamodule=datamodule, return_predictions=False)

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        return {**LightningCLI.subcommands(), "export": {"model", "datamodule"}}

    def export(
        self, model: PatchCoreModule, datamodule: AnomalyDataModule, export: ExportOptions = ExportOptions()  # noqa: B008
    ) -> list[Path]:
        """Write every folder of model.model_paths as ONNX (and OpenVINO IR) under results_dir/export/."""
        _check_writable(self.results_dir)
        written = export_folders(model, datamodule, self.results_dir, export)
        for path in written:
            print(f"exported {path} and {path.with_name('metadata.json')}")
        return written

    # ------------------------------------------------------------------ helpers
    def _fitted_model_paths(self, model: PatchCoreModule, datamodule: AnomalyDataModule) -> list[str]:
        """``<results_dir>/models/<dataset>`` of every category; built first where missing."""
        writer = ModelFolderWriter(self.results_dir)
        folders = {c: writer.folder(datamodule.dataset_name_of(c)) for c in datamodule.categories}
        missing = [c for c, folder in folders.items() if not (folder / SIDECAR_FILE).is_file()]
        present = [str(folders[c]) for c in datamodule.categories if c not in missing]
        if present:
            log.info("model.model_paths is empty: evaluating the models fit wrote in %s", ", ".join(present))
        if missing:
            log.info("model.model_paths is empty: building the memory banks of %s from the train split", missing)
            self.fit(model, datamodule, categories=missing)
        return [str(folders[c]) for c in datamodule.categories]

    def _log_run(self, model: PatchCoreModule, datamodule: AnomalyDataModule, rows: dict[str, dict[str, float]]) -> None:
        """The run's summary for every logger: ``test/mean/<metric>``, and the configuration as
        hyperparameters with the mean instance AUROC as ``hp_metric``."""
        if not rows:
            return
        means = mean_row(rows)
        h, d = model.hparams, datamodule.hparams
        hparams = {
            "data.benchmark": d.benchmark,
            "data.root": str(d.root),
            "data.categories": ",".join(datamodule.categories),
            "data.resize": d.resize,
            "data.imagesize": d.imagesize,
            "model.model_paths": ",".join(model.hparams.model_paths or []),
            "model.backbone_weights": str(h.backbone_weights),
        }
        if model.model is not None:
            for i, p in enumerate(model.model.params, start=1):
                hparams.update({
                    f"member{i}.backbone": p.backbone,
                    f"member{i}.layers": ",".join(p.layers),
                    f"member{i}.dimensions": f"{p.pretrain_embed_dimension}/{p.target_embed_dimension}",
                    f"member{i}.patchsize": p.patchsize,
                    f"member{i}.anomaly_scorer_num_nn": p.anomaly_scorer_num_nn,
                })
        for logger in self.trainer.loggers:
            logger.log_metrics({f"test/mean/{k}": v for k, v in means.items()}, step=len(rows))
            logger.log_hyperparams(hparams, metrics={"hp_metric": means["instance_auroc"]})
            logger.save()


def _model_path(paths: list[str], index: int, n_categories: int) -> str:
    """The model folder of the ``index``-th of ``n_categories`` categories (the original's rule)."""
    if len(paths) == 1:
        return paths[0]
    if len(paths) != n_categories:
        raise ValueError(
            f"model.model_paths has {len(paths)} entries for {n_categories} categories: "
            f"give one folder per category, or exactly one for all"
        )
    return paths[index]


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


class _RepeatedLightningLines(logging.Filter):
    """Lightning's lines that a multi-category run would repeat: its accelerator lines are shown for
    the first Trainer only (fit builds one per category), its "💡 Tip" advertisement never."""

    DEVICE_LINES = ("GPU available", "TPU available", "HPU available")

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        message = str(record.msg)
        if message.startswith("💡 Tip"):
            return False
        if message.startswith(self.DEVICE_LINES):
            if message in self.seen:
                return False
            self.seen.add(message)
        return True


def main(args: list[str] | None = None) -> None:
    """Run the CLI; a bad input ends in one line on stderr and exit code 2 (PATCHCORE_DEBUG=1: traceback)."""
    lightning_log = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    for old in [f for f in lightning_log.filters if isinstance(f, _RepeatedLightningLines)]:
        lightning_log.removeFilter(old)  # each run shows its own accelerator lines once
    lightning_log.addFilter(_RepeatedLightningLines())
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
