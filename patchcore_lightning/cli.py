"""``python lightning_cli.py {test,fit,predict} --config configs/<x>.yaml``: one command, every listed category.

The CLI runs Lightning's loops once per category (``trainer.test`` / ``trainer.fit``), as the
original's multi-category run does, keeps results.csv and its resume state, and reports bad input
in one line. The work itself is the module's; the files are the callbacks'.
"""

from __future__ import annotations

import difflib
import functools
import importlib.util
import json
import logging
import os
import re
import signal
import sys
import tempfile
import threading
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import TensorBoardLogger

from .backbones import BACKBONES, WeightsError
from .callbacks import CategoryProgressBar, ModelFolderWriter, PredictionWriter, SegmentationImages, TensorBoardReport
from .data.checks import check_split
from .data.datamodule import AnomalyDataModule
from .data.images import DataError
from .export import ExportOptions, export_folders
from .metrics import METRIC_NAMES, Evaluation
from .model_io import SIDECAR_FILE, ModelFormatError, check_model_folder
from .module import EvaluationReceiver, PatchCoreModule, frozen_model_strategy
from .reporting import category_fingerprint, mean_row, read_results, read_run_state, write_run_state

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


# Trainer options that do not apply to a tool that trains nothing and runs each loop once over every
# image: not offered by --help, and an error naming them when given. The settings this tool needs
# instead are fixed (``_FIXED_TRAINER_SETTINGS``).
_UNUSED_TRAINER_OPTIONS = frozenset({
    "accumulate_grad_batches", "barebones", "check_val_every_n_epoch", "detect_anomaly", "enable_checkpointing",
    "fast_dev_run", "gradient_clip_algorithm", "gradient_clip_val", "inference_mode", "limit_predict_batches",
    "limit_test_batches", "limit_train_batches", "limit_val_batches", "log_every_n_steps", "max_epochs", "max_steps",
    "max_time", "min_epochs", "min_steps", "model_registry", "num_sanity_val_steps", "overfit_batches",
    "reload_dataloaders_every_n_epochs", "sync_batchnorm", "use_distributed_sampler", "val_check_interval",
})
_FIXED_TRAINER_SETTINGS = {k: v for k, v in TRAINER_DEFAULTS.items() if k in _UNUSED_TRAINER_OPTIONS}


class PatchCoreTrainer(L.Trainer):
    """Lightning's Trainer with the three loops this tool runs, described in its terms (the
    descriptions are the CLI's subcommand help)."""

    def fit(self, model: L.LightningModule, datamodule: L.LightningDataModule | None = None) -> None:
        """Build each category's memory bank from its train images (one pass) and write its model folder."""
        super().fit(model, datamodule=datamodule)

    def test(self, model: L.LightningModule, datamodule: L.LightningDataModule | None = None, verbose: bool = True) -> Any:
        """Evaluate each category with its model folder (built first where model_paths is null): results.csv."""
        return super().test(model, datamodule=datamodule, verbose=verbose)

    def predict(
        self, model: L.LightningModule, datamodule: L.LightningDataModule | None = None, return_predictions: bool | None = None
    ) -> Any:
        """Score every image under data.predict_dir with one model folder: predictions.csv, heatmaps."""
        return super().predict(model, datamodule=datamodule, return_predictions=return_predictions)

    def export_models(
        self, model: PatchCoreModule, datamodule: AnomalyDataModule, export: ExportOptions = ExportOptions()  # noqa: B008
    ) -> list[Path]:
        """Export every folder of model.model_paths to ONNX (and OpenVINO IR) under <results_dir>/export/."""
        return export_folders(model, datamodule, self.default_root_dir, export)

    # The subcommand's name; the function keeps another so that its argument group is not named
    # ``export`` as well (jsonargparse names a method's group after it, and ``--export.*`` is the options').
    export = export_models


