"""Retraining pipelines: validate the new data, retrain, pass the benchmark suite, register, start a canary.

The brief's three kinds, all starting from the version ``NAME@production`` and its lineage (the
run config it was trained with, recorded by the registry):

* ``incremental`` (weekly): fine-tune the production weights on the captured data mixed with a
  replay sample of the original training data (``replay_share``, default 0.5), lr 1e-5, the
  decoder only (and the codebook for a VQ-VAE), the rest frozen and bit-identical;
* ``full`` (monthly): from scratch, with the production run's settings, on the original training
  data plus every captured image;
* ``emergency`` (on a drift alert): fine-tune every parameter on the most recent ``recent``
  captured images (default 100,000) mixed with the replay sample, at a tenth of the run's lr.

The captured images are ``data``: a shard file or folder (a service's capture folder is read in
name order, which is capture order, so "the most recent" holds), or, with ``store``, the capture
folder's shards listed by the record store's capture index, optionally only the images that
arrived in [``since``, ``until``) (:func:`vaekit.serving.capture.load_captures`).

Steps, each recorded in ``OUT/pipeline.json`` so that running the same command again continues
where a crash stopped it and repeats nothing that finished (a scheduler the user already has,
cron or a Kubernetes CronJob, can call it):

1. **validate**: refuse or quarantine bad images (NaN cannot occur in uint8 shards; constant or
   pixel variance < 0.01, exact duplicates, labels outside the model's classes), report the class
   balance; a held-out share of the clean images becomes the ``new`` test distribution;
2. **train**: ``vaekit.train`` on the run config above (resumable exactly like any run);
3. **gate**: :mod:`vaekit.deploy.suite` on the ``original`` test split and the ``new`` held-out
   images, candidate against production; a candidate that forgets or is worse is not registered;
4. **register**: the candidate becomes a new version with its lineage (parent version, the clean
   data's sha256) and a reference profile on the held-out new images;
5. **canary**: ``NAME@canary`` points at it (unless ``canary=False``).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from vaekit.atomic import atomic_write_bytes
from vaekit.data import ImageDataset, load_dataset
from vaekit.data.dataset import ImageSplit
from vaekit.data.shards import load_split, write_shard
from vaekit.deploy.apply import start_canary
from vaekit.deploy.suite import SuitePolicy, gate, run_suite
from vaekit.errors import ConfigError, InputError, VaekitError, describe

Kind = Literal["incremental", "full", "emergency"]
KINDS = ("incremental", "full", "emergency")
STEPS = ("validate", "train", "gate", "register", "canary")


class PipelineError(VaekitError, RuntimeError):
    """A pipeline step refused to go on (bad data, a failed gate); the message and pipeline.json say why."""


@dataclass(frozen=True)
class PipelineConfig:
    """One pipeline run; ``out`` is its folder (run the same config again to continue it)."""

    kind: str  # incremental | full | emergency
    name: str  # the registered model, retrained from NAME@production
    data: str  # the captured images: a shard file or folder, or a split spec (vaekit.data.shards.load_split)
    out: str = "pipelines"  # OUT/<name>-<kind> holds everything the pipeline writes
    registry: str | None = None  # registry URI (None: $VAEKIT_REGISTRY or the default)
    artifact_root: str | None = None  # the registry's artifact folder, when it is not beside the database
    replay: str | None = None  # replay sample (default: the production run's dataset, its train split)
    replay_share: float = 0.5  # share of each batch drawn from the replay sample (incremental, emergency)
    lr: float | None = None  # default: 1e-5 (incremental), the run's lr / 10 (emergency), the run's (full)
    epochs: int = 5  # passes over the captured data (the brief's incident: 5 epochs)
    recent: int = 100_000  # emergency: the most recent images kept
    holdout: float = 0.1  # share of the clean captured images held out as the "new" test distribution
    min_images: int = 100  # fewer clean images than this: refuse
    max_rejected: float = 0.5  # a larger share of bad images: refuse (the capture is broken)
    suite: SuitePolicy = field(default_factory=lambda: SuitePolicy(parts=("elbo", "recon")))
    canary: bool = True  # point NAME@canary at the registered candidate
    seed: int = 0
    overrides: tuple[str, ...] = ()  # extra run-config overrides (key=value), e.g. train.threads=1
    store: str | None = None  # record-store URI: read ``data`` (a capture folder) through its capture index
    since: float | None = None  # with ``store``: only images that arrived at or after this Unix time
    until: float | None = None  # ... and before this one

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError(f"kind must be one of {list(KINDS)}, got {describe(self.kind)}")
        for key, lo, hi in (("replay_share", 0.0, 1.0), ("holdout", 0.0, 1.0), ("max_rejected", 0.0, 1.0)):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, int | float) or not lo <= v < hi:
                raise ConfigError(f"{key} must be a number in [{lo}, {hi}), got {describe(v)}")
        for key in ("epochs", "recent", "min_images"):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"{key} must be a positive integer, got {describe(v)}")
        if (self.since is not None or self.until is not None) and self.store is None:
            raise ConfigError(f"since / until (got {self.since!r}, {self.until!r}) select from the capture index: "
                              "give store (the record-store URI the service's capture writes its index to)")
        for key in ("since", "until"):
            v = getattr(self, key)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v)):
                raise ConfigError(f"{key} must be Unix seconds (a finite number) or None, got {describe(v)}")
        if self.since is not None and self.until is not None and self.until <= self.since:
            raise ConfigError(f"until must be later than since, got since={self.since} until={self.until}")
        if self.lr is not None and (isinstance(self.lr, bool) or not isinstance(self.lr, int | float)
                                    or not 0 < self.lr < 1):
            raise ConfigError(f"lr must be a number in (0, 1), got {describe(self.lr)}")

    @property
    def folder(self) -> Path:
        return Path(self.out) / f"{self.name}-{self.kind}"


# -- 1. data validation -----------------------------------------------------------------------------
def validate_images(split: ImageSplit, *, num_classes: int | None = None, min_var: float = 0.01
                    ) -> tuple[torch.Tensor, dict[str, Any]]:
    """(indices of the images to keep, report) for uint8 images (N, C, H, W) and their labels.

    Quarantined: a constant image or one whose pixel variance (intensities in [0, 1]) is below
    ``min_var`` (the brief's corrupted, all-black images), every repeat of an exact duplicate, and
    (with ``num_classes``) a label outside [0, num_classes). The report counts each reason and the
    class balance of what is kept."""
    x = split.images
    n = x.shape[0]
    reasons: dict[str, list[int]] = {"low_variance": [], "duplicate": [], "label_range": []}
    var = (x.flatten(1).double() / 255.0).var(1, unbiased=False)
    seen: set[str] = set()
    keep = []
    for i in range(n):
        if var[i] < min_var:
            reasons["low_variance"].append(i)
            continue
        if num_classes is not None and not 0 <= int(split.labels[i]) < num_classes:
            reasons["label_range"].append(i)
            continue
        digest = hashlib.sha1(x[i].numpy().tobytes()).hexdigest()
        if digest in seen:
            reasons["duplicate"].append(i)
            continue
        seen.add(digest)
        keep.append(i)
    kept = torch.tensor(keep, dtype=torch.long)
    labels = split.labels[kept]
    counts = {str(c): int((labels == c).sum()) for c in labels.unique().tolist()} if len(kept) else {}
    report = {"images": n, "kept": len(keep), "quarantined": {k: len(v) for k, v in reasons.items()},
              "rejected_share": (n - len(keep)) / n if n else 0.0, "min_pixel_variance": min_var,
              "class_counts": counts,
              "class_balance": (min(counts.values()) / max(counts.values())) if counts else None,
              "examples": {k: v[:10] for k, v in reasons.items()}}
    return kept, report


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


# -- the pipeline -------------------------------------------------------------------------------------
class Pipeline:
    """Runs the steps of a :class:`PipelineConfig` (see the module docstring); ``run()`` returns the state."""

    def __init__(self, config: PipelineConfig, registry: Any = None, *, log=print):
        from vaekit.registry import ModelRegistry

        self.config = config
        self.registry = registry or ModelRegistry(config.registry or os.environ.get("VAEKIT_REGISTRY")
                                                  or "sqlite:///registry/registry.db",
                                                  artifact_root=config.artifact_root)
        self.folder = config.folder
        self.state_file = self.folder / "pipeline.json"
        self.log = log
        self.state: dict[str, Any] = self._load_state()

    def _load_state(self) -> dict[str, Any]:
        if self.state_file.is_file():
            state = json.loads(self.state_file.read_text())
            stored, current = state.get("config") or {}, self._config_doc()
            # a setting added since that pipeline started, left at None, is the same pipeline
            if {k: v for k, v in current.items() if k in stored or v is not None} != stored:
                raise PipelineError(f"{self.folder} holds a pipeline with other settings; use another --out or "
                                    "remove the folder to start afresh")
            return state
        return {"config": self._config_doc(), "steps": {}}

    def _config_doc(self) -> dict[str, Any]:
        return json.loads(json.dumps(asdict(self.config), default=str))

    def _save(self) -> None:
        atomic_write_bytes(self.state_file, (json.dumps(self.state, indent=2, default=str) + "\n").encode())

    def run(self) -> dict[str, Any]:
        self.folder.mkdir(parents=True, exist_ok=True)
        steps = {"validate": self.validate, "train": self.train, "gate": self.gate, "register": self.register,
                 "canary": self.start_canary}
        for name in STEPS:
            done = self.state["steps"].get(name)
            if done is not None:
                self.log(f"[{name}] done earlier: {done.get('summary', '')}")
                continue
            if name == "canary" and not self.config.canary:
                continue
            result = steps[name]()
            self.state["steps"][name] = result
            self._save()
            self.log(f"[{name}] {result.get('summary', '')}")
        return self.state

    # -- the production version and its run config --------------------------------------------------
    def _production(self) -> Any:
        ref = self.state.get("production") or f"{self.config.name}@production"
        prod = self.registry.get(ref)
        self.state["production"] = prod.ref  # later steps (and reruns) use this exact version
        if prod.run_config is None:
            raise PipelineError(f"{prod.ref} has no recorded run config (registered from a bare model folder); "
                                "a pipeline retrains with the run's settings: register from the run folder")
        return prod

    def validate(self) -> dict[str, Any]:
        c = self.config
        prod = self._production()
        split = self._captured()
        if c.kind == "emergency" and len(split) > c.recent:  # shards are in capture order: the newest last
            split = ImageSplit(split.images[-c.recent:], split.labels[-c.recent:])
        model_cfg = prod.run_config.get("model", {})
        num_classes = model_cfg.get("num_classes") if prod.family == "cvae" else None
        keep, report = validate_images(split, num_classes=num_classes)
        atomic_write_bytes(self.folder / "validation.json", (json.dumps(report, indent=2) + "\n").encode())
        if report["rejected_share"] > c.max_rejected or report["kept"] < c.min_images:
            raise PipelineError(f"data validation refused {c.data}: {report['kept']} of {report['images']} images "
                                f"are usable (quarantined {report['quarantined']}); need >= {c.min_images} and at "
                                f"most {c.max_rejected:.0%} bad (report: {self.folder / 'validation.json'})")
        g = torch.Generator().manual_seed(c.seed)
        order = keep[torch.randperm(len(keep), generator=g)]
        n_new = max(1, int(round(c.holdout * len(order)))) if c.holdout > 0 else 0
        held, train = order[:n_new].sort().values, order[n_new:].sort().values
        write_shard(self.folder / "data" / "train.npz", split.images[train], split.labels[train])
        write_shard(self.folder / "data" / "new_test.npz", split.images[held], split.labels[held])
        bad = torch.tensor(sorted(set(range(len(split))) - set(keep.tolist())), dtype=torch.long)
        if len(bad):
            write_shard(self.folder / "data" / "quarantine.npz", split.images[bad], split.labels[bad])
        snapshot = _sha256(self.folder / "data" / "train.npz")
        return {"summary": f"kept {report['kept']} of {report['images']} images (quarantined "
                           f"{report['quarantined']}); {len(train)} to train on, {len(held)} held out",
                "report": report, "train_images": len(train), "held_out": len(held), "data_snapshot": snapshot}

    def _captured(self) -> ImageSplit:
        """The captured images: ``data`` as a split spec, or (with ``store``) the capture folder's shards
        listed by the store's index in the window [since, until), in capture order."""
        c = self.config
        if c.store is None:
            return load_split(c.data)
        from vaekit.monitoring.store import RecordStore
        from vaekit.serving.capture import load_captures

        store = RecordStore(c.store)
        try:
            return load_captures(store, c.data, model=c.name, start=c.since, end=c.until)
        except InputError as exc:
            raise PipelineError(f"nothing to retrain on: {exc}") from exc
        finally:
            store.close()

    def _run_config(self, prod: Any) -> Any:
        from vaekit.training.config import load_run_config, run_config_from_dict

        c = self.config
        base = run_config_from_dict(prod.run_config)
        data = self.folder / "data" / "train.npz"
        replay = c.replay or base.data.dataset
        # the captured data replaces the run's training split (and its subset): only its settings carry over
        sets = [f"name={c.kind}", f"out_dir={self.folder}", "data.validation=0", "data.train_subset=null",
                "select.metric=none", f"train.seed={c.seed}"]
        if c.kind == "full":
            # from scratch on everything: the original training split and the captured images
            sets += [f"data.train_data={data}", f"data.replay={replay}", "data.replay_share=0.5",
                     f"train.lr={c.lr or base.train.lr}"]
        else:
            lr = c.lr or (1e-5 if c.kind == "incremental" else base.train.lr / 10)
            sets += [f"data.train_data={data}", f"data.replay={replay}", f"data.replay_share={c.replay_share}",
                     f"train.init_from={prod.ref}", f"train.lr={lr}"]
            if self.registry.uri:
                sets.append(f"train.registry={self.registry.uri}")
            if c.kind == "incremental":
                groups = "[decoder,codebook]" if prod.family == "vqvae" else "[decoder]"
                sets.append(f"train.trainable={groups}")
        n = self.state["steps"]["validate"]["train_images"]
        per_epoch = math.ceil(n / (1 - (c.replay_share if c.kind != "full" else 0.5)))
        steps = max(1, c.epochs * math.ceil(per_epoch / base.train.batch_size))
        sets += [f"train.max_steps={steps}", "train.epochs=1000"]
        base_doc = base.to_dict()
        base_doc.pop("name", None)
        base_doc.pop("out_dir", None)
        import tempfile

        import yaml

        with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
            yaml.safe_dump(base_doc, f)
        try:
            return load_run_config(f.name, [*sets, *c.overrides])
        finally:
            os.unlink(f.name)

    def train(self) -> dict[str, Any]:
        from vaekit.errors import TrainingDivergedError
        from vaekit.training.run import train

        prod = self._production()
        cfg = self._run_config(prod)
        try:
            result = train(cfg)
        except TrainingDivergedError as exc:
            raise PipelineError(f"the {self.config.kind} retrain diverged, nothing is registered: {exc}") from exc
        return {"summary": f"trained {result.steps} steps into {cfg.run_dir}", "run_dir": str(cfg.run_dir),
                "steps": result.steps, "final_eval": result.final_eval}

    def _distributions(self, prod: Any) -> dict[str, ImageDataset]:
        base = prod.run_config.get("data", {})
        original = load_dataset(base.get("dataset", "mnist"))
        new = load_split(str(self.folder / "data" / "new_test.npz"))
        return {"original": original,
                "new": ImageDataset(original.name, original.train, new, original.classes, "captured, held out")}

    def gate(self) -> dict[str, Any]:
        from vaekit.models import load_model

        prod = self._production()
        run_dir = Path(self.state["steps"]["train"]["run_dir"])
        dists = self._distributions(prod)
        binarize = prod.run_config.get("data", {}).get("binarize", "none")
        policy = self.config.suite
        candidate = run_suite(load_model(run_dir / "model"), dists, self.folder / "suite" / "candidate", policy,
                              binarize=binarize)
        production = run_suite(self.registry.load(prod.ref), dists, self.folder / "suite" / "production", policy,
                               binarize=binarize)
        res = gate(candidate, production, policy)
        doc = {"passed": res.passed, "reasons": res.reasons, "comparisons": res.comparisons}
        atomic_write_bytes(self.folder / "gate.json", (json.dumps(doc, indent=2, default=str) + "\n").encode())
        if not res.passed:
            self.state["steps"]["gate"] = {"summary": "failed: " + "; ".join(res.reasons), **doc}
            self._save()
            raise PipelineError(f"the candidate failed the benchmark suite and is not registered: "
                                f"{'; '.join(res.reasons)} ({self.folder / 'gate.json'})")
        return {"summary": f"passed {len(res.comparisons)} comparisons", **doc}

    def register(self) -> dict[str, Any]:
        prod = self._production()
        run_dir = self.state["steps"]["train"]["run_dir"]
        new = load_split(str(self.folder / "data" / "new_test.npz"))
        snapshot = self.state["steps"]["validate"]["data_snapshot"]
        ver = self.registry.register(
            run_dir, self.config.name, parent=prod.ref, profile_images=new.images.float() / 255,
            profile_labels=new.labels if prod.family == "cvae" else None,
            tags={"pipeline": self.config.kind, "data_snapshot": snapshot[:32]},
            description=f"{self.config.kind} retrain of {prod.ref} on {self.config.data}")
        return {"summary": f"registered {ver.ref} (parent {prod.ref})", "version": ver.version, "ref": ver.ref}

    def start_canary(self) -> dict[str, Any]:
        ver = self.state["steps"]["register"]["version"]
        start_canary(self.registry, self.config.name, ver,
                     f"{self.config.kind} retrain passed the benchmark suite ({self.folder / 'gate.json'})")
        return {"summary": f"{self.config.name}@canary -> {ver}"}


def run_pipeline(config: PipelineConfig, registry: Any = None, *, log=print) -> dict[str, Any]:
    """Run (or continue) the pipeline; returns its state (also in ``config.folder/pipeline.json``)."""
    return Pipeline(config, registry, log=log).run()


__all__ = ["KINDS", "Pipeline", "PipelineConfig", "PipelineError", "run_pipeline", "validate_images"]
