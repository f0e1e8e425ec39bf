"""int8 on a fine-tuned CoNLL-2003 NER model: jaxfound w8 / w8a8 vs fp32, with torch dynamic int8 as a reference.

    python benchmarks/ner_conll03.py --only jax ...                     # or `jaxfound finetune` -> a run dir
    python benchmarks/quant_conll03.py --run runs/ner_conll03           # test set, 3 timed passes
    python benchmarks/quant_conll03.py --run /tmp/run --limit 200 --rounds 1   # smoke run

Sizes: the quantized Dense tensors (target >= 3.9x smaller) and the whole model (jaxfound params / torch
state_dict as torch.save writes it). Entity F1 (seqeval default mode) on the test file (targets: w8 within 0.3
points of fp32, w8a8 within 1.0). Inference real (non-padding) tokens/s on this CPU of five models over the same
length-sorted batches: jaxfound fp32, w8, w8a8 (the last two loaded from `jaxfound quantize` dirs, as a user would)
and transformers BertForTokenClassification fp32 and torch.ao quantize_dynamic int8 (Linear -> qint8) of the
same weights exported with jaxfound.interop.hf.save_pretrained. After one untimed pass per model (compiles,
F1), the models run batch by batch in alternation so they share the machine's noise. Writes JSON, prints a table.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from benchmarks.common import write_subset  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "conll2003"
TARGETS = {"quantized_ratio": 3.9, "w8": 0.3, "w8a8": 1.0, "w8a8_speedup": 1.5}  # x smaller; F1 drop (points); x


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def torch_models(run, tmp: Path):
    """(fp32, dynamic-int8) BertForTokenClassification of the run's weights, and their torch.save sizes."""
    import torch
    from transformers import BertForTokenClassification

    from jaxfound.interop.hf import save_pretrained

    hf = save_pretrained(tmp / "hf", run.model, run.params, tokenizer=run.tokenizer, id2label=run.labels)
    fp32 = BertForTokenClassification.from_pretrained(str(hf)).eval()
    int8 = torch.ao.quantization.quantize_dynamic(fp32, {torch.nn.Linear}, dtype=torch.qint8).eval()

    def size(m) -> int:
        buf = io.BytesIO()
        torch.save(m.state_dict(), buf)
        return buf.getbuffer().nbytes

    return {"torch fp32": (fp32, size(fp32)), "torch int8 (quantize_dynamic)": (int8, size(int8))}