class _OneLineErrorParser(LightningArgumentParser):
    """A bad command line ends in one line that names the key, the value and what was expected (the
    closest valid key for an unknown one), instead of the usage dump; ``--help`` is unchanged."""

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        if not self.exit_on_error or os.environ.get("JSONARGPARSE_DEBUG"):  # parsing inside jsonargparse
            super().error(message, ex)
        parser = getattr(ex, "subcommand_parser", None) or self
        try:
            keys = list(parser.get_defaults().keys())
        except Exception:  # a parser whose defaults cannot be built: no suggestions
            keys = []
        sys.stderr.write(f"error: {_argument_error_line(message, keys)}  (--help lists the options)\n")
        self.exit(2)


def _closest(word: str, candidates: Sequence[str]) -> str | None:
    match = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.6)
    return match[0] if match else None


def _type_names(text: str) -> str:
    """``[<class 'int'>, <class 'NoneType'>]`` as ``int or null``."""
    names = re.sub(r"<class '(?:\w+\.)*(\w+)'>", r"\1", text).replace("NoneType", "null").strip("[]")
    return " or ".join(n.strip() for n in names.split(","))


def _argument_error_line(message: str, keys: Sequence[str]) -> str:
    """jsonargparse's (multi-line) message about a bad argument as one line: the key, the value, what
    was expected; for an unknown key the closest of ``keys`` (the valid ones, dotted)."""
    text = " ".join(line.strip() for line in message.strip().splitlines())
    unknown = re.match(r"unrecognized arguments: (.*)", text)
    in_config = re.search(r"does not accept option '([^']+)'", text)  # a config file's key
    if unknown or in_config:
        tokens = unknown.group(1).split() if unknown else [f"--{in_config.group(1)}"]
        parts = []
        for token in tokens:
            if not token.startswith("--"):
                continue
            key = token[2:].split("=", 1)[0]
            if key.startswith("trainer.") and key[len("trainer."):] in _UNUSED_TRAINER_OPTIONS:
                parts.append(f"--{key} is a Lightning Trainer option this tool does not use (it trains nothing and "
                             f"runs each loop once over every image)")
                continue
            near = _closest(key, keys)
            parts.append(f"unknown option --{key}" + (f" (did you mean --{near}?)" if near else ""))
        return "; ".join(parts) or text
    choice = re.match(r"argument subcommand: invalid choice: '([^']*)' \(choose from (.*)\)", text)
    if choice:
        given, commands = choice.group(1), choice.group(2).replace("'", "")
        line = f"{given!r} is not a command of this tool; the commands are {commands}"
        if given == "validate":
            line += (": thresholds come from test (thresholds.csv) or from predict on held-back images "
                     "(README, Thresholds for deployment)")
        return line
    keyed = re.match(r'Parser key "([^"]+)":\s*(.*)', text)
    if not keyed:
        return text
    key, detail = keyed.groups()
    value = re.search(r"(?:Got value|Given value): (.*)$", detail)
    given = value.group(1).strip() if value else None
    literal = re.search(r"Expected a typing\.Literal\[(.*?)\]\. Got value", detail)
    if literal and given is not None:
        choices = [c.strip().strip("'\"") for c in literal.group(1).split(",")]
        near = _closest(given, choices)
        return (f"--{key}: unknown value {given!r}; choose one of {', '.join(choices)}"
                + (f" (did you mean {near}?)" if near else ""))
    if given is not None and ("Expected a <class 'list'>" in detail) and not given.lstrip().startswith("["):
        return f"--{key}: {given!r} is not a list; write a list in brackets: --{key} '[{given}]'"
    if given is not None:
        expected = re.search(r"Subtypes: (\[.*?\]) Errors", detail) or re.search(r"Expected a (.*?)\. Got value", detail)
        what = f"; expected {_type_names(expected.group(1))}" if expected else ""
        return f"--{key}: invalid value {given!r}{what}"
    return f"--{key}: {detail}"


def _ignore_half_built_loaders() -> None:
    """After an interrupt: a signal that lands while a DataLoader starts its workers leaves an iterator
    without ``_workers``, whose ``__del__`` then prints an AttributeError traceback at exit, after the
    line that says how to go on. That one report is dropped; every other goes to the hook before."""
    previous = sys.unraisablehook

    def hook(unraisable: Any) -> None:
        where = getattr(unraisable.object, "__qualname__", "")
        if unraisable.exc_type is AttributeError and where == "_MultiProcessingDataLoaderIter.__del__":
            return
        previous(unraisable)

    sys.unraisablehook = hook


