"""The run folder of ``unet train``: a new or a resumed run, checked before anything is written.

:func:`open_run` does every check a run can do before it trains: the folder's rules (``--out`` names
a folder holding no run, ``--resume`` one holding a checkpoint), no output over an input
(``guards.check_outputs``), worker processes within the cores, the device and precision, the data
and the validation metric. Only then, in ``with run:``, is the folder created and locked
(``guards.RunLock``: one writer per run folder), the weight maps computed (cached in
``RUN_DIR/weights``) and ``config.json`` written. A new run that fails before its first checkpoint
removes the records it wrote, so that the same ``--out`` can be used again.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from unetcli import checkpoint, devices, guards, runconfig, runlog, training, validation
from unetcli import provenance as prov
from unetcli.errors import ConfigError, RunFolderError

CONFIG_FILE = "config.json"
HOLDS_A_RUN = (CONFIG_FILE, checkpoint.STATE_FILE, "last.unet")
RECORDS = (CONFIG_FILE, runlog.METRICS_FILE, runlog.CURVES_FILE, "last.unet", "best.unet")
INPUTS = ("images", "labels", "weights", "val_images", "val_labels")


class Run:
    """A checked run: its folder, options and data; ``with run:`` holds the folder for writing."""

    def __init__(self, run_dir: Path, opts: dict, prepared: runconfig.Prepared, *, resume: bool,
                 command, dist: training.Dist, ignored: list[str]):
        self.run_dir, self.opts, self.prepared = Path(run_dir), opts, prepared
        self.resume, self.command, self.dist = resume, prov.command_line(command), dist
        self.ignored = ignored          # options --resume does not take from the command line
        self._lock: guards.RunLock | None = None
        self._created = self._wrote = False

    @property
    def provenance(self) -> dict:
        """What the model files record about the run besides the training itself."""
        return {"command": self.command, "data": self.prepared.data_note, "run_dir": str(self.run_dir)}

    def __enter__(self) -> "Run":
        if not self.dist.main:                 # other ranks of a distributed run compute their maps, write nothing
            runconfig.add_weights(self.prepared.train_samples, self._all_options(), None)
            return self
        self._created = not self.run_dir.exists()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        try:
            self._lock = guards.RunLock(self.run_dir, what="unet train").acquire()
            if not self.resume:
                _check_new(self.run_dir)    # again, now that the folder is ours
            runconfig.add_weights(self.prepared.train_samples, self._all_options(), self.run_dir / "weights")
            if not self.resume:
                self._wrote = True
                runlog.write_json(self.run_dir / CONFIG_FILE, self._config_record())
        except BaseException:
            self.__exit__(True, None, None)
            raise
        return self

    def __exit__(self, failed, *_exc) -> None:
        try:
            if failed and self._wrote and not (self.run_dir / checkpoint.STATE_FILE).exists():
                for name in RECORDS:    # a start that never reached its first checkpoint leaves nothing
                    (self.run_dir / name).unlink(missing_ok=True)
        finally:
            if self._lock is not None:
                self._lock.release()
                self._lock = None
            if failed and self._created:
                try:
                    self.run_dir.rmdir()        # only when empty: a weight cache stays for the rerun
                except OSError:
                    pass

    def _all_options(self) -> dict:
        return {**runconfig.RUN_DEFAULTS, **self.opts}

    def _config_record(self) -> dict:
        p = self.prepared
        record = {"options": self.opts, "train": p.train_config.to_dict(), "network": p.net_config.to_dict(),
                  "augment": runconfig.record_of(p.augment), "normalization": p.normalization,
                  "class_names": p.class_names, "seed": p.train_config.seed, "data": p.data_note,
                  "world_size": self.dist.world}
        record.update(prov.stamp(self.command))
        return record


def open_run(given: dict, *, out: Path | None = None, resume: Path | None = None, command=None) -> Run:
    """Check a run of the options ``given`` (keyed as ``runconfig.RUN_DEFAULTS``) into ``out``, or the
    continuation of the run in ``resume``; nothing is written (see :class:`Run` for that).

    ``command``: the command line as run (recorded in config.json and the model files). Under
    torchrun, this joins the process group (``training.init_distributed``).
    """

    if resume is not None:
        if out is not None:
            raise ConfigError("--resume and --out exclude each other",
                              hint="--resume RUN_DIR continues the run in RUN_DIR")
        run_dir, opts = Path(resume), saved_options(Path(resume))
        ignored = sorted(k for k in given if k not in runconfig.RESUME_OVERRIDES)
        opts.update({k: v for k, v in given.items() if k in runconfig.RESUME_OVERRIDES})
    else:
        if out is None:
            raise ConfigError("say where the run goes: --out RUN_DIR", hint="or continue one with --resume")
        run_dir, opts, ignored = Path(out), dict(given), []
        _check_new(run_dir)
    all_opts = {**runconfig.RUN_DEFAULTS, **opts}
    guards.check_outputs([all_opts[k] for k in INPUTS if all_opts[k] not in ("auto", "none")],
                         [run_dir, *(run_dir / name for name in (*RECORDS, checkpoint.STATE_FILE))])
    tc = runconfig.TrainConfig.from_dict(all_opts)
    if tc.workers is not None:
        guards.cap_workers(tc.workers)
    dist = training.init_distributed(tc.device)
    devices.resolve_precision(tc.precision, devices.resolve_device(tc.device, dist.local_rank))
    prepared = runconfig.read(opts)
    validation.plan(prepared.train_config.metric, prepared.val_samples, prepared.net_config.num_classes)
    return Run(run_dir, opts, prepared, resume=resume is not None, command=command, dist=dist, ignored=ignored)


def saved_options(run_dir: Path) -> dict:
    """The options a run folder was started with (its ``config.json``), for ``--resume``."""
    cfg_path = run_dir / CONFIG_FILE
    if not (run_dir / checkpoint.STATE_FILE).is_file() or not cfg_path.is_file():
        raise RunFolderError(f"{run_dir}: not a run folder with a checkpoint "
                             f"(needs {CONFIG_FILE} and {checkpoint.STATE_FILE})")
    try:
        saved = json.loads(cfg_path.read_text(encoding="utf-8"))
        opts = saved["options"] if isinstance(saved, dict) else None
    except (ValueError, KeyError, OSError) as exc:
        raise RunFolderError(f"{cfg_path}: damaged run configuration ({exc})") from exc
    if not isinstance(opts, dict):
        raise RunFolderError(f"{cfg_path}: damaged run configuration (no options record)")
    return dict(opts)


def _check_new(run_dir: Path) -> None:
    """``--out``: a folder that holds no run yet (the lock file aside), or one that can be created."""
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"{run_dir}: exists and is not a folder")
    if run_dir.is_dir() and any((run_dir / n).exists() for n in HOLDS_A_RUN):
        raise ConfigError(f"{run_dir}: already holds a training run",
                          hint="continue it with --resume, or give another --out")
    ancestor = run_dir.parent.absolute()      # missing folders are created like mkdir -p: can they be?
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise ConfigError(f"{run_dir}: {ancestor} is a file, not a folder")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise ConfigError(f"{run_dir}: cannot create it in {ancestor} (permission denied)")
