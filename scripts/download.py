#!/usr/bin/env python3
"""Download SDAR checkpoints and the paper's datasets from the Hugging Face Hub into a local folder.

    python scripts/download.py model SDAR-8B-Chat --out checkpoints/
    python scripts/download.py data sft-light rl-light --out data/
    python scripts/download.py list

Names are short aliases (see `list`) or full Hub repo ids (`owner/name`). Uses huggingface_hub's
resumable `snapshot_download`; set HF_TOKEN for gated repos and HF_ENDPOINT for a mirror.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

MODELS = {
    "SDAR-1.7B-Chat": "JetLM/SDAR-1.7B-Chat",
    "SDAR-4B-Chat": "JetLM/SDAR-4B-Chat",
    "SDAR-8B-Chat": "JetLM/SDAR-8B-Chat",
    "DiRL-8B-Instruct": "OpenMOSS-Team/DiRL-8B-Instruct",
}
DATASETS = {
    "sft": "Auraithm/GLM4.6-OpenR1Math-SFT",
    "sft-light": "Auraithm/Light-OpenR1Math-SFT",
    "rl": "Auraithm/BigMath-RL",
    "rl-light": "Auraithm/Light-MATH-RL",
}


def resolve(name: str, table: dict[str, str]) -> str:
    if name in table:
        return table[name]
    if "/" in name:
        return name
    raise SystemExit(f"download: unknown name '{name}' (aliases: {', '.join(table)}; or give owner/name)")


def fetch(repo_id: str, repo_type: str, out: Path) -> Path:
    try:
        from huggingface_hub import snapshot_download
    except ImportError:  # pragma: no cover - installed with transformers
        raise SystemExit("download: huggingface_hub is not installed (pip install huggingface_hub)")
    target = out / repo_id.split("/")[-1]
    try:
        path = snapshot_download(repo_id=repo_id, repo_type=repo_type, local_dir=str(target))
    except Exception as e:  # noqa: BLE001 - turned into one clear line
        kind = type(e).__name__
        if "Connection" in kind or "Offline" in kind or "Timeout" in kind or "resolve" in str(e).lower():
            raise SystemExit(
                f"download: cannot reach the Hugging Face Hub for '{repo_id}' ({kind}). This machine seems to "
                "have no network: download on a machine that has one and copy the folder here."
            ) from None
        raise SystemExit(f"download: '{repo_id}' failed: {kind}: {e}") from None
    return Path(path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["model", "data", "list"])
    p.add_argument("names", nargs="*")
    p.add_argument("--out", default=".", help="destination folder")
    a = p.parse_args(argv)
    if a.what == "list":
        print("models:")
        for k, v in MODELS.items():
            print(f"  {k:<18} {v}")
        print("datasets:")
        for k, v in DATASETS.items():
            print(f"  {k:<18} {v}")
        return 0
    if not a.names:
        p.error("name at least one model or dataset")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    for n in a.names:
        repo = resolve(n, MODELS if a.what == "model" else DATASETS)
        path = fetch(repo, "model" if a.what == "model" else "dataset", out)
        print(f"{repo} -> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