def _interruptible(subcommand: Callable) -> Callable:
    """A subcommand that, interrupted (a KeyboardInterrupt, also as ``_run_loop`` raises it), raises
    ``_RunInterrupted`` with the line that says what the run leaves and how to go on."""

    @functools.wraps(subcommand)
    def run(self: PatchCoreCLI, *args: Any, **kwargs: Any) -> Any:
        try:
            return subcommand(self, *args, **kwargs)
        except KeyboardInterrupt:
            signum = _SIGNALS.received or signal.SIGINT
            raise _RunInterrupted(signum, self._interrupted_line(signum)) from None

    return run


class PatchCoreCLI(LightningCLI):
    """LightningCLI over PatchCoreModule and AnomalyDataModule, with ``results_dir`` and ``resume``."""

    def __init__(self, args: list[str] | None = None, run: bool = True) -> None:
        self._logger: TensorBoardLogger | None = None
        self._at = ""  # the category being worked on, for the line of an interrupted run
        super().__init__(
            PatchCoreModule,
            AnomalyDataModule,
            seed_everything_default=0,
            trainer_class=PatchCoreTrainer,
            trainer_defaults=TRAINER_DEFAULTS,
            parser_class=_OneLineErrorParser,
            auto_configure_optimizers=False,  # nothing is trained: no --optimizer, --lr_scheduler
            save_config_callback=None,
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

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        """fit, test, predict and export (no validate: there is nothing to validate during a one-pass
        fit), and the arguments of each that the CLI fills in itself."""
        return {"fit": {"model", "datamodule"}, "test": {"model", "datamodule"},
                "predict": {"model", "datamodule", "return_predictions"}, "export": {"model", "datamodule"}}

    def add_core_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        """Lightning's core arguments, without the Trainer options this tool does not use."""
        parser.add_class_arguments(self.trainer_class, "trainer", fail_untyped=False, instantiate=False,
                                   sub_configs=True, skip=set(_UNUSED_TRAINER_OPTIONS))
        parser.set_defaults({f"trainer.{k}": v for k, v in self.trainer_defaults.items()
                             if k != "callbacks" and k not in _UNUSED_TRAINER_OPTIONS})
        parser.add_lightning_class_args(PatchCoreModule, "model")
        parser.add_lightning_class_args(AnomalyDataModule, "data")

    def _config(self, config) -> Any:
        return config[self.subcommand] if self.subcommand else config

    @property
    def results_dir(self) -> Path:
        return Path(self._config(self.config).results_dir)

    def instantiate_classes(self) -> None:
        """The module, data and Trainer; then the run's global state, which is the CLI's alone."""
        super().instantiate_classes()
        _set_run_state(self.model, self._config(self.config).seed_everything)

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
                ModelFolderWriter(results_dir), _LastEvaluation()]
        if config.get("enable_progress_bar", True) is not False and not any(isinstance(c, ProgressBar) for c in given):
            ours.append(CategoryProgressBar())
        ours.append(_StopOnSignal())
        kwargs = {**_FIXED_TRAINER_SETTINGS, **kwargs}  # the settings of the options --help does not offer
        kwargs.setdefault("callbacks", [*given, *ours])
        strategy = frozen_model_strategy(kwargs.get("strategy", config.get("strategy")))
        if strategy is not None:
            kwargs["strategy"] = strategy
        return super().instantiate_trainer(**kwargs)

    # ------------------------------------------------------------------ the subcommands
    @_interruptible
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
        if categories is None:  # given categories come from ``test``, which checked them with the rest
            self._check_before_work(datamodule, fit=todo)
        folders = []
        for i, category in enumerate(todo):
            datamodule.select(category)
            self._at = f"{datamodule.dataset_name} ({i + 1}/{len(todo)})"
            log.info("Building memory bank for [%s] (%d/%d)...", datamodule.dataset_name, i + 1, len(todo))
            trainer = self.instantiate_trainer()  # a fresh fit loop per category
            _run_loop(trainer, trainer.fit, model, datamodule=datamodule)
            folders.append(ModelFolderWriter(self.results_dir).folder(datamodule.dataset_name))
        return folders

    @_interruptible
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
        paths = model.hparams.model_paths
        if paths:
            folders = [_model_path(paths, i, len(categories)) for i in range(len(categories))]  # fails before any work
            self._check_before_work(datamodule, test=categories, folders=dict(zip(categories, folders)))
        else:
            folders = self._fitted_model_paths(model, datamodule)
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
            self._at = f"{name} ({i + 1}/{len(folders)})"
            if self.trainer.is_global_zero:
                log.info("Evaluating dataset [%s] (%d/%d)...", name, i + 1, len(folders))
            _run_loop(self.trainer, self.trainer.test, model, datamodule=datamodule, verbose=False)
            rows[name] = self.evaluation.row()
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

    @_interruptible
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
        _run_loop(self.trainer, self.trainer.predict, model, datamodule=datamodule, return_predictions=False)

    def export(
        self, model: PatchCoreModule, datamodule: AnomalyDataModule, export: ExportOptions = ExportOptions()  # noqa: B008
    ) -> list[Path]:
        """Write every folder of model.model_paths as ONNX (and OpenVINO IR) under results_dir/export/."""
        needed = ["onnx"] + (["openvino"] if export.format == "openvino" else [])
        missing = [name for name in needed if importlib.util.find_spec(name) is None]
        if missing:
            extra = "openvino" if "openvino" in missing else "onnx"
            raise ValueError(f"export needs {' and '.join(missing)}, which is not installed: pip install -e \".[{extra}]\"")
        _check_writable(self.results_dir)
        paths, categories = model.hparams.model_paths, datamodule.categories
        if paths and len(paths) in (1, len(categories)):  # the folders test would read: the same checks, the same line
            folders = {c: _model_path(paths, i, len(categories)) for i, c in enumerate(categories)}
            self._check_before_work(datamodule, folders=folders)
        written = export_folders(model, datamodule, self.results_dir, export)
        for path in written:
            print(f"exported {path} and {path.with_name('metadata.json')}")
        return written

    # ------------------------------------------------------------------ helpers
    @property
    def evaluation(self) -> Evaluation:
        """The ``Evaluation`` of the category the Trainer tested last."""
        received = next(c for c in self.trainer.callbacks if isinstance(c, _LastEvaluation))
        if received.evaluation is None:
            raise RuntimeError("the test loop ended without an evaluation")
        return received.evaluation

    def _fitted_model_paths(self, model: PatchCoreModule, datamodule: AnomalyDataModule) -> list[str]:
        """``<results_dir>/models/<dataset>`` of every category; built first where missing."""
        writer = ModelFolderWriter(self.results_dir)
        folders = {c: writer.folder(datamodule.dataset_name_of(c)) for c in datamodule.categories}
        missing = [c for c, folder in folders.items() if not (folder / SIDECAR_FILE).is_file()]
        present = [str(folders[c]) for c in datamodule.categories if c not in missing]
        self._check_before_work(datamodule, fit=missing, test=datamodule.categories,
                                folders={c: str(folders[c]) for c in datamodule.categories if c not in missing})
        if present:
            log.info("model.model_paths is empty: evaluating the models fit wrote in %s", ", ".join(present))
        if missing:
            log.info("model.model_paths is empty: building the memory banks of %s from the train split", missing)
            self.fit(model, datamodule, categories=missing)
        return [str(folders[c]) for c in datamodule.categories]

    def _check_before_work(
        self,
        datamodule: AnomalyDataModule,
        fit: Sequence[str] = (),
        test: Sequence[str] = (),
        folders: dict[str, str] | None = None,
    ) -> None:
        """Before the first fit or test of a run: the ``fit`` categories' train splits and the
        ``test`` categories' test splits listed and their files' headers read (``check_split``), and
        every model folder of ``folders`` (category → folder) read without its banks
        (``check_model_folder``). Every problem found is reported in one line (``RunCheckError``)."""
        h = datamodule.hparams
        folder_problems: dict[str, str | None] = {}  # one folder may serve every category: read it once
        problems = []
        for category in datamodule.categories:
            found = []
            if not h.synthetic:  # the demo's data are generated by prepare_data, inside the first loop
                found += [p for split, todo in (("train", fit), ("test", test)) if category in todo
                          for p in check_split(h.benchmark, h.root, category, split)]
            folder = (folders or {}).get(category)
            if folder is not None:
                if folder not in folder_problems:
                    folder_problems[folder] = _model_folder_problem(folder, datamodule.imagesize)
                if folder_problems[folder] is not None:
                    found.append(folder_problems[folder])
            # dict.fromkeys: a missing category folder is one problem, not one per split
            problems += [f"[{datamodule.dataset_name_of(category)}] {p}" for p in dict.fromkeys(found)]
        if problems:
            raise RunCheckError(f"{len(problems)} problem(s) found before any work, nothing was run: " + "; ".join(problems))

    def _interrupted_line(self, signum: int) -> str:
        """What the interrupted subcommand leaves in results_dir, and how to go on from there."""
        command = self.subcommand
        where = f" in {self._at}" if self._at else ""
        head = f"interrupted by {signal.Signals(signum).name}{where}"
        results = self.results_dir / "results.csv"
        datamodule = self.datamodule
        if command == "predict":
            return (f"{head}: predictions.csv and skipped.csv are written once every image is scored, so there are none; "
                    f"rerun the command")
        models = ModelFolderWriter(self.results_dir)
        built = [c for c in datamodule.categories if (models.folder(datamodule.dataset_name_of(c)) / SIDECAR_FILE).is_file()]
        if command == "fit":
            rest = [c for c in datamodule.categories if c not in built]
            return (f"{head}: {self.results_dir / 'models'} holds the finished models of "
                    f"{_names(datamodule.dataset_name_of(c) for c in built)}; build the rest with "
                    f"--data.categories '{json.dumps(rest)}'")
        try:
            held = [name for name in read_results(results) if name != "mean"]
        except (OSError, ValueError, KeyError):
            held = []
        return (f"{head}: {results} holds {_names(held)} ({len(held)} of {len(datamodule.categories)} categories); "
                f"rerun the same command with --resume true to compute the rest")

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


