"""The head re-fit driver: reads each task's training and validation files, caches the merged trunk's features and
re-fits each token head on them (the pure steps are in jaxfound.fusion.refit).

    refit = HeadRefit({"conll2003/ner": ner_run, "conll2003/pos": pos_run}, RefitConfig(lr=1e-2, epochs=2))
    task_params, info = refit(task_params)     # execute_plan(..., refit=refit)
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict

import numpy as np

from jaxfound import runs
from jaxfound.errors import JaxfoundError
from jaxfound.fusion import merge, refit


class HeadRefit:
    """refit({task: params}) -> ({task: params with the re-fitted head}, {task: what was done}); features are cached
    per trunk (by identity) and data file, so tasks sharing one trunk and one file share one pass."""

    def __init__(self, task_runs: Mapping[str, runs.Run], cfg: refit.RefitConfig | None = None,
                 files: Mapping[str, Mapping[str, str]] | None = None, metrics: Mapping[str, str] | None = None):
        self.cfg, self.runs, self.metrics = cfg or refit.RefitConfig(), dict(task_runs), dict(metrics or {})
        self.splits, self.files = {}, {}
        for task, run in self.runs.items():
            if run.labels is None or run.tokenizer is None:
                raise JaxfoundError(f"{run.path}: --refit-heads needs a fine-tuned token tagger (labels.json, "
                                    f"tokenizer) for task '{task}'")
            refit.token_head(run.params, str(run.path))
            for split in ("train", "valid"):
                file = (files or {}).get(task, {}).get(split) or getattr(run.config.data, split)
                if not file:
                    raise JaxfoundError(f"{run.path}: config key data.{split} is empty; --refit-heads needs the "
                                        f"{split} file of task '{task}'")
                self.files[task, split] = str(file)
                self.splits[task, split] = run.task.read(file, run.config.data, run.labels, run.tokenizer,
                                                         run.config.data.seq_len)
        self._cache: dict = {}

    def features(self, task: str, split: str, trunk_key: str, trunk) -> list[np.ndarray]:
        key = (id(trunk), self.files[task, split])
        if key not in self._cache:
            run = self.runs[task]
            self._cache = {k: v for k, v in self._cache.items() if k[0] == id(trunk)}  # one trunk at a time
            self._cache[key] = (trunk, refit.trunk_features(run.model.cfg, trunk_key, trunk,
                                                            self.splits[task, split].windows,
                                                            run.config.data.seq_len, run.pad_id))
        return self._cache[key][1]

    def score(self, task: str, split: str, feats: list[np.ndarray], head: dict) -> float:
        """The task's metric of the head on cached features (what evaluating the whole model gives)."""
        run, data = self.runs[task], self.splits[task, split]
        report = run.task.score(data.gold, run.task.decode(data, refit.predict(feats, head), run.labels))
        return float(report[self.metrics.get(task, run.task.metric)])

    def refit_one(self, task: str, params: dict) -> tuple[dict, dict]:
        """(params with the best-on-valid head of epochs 0..cfg.epochs, what was done)."""
        key, trunk, _ = merge.split_trunk(params)
        train, valid = (self.features(task, s, key, trunk) for s in ("train", "valid"))
        X_NxD, y_N = refit.labelled_tokens(train, self.splits[task, "train"].windows.labels)
        history = refit.fit_head(refit.token_head(params), X_NxD, y_N, self.cfg)
        scores = [self.score(task, "valid", valid, h) for h in history]
        best = int(np.argmax(scores))
        head = {k: np.asarray(v, np.asarray(params[refit.HEAD_KEY][k]).dtype) for k, v in history[best].items()}
        info = {**asdict(self.cfg), "epoch_kept": best, "valid_before": scores[0], "valid_after": scores[best],
                "train_file": self.files[task, "train"], "train_tokens": int(len(y_N))}
        return {**params, refit.HEAD_KEY: head}, info

    def __call__(self, task_params: Mapping[str, dict]) -> tuple[dict[str, dict], dict[str, dict]]:
        out, info = {}, {}
        for task, params in task_params.items():
            if task not in self.runs:
                raise JaxfoundError(f"refit: no run for task '{task}'; known: {sorted(self.runs)}")
            out[task], info[task] = self.refit_one(task, params)
        return out, info