def torch_runner(model, batches):
    import torch

    keys = ("input_ids", "attention_mask", "token_type_ids")
    tensors = [{k: torch.from_numpy(np.asarray(b[k], np.int64)) for k in keys if k in b} for _, b in batches]

    def run(i):
        with torch.inference_mode():
            return model(**tensors[i]).logits.argmax(-1).numpy()
    return run


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", required=True, help="fine-tuned CoNLL-2003 NER run dir (jaxfound finetune)")
    ap.add_argument("--file", default=str(DATA / "test.txt"), help="labelled CoNLL file (default: the test set)")
    ap.add_argument("--limit", type=int, default=None, help="first N sentences of --file only (smoke runs)")
    ap.add_argument("--rounds", type=int, default=3, help="timed passes over the file per model")
    ap.add_argument("--no-torch", action="store_true", help="skip the PyTorch reference")
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads (jax uses every core)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "quant_conll03.json"))
    args = ap.parse_args(argv)
    if not Path(args.file).is_file():
        ap.error(f"--file {args.file}: no such file; give a labelled CoNLL file (the default is the CoNLL-2003 "
                 "test set at ../shared/data/conll2003/test.txt beside the repo)")
    if not (Path(args.run) / "config.json").is_file():
        ap.error(f"--run {args.run}: not a jaxfound run dir (no config.json); give a `jaxfound finetune` NER run")

    import jax

    from jaxfound.app.quantize import interleaved_throughput, jax_runner, quantize_run, real_tokens
    from jaxfound.inference import EVAL_BATCH, Predictor
    from jaxfound.quant import kernel
    from jaxfound.runs import open_run
    from jaxfound.sharding import global_batch, make_mesh

    tmp = Path(tempfile.mkdtemp(prefix="quant_conll03_"))
    eval_file = write_subset(Path(args.file), tmp / "eval.txt", args.limit)

    # ---- Quantize with the CLI's library function; reload everything from disk ----
    sizes = {m: quantize_run(args.run, m, tmp / m, register=False) for m in ("w8", "w8a8")}  # scratch copies
    runs = {"jaxfound fp32": open_run(args.run), "jaxfound w8": open_run(tmp / "w8"),
            "jaxfound w8a8": open_run(tmp / "w8a8")}
    base = runs["jaxfound fp32"]
    seq_len = base.config.data.seq_len
    mesh = make_mesh(dataclasses.replace(base.config.mesh, data=-1, fsdp=1, tensor=1))
    # one mesh, one eval batch size and one split for every model: the same length-sorted batches for all
    reader = Predictor(base.model, base.task, base.labels, base.tokenizer, seq_len, EVAL_BATCH, mesh)
    predictors = {name: reader.for_model(run.model) for name, run in runs.items()}
    split = reader.read(eval_file, base.config.data)
    batches = reader.batches(split)
    placed = [global_batch({k: v for k, v in b.items() if k != "labels"}, mesh) for _, b in batches]
    model_bytes = {"jaxfound fp32": sizes["w8"]["bytes_before"], "jaxfound w8": sizes["w8"]["bytes_after"],
                   "jaxfound w8a8": sizes["w8a8"]["bytes_after"]}

    # ---- One untimed pass per model: compiles, and its predictions give the F1 ----
    def f1(preds) -> float:  # window predictions (torch) -> entity F1
        return float(base.task.score(split.gold, base.task.decode(split, preds, base.labels))["f1"])

    runners, results = {}, {}
    for name, run in runs.items():
        predictor, params = predictors[name], jax.device_put(run.params)
        results[name] = {"f1": float(predictor.score(params, split)["f1"])}
        runners[name] = jax_runner(predictor.step, params, placed)
    if not args.no_torch:
        import torch

        torch.set_num_threads(args.threads)
        for name, (model, nbytes) in torch_models(base, tmp).items():
            runners[name] = torch_runner(model, batches)
            preds = [None] * len(split.windows)
            for i, (rows, _) in enumerate(batches):
                out = runners[name](i)
                for j, r in enumerate(rows):
                    if r >= 0:
                        preds[r] = out[j]
            results[name] = {"f1": f1(preds)}
            model_bytes[name] = nbytes

    # ---- Timed passes, all models alternating batch by batch ----
    speed = interleaved_throughput(runners, [real_tokens(b) for _, b in batches], args.rounds)
    fp32 = {"jaxfound": results["jaxfound fp32"], "torch": results.get("torch fp32")}
    for name, r in results.items():
        ref = fp32["torch" if name.startswith("torch") else "jaxfound"]
        ref_speed = speed["torch fp32" if name.startswith("torch") else "jaxfound fp32"]
        r |= {"f1_change_pts": 100 * (r["f1"] - ref["f1"]), "tokens_per_s": speed[name],
              "speedup_vs_own_fp32": speed[name] / ref_speed, "model_bytes": model_bytes[name]}

    report = {
        "run": str(args.run), "file": str(eval_file if args.limit else args.file), "sentences": len(split.gold),
        "real_tokens": sum(real_tokens(b) for _, b in batches), "batches": len(batches), "rounds": args.rounds,
        "quantized_ratio": sizes["w8"]["quantized_ratio"], "quantized_layers": sizes["w8"]["quantized_layers"],
        "model_ratio": sizes["w8"]["ratio"], "models": results, "devices": str(jax.devices()),
        "targets": {"quantized_ratio >= 3.9": sizes["w8"]["quantized_ratio"] >= TARGETS["quantized_ratio"],
                    "w8 F1 drop <= 0.3": -results["jaxfound w8"]["f1_change_pts"] <= TARGETS["w8"],
                    "w8a8 F1 drop <= 1.0": -results["jaxfound w8a8"]["f1_change_pts"] <= TARGETS["w8a8"],
                    "w8a8 tokens/s >= 1.5x jaxfound fp32":
                        results["jaxfound w8a8"]["speedup_vs_own_fp32"] >= TARGETS["w8a8_speedup"]},
        "w8a8_backend": f"{kernel.path()} kernel" if kernel.available() else "XLA ops",
    }
    print(format_table(report))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(f"wrote {args.out}")
    return 0


def format_table(report: dict) -> str:
    lines = [f"{report['sentences']} sentences, {report['real_tokens']:,} real tokens, {report['batches']} "
             f"length-sorted batches, {report['rounds']} timed passes; {report['devices']}",
             f"quantized Dense tensors: {report['quantized_layers']} layers, {report['quantized_ratio']:.2f}x smaller; "
             f"whole jaxfound model {report['model_ratio']:.2f}x smaller",
             f"{'model':<32} {'entity F1':>9} {'change':>8} {'real tok/s':>11} {'vs own fp32':>11} {'MB':>8}"]
    for name, r in report["models"].items():
        lines.append(f"{name:<32} {100 * r['f1']:>9.2f} {r['f1_change_pts']:>+8.2f} {r['tokens_per_s']:>11,.0f} "
                     f"{r['speedup_vs_own_fp32']:>10.2f}x {r['model_bytes'] / 1e6:>8.2f}")
    lines += [f"target {k}: {'met' if v else 'MISSED'}" for k, v in report["targets"].items()]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