def _names(names) -> str:
    names = list(names)
    return ", ".join(names) if names else "none"


class _Signals:
    """SIGINT and SIGTERM during a run: the first one received is kept (the exit code says which),
    and each raises KeyboardInterrupt where the main thread is. A KeyboardInterrupt can be lost (one
    raised inside a finaliser or a fork hook, as when DataLoader workers start, is only printed as
    "Exception ignored in ..."); the kept signal is not: ``_run_loop`` and ``_StopOnSignal`` check it."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        self.received = None
        for signum in (signal.SIGINT, signal.SIGTERM):
            self._previous[signum] = signal.signal(signum, self._handle)

    def restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def _handle(self, signum: int, frame) -> None:
        if self.received is None:
            self.received = signum
        raise KeyboardInterrupt(signal.Signals(signum).name)


_SIGNALS = _Signals()


class _RunInterrupted(Exception):
    """A run ended by SIGINT or SIGTERM (``signum``); ``line`` says what it leaves and how to go on."""

    def __init__(self, signum: int, line: str) -> None:
        super().__init__(line)
        self.signum, self.line = signum, line


class _StopOnSignal(Callback):
    """Ends the loop at the next batch once a signal was received, should its KeyboardInterrupt have been lost."""

    def _check(self, *args: Any) -> None:
        if _SIGNALS.received is not None:
            raise KeyboardInterrupt(signal.Signals(_SIGNALS.received).name)

    on_train_batch_start = on_test_batch_start = on_predict_batch_start = _check


def _run_loop(trainer: L.Trainer, loop, *args: Any, **kwargs: Any) -> Any:
    """``loop(*args, **kwargs)`` (``trainer.fit`` / ``test`` / ``predict``), raising KeyboardInterrupt
    when it was interrupted. Lightning catches a KeyboardInterrupt, shuts the loop down and exits 1
    (``SystemExit``); a loop may also return with ``trainer.interrupted`` set, or finish although a
    signal arrived (its KeyboardInterrupt lost): each ends the run here."""
    try:
        out = loop(*args, **kwargs)
    except SystemExit:
        if not trainer.interrupted:
            raise
        raise KeyboardInterrupt from None
    if trainer.interrupted or _SIGNALS.received is not None:
        raise KeyboardInterrupt
    return out


class _LastEvaluation(EvaluationReceiver):
    """Keeps the last category's ``Evaluation`` for the CLI's results.csv rows."""

    def __init__(self) -> None:
        self.evaluation: Evaluation | None = None

    def on_test_epoch_start(self, trainer, pl_module) -> None:
        self.evaluation = None

    def on_evaluation(self, trainer, pl_module, evaluation: Evaluation) -> None:
        self.evaluation = evaluation


def _set_run_state(model: PatchCoreModule, seed: int | bool | None) -> None:
    """The process-wide settings of a run, set here and nowhere in the package: TF32 (off unless
    ``model.allow_tf32``: PyTorch lets cuDNN convolutions use it by default, and PatchCore's
    numbers are fp32 numbers), the seed of the coreset (``seed_everything``'s; 0 when seeding is
    off), and filters for Lightning warnings a user cannot act on."""
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = model.hparams.allow_tf32
    model.seed = seed if isinstance(seed, int) and not isinstance(seed, bool) else 0
    # Lightning's loops against this torch's pytree module
    warnings.filterwarnings("ignore", r"`isinstance\(treespec, LeafSpec\)` is deprecated")
    # Lightning's fit loop expects something to train; here nothing is, by design
    warnings.filterwarnings("ignore", r".*configure_optimizers` returned `None`, this fit will run with no optimizer")
    warnings.filterwarnings("ignore", r"Found \d+ module\(s\) in eval mode at the start of training")
    # predict's ShardBatches returns every index (no drop_last to set), which Lightning cannot tell
    warnings.filterwarnings("ignore", r"You are using a custom batch sampler `ShardBatches` for prediction")


def _model_path(paths: list[str], index: int, n_categories: int) -> str:
    """The model folder of the ``index``-th of ``n_categories`` categories (the original's rule)."""
    if len(paths) == 1:
        return paths[0]
    if len(paths) != n_categories:
        raise ValueError(
            f"model.model_paths has {len(paths)} entries for {n_categories} categories: "
            f"give one folder per category, or exactly one for all, or --model.model_paths null to build "
            f"each category's model from its train split first (written to <results_dir>/models/)"
        )
    return paths[index]


def _model_folder_problem(folder: str, imagesize: int) -> str | None:
    """What keeps ``folder`` from being evaluated at ``imagesize``, or None."""
    try:
        members = check_model_folder(folder, imagesize)
    except ModelFormatError as err:
        return str(err)
    unsupported = sorted({p.backbone for p in members} - set(BACKBONES))
    if unsupported:
        return f"{folder}: unsupported backbone {unsupported[0]!r}; supported: {', '.join(sorted(BACKBONES))}"
    return None


class RunCheckError(ValueError):
    """Problems found in a run's data or model folders before any work."""


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
    watch = threading.current_thread() is threading.main_thread()
    if watch:  # SIGINT and SIGTERM end the run alike: files stay whole, the exit code says which (130, 143)
        _SIGNALS.install()
    try:
        PatchCoreCLI(args=args)
    except _USER_ERRORS as err:
        if os.environ.get("PATCHCORE_DEBUG"):
            raise
        print(f"error: {_one_line(err)}  (PATCHCORE_DEBUG=1 shows the traceback)", file=sys.stderr)
        sys.exit(2)
    except _RunInterrupted as stop:
        _ignore_half_built_loaders()
        print(stop.line, file=sys.stderr)
        sys.exit(128 + stop.signum)
    except KeyboardInterrupt:  # while the configuration is read and the objects built: before any work
        _ignore_half_built_loaders()
        signum = _SIGNALS.received or signal.SIGINT
        print(f"interrupted by {signal.Signals(signum).name} before any work: nothing was run", file=sys.stderr)
        sys.exit(128 + signum)
    finally:
        if watch:
            _SIGNALS.restore()
