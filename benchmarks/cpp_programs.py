"""The C++ benchmark programs of benchmarks/cpp, built (under build/bench-cpp) against an opqn_ext
C++ library installed at a prefix by ``cmake --install`` with its index files; for the ``--cpp
PREFIX`` option of bench_search_latency.py and bench_index.py."""
import subprocess
from pathlib import Path

import torch

HERE = Path(__file__).parent


def build(prefix: str) -> Path:
    """The folder of the built programs (time_index_search, time_index_files)."""
    folder = HERE.parent / "build" / "bench-cpp"
    for command in (["cmake", "-S", str(HERE / "cpp"), "-B", str(folder), "-DCMAKE_BUILD_TYPE=Release",
                     f"-DCMAKE_PREFIX_PATH={Path(prefix).resolve()};{torch.utils.cmake_prefix_path}"],
                    ["cmake", "--build", str(folder)]):
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode:
            raise SystemExit(f"{' '.join(command)} failed:\n{done.stdout[-3000:]}{done.stderr[-3000:]}")
    return folder
