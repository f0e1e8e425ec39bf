"""`jaxfound evaluate / predict / export`: a fine-tuned, merged or quantized run dir, on its own.

    report = evaluate("runs/ner", "test.txt")      # entity + token-level reports from the run dir alone
    rows = predict("runs/ner", texts=["EU rejects German call"])
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from jaxfound import runs
from jaxfound.errors import JaxfoundError
from jaxfound.inference import Predictor
from jaxfound.interop.hf import save_pretrained
from jaxfound.interop.peft import save_adapter
from jaxfound.sharding import make_mesh


def predictor_for(run: runs.Run) -> Predictor:
    """The run's model on all local devices (data-parallel), batches as the run was trained."""
    mesh = make_mesh(dataclasses.replace(run.config.mesh, data=-1, fsdp=1, tensor=1))
    return Predictor(run.model, run.task, run.labels, run.tokenizer, run.config.data.seq_len,
                     run.config.train.batch_size, mesh)


def open_labelled(run_dir) -> runs.Run:
    """A run that labels text: a fine-tuned (merged, quantized) tagger or classifier."""
    run = runs.open_run(run_dir)
    if run.task.pretraining or run.labels is None:
        raise JaxfoundError(f"{run_dir}: not a fine-tuned run (needs labels.json and a labelling train.task: "
                            "ner, pos, chunk or cls)")
    if run.tokenizer is None:
        raise JaxfoundError(f"{run_dir}: no tokenizer (tokenizer/ or tokenizer files); add the one it was trained with")
    return run


def evaluate(run_dir, file, out=None) -> dict:
    """Score a fine-tuned run on a labelled file (CoNLL for tagging, CSV / JSON lines for cls); JSON at out."""
    run = open_labelled(run_dir)
    predictor = predictor_for(run)
    report = predictor.score(run.params, predictor.read(file, run.config.data))
    report["file"] = str(file)
    report["table"] = run.task.render(report)
    if out:
        runs.write_json(out, report)
    return report


def predict(run_dir, texts: list[str]) -> list[dict]:
    """Tagging: entities with character offsets (and word tags) per text; cls: the label per text."""
    run = open_labelled(run_dir)
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise JaxfoundError("predict: nothing to predict (give texts or a non-empty file)")
    split = run.task.inputs(texts, run.tokenizer, run.config.data.seq_len)
    return run.task.rows(texts, split, predictor_for(run).predict(run.params, split))


def export(run_dir, out, adapter: bool = False):
    """A transformers directory (safetensors, config, tokenizer) of a float run; adapter: a LoRA run's adapters as a
    PEFT adapter directory (adapter_config.json + adapter_model.safetensors) for its base model instead."""
    if adapter:
        run = runs.require_float(runs.open_run(run_dir, adapters=True), "export")
        if not run.config.model.lora.rank:
            raise JaxfoundError(f"{run_dir} has no LoRA adapters (fine-tune with train.lora.rank > 0); export it "
                                "without --adapter")
        base = run.config.model.init
        path = save_adapter(out, run.model, run.params, base=str(Path(base).resolve()) if base else None)
        runs.write_labels_and_tokenizer(path, run.labels, None)
        if run.tokenizer is not None:
            run.tokenizer.save_pretrained(str(path))
        return path
    run = runs.require_float(runs.open_run(run_dir), "export")
    return save_pretrained(out, run.model, run.params, tokenizer=run.tokenizer, id2label=run.labels)
