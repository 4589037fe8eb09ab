"""llama.cpp for the comparisons of PROTOCOL: built once from the source vendored in the `llama-cpp-python`
sdist into a cache outside the checkout, and GGUFs of smollm2-135m made with its `llama-quantize`.

The cache (default `~/.cache/cmpq/llama.cpp-<version>`, or `$CMPQ_LLAMACPP_CACHE`, or a `--cache DIR` of the
scripts that use this module) holds:

    llama_cpp_python-<version>.tar.gz      the sdist (`pip download --no-deps --no-binary :all:`)
    src/llama_cpp_python-<version>/        the unpacked sdist; its `vendor/llama.cpp` is what is built
    build-<cpu>/bin/llama-*                one build per CPU (GGML_NATIVE=ON compiles for the machine it runs on,
                                           and the machines of this project change from run to run)
    build-<cpu>/cmpq-build.json            how it was built: options, commit, CPU, seconds
    gguf/<sha256 of the source>/*.gguf     the quantized models, per source file

Used by `llamacpp_quality.py` (perplexity) and meant for the speed benchmark against `llama-bench`.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

VERSION = "0.3.36"  # llama-cpp-python sdist whose vendored llama.cpp PROTOCOL names
SDIST = f"llama_cpp_python-{VERSION}"
DEFAULT_TARGETS = ("llama-quantize", "llama-bench", "llama-perplexity")  # share libllama/common: the last two are cheap
CACHE_ENV = "CMPQ_LLAMACPP_CACHE"


class LlamaCppError(Exception):
    """A failure to print as one line (no network, no cmake, a failed build...)."""


def default_cache() -> Path:
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "cmpq" / f"llama.cpp-{VERSION}"


def log(message: str) -> None:
    print(f"[llama.cpp] {message}", flush=True)


def source_root(cache: Path) -> Path:
    return cache / "src" / SDIST


def llama_cpp_dir(cache: Path) -> Path:
    return source_root(cache) / "vendor" / "llama.cpp"


# ---------------------------------------------------------------------------------------------- the source


def ensure_source(cache: Path) -> Path:
    """The vendored llama.cpp directory, downloading and unpacking the sdist when it is not in the cache yet."""
    target = llama_cpp_dir(cache)
    if (target / "CMakeLists.txt").is_file():
        log(f"source: {target} (cached)")
        return target
    cache.mkdir(parents=True, exist_ok=True)
    archive = cache / f"{SDIST}.tar.gz"
    if not archive.is_file():
        log(f"downloading the llama-cpp-python=={VERSION} sdist into {cache} (about 77 MB) ...")
        start = time.perf_counter()
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                   f"llama-cpp-python=={VERSION}", "-d", str(cache)]
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        if done.returncode != 0 or not archive.is_file():
            tail = (done.stderr or done.stdout).strip().splitlines()
            text = (done.stderr or "").lower()
            hint = ""
            if any(word in text for word in ("connection", "resolve", "network", "timed out", "from versions: none")):
                hint = " (is PyPI reachable from here? the sdist is needed once; or pass --cache with a built copy)"
            raise LlamaCppError(f"pip download of llama-cpp-python=={VERSION} failed{hint}: "
                                f"{tail[-1] if tail else 'exit code ' + str(done.returncode)}")
        log(f"downloaded {archive.name} ({archive.stat().st_size / 1e6:.1f} MB) in {time.perf_counter() - start:.0f} s")
    log(f"unpacking {archive.name} ...")
    unpack_to = cache / "src"
    partial = unpack_to / f".{SDIST}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    try:
        with tarfile.open(archive) as tar:
            tar.extractall(partial, filter="data")
    except (tarfile.TarError, OSError) as exc:
        shutil.rmtree(partial, ignore_errors=True)
        raise LlamaCppError(f"cannot unpack {archive}: {exc} (delete it to download it again)") from exc
    if not (partial / SDIST / "vendor" / "llama.cpp" / "CMakeLists.txt").is_file():
        shutil.rmtree(partial, ignore_errors=True)
        raise LlamaCppError(f"{archive} has no vendor/llama.cpp/CMakeLists.txt: not the expected sdist")
    shutil.rmtree(source_root(cache), ignore_errors=True)
    (partial / SDIST).rename(source_root(cache))
    partial.rmdir()
    return target


def vendored_commit(cache: Path) -> str | None:
    """The llama.cpp commit the sdist vendors: the submodule's HEAD shipped in the sdist's .git, else the
    CHANGELOG's "update llama.cpp to ggml-org/llama.cpp@<commit>" line of this version."""
    root = source_root(cache)
    head = root / ".git" / "modules" / "vendor" / "llama.cpp" / "HEAD"
    try:
        text = head.read_text().strip()
        if len(text) == 40 and all(c in "0123456789abcdef" for c in text):
            return text
    except OSError:
        pass
    try:
        changelog = (root / "CHANGELOG.md").read_text(encoding="utf-8")
        section = changelog.split(f"## [{VERSION}]", 1)[1].split("\n## [", 1)[0]
        marker = "ggml-org/llama.cpp@"
        if marker in section:
            return section.split(marker, 1)[1].split()[0].strip("`.,)")
    except (OSError, IndexError):
        pass
    return None


def version_info(cache: Path) -> dict[str, str | None]:
    return {"sdist": f"llama-cpp-python=={VERSION}", "commit": vendored_commit(cache)}


# ---------------------------------------------------------------------------------------------- the build


def cpu_info() -> dict[str, object]:
    """CPU model name and ISA flags (Linux /proc/cpuinfo; elsewhere what `platform` knows)."""
    name, flags = platform.processor() or platform.machine(), []
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and name in ("", platform.machine(), platform.processor()):
                name = value.strip()
            elif key.strip() in ("flags", "Features") and not flags:
                flags = value.split()
    except OSError:
        pass
    return {"model_name": name, "machine": platform.machine(), "flags": flags}


def cpu_key(cpu: dict[str, object]) -> str:
    text = json.dumps([cpu["model_name"], cpu["machine"], sorted(cpu["flags"])])  # type: ignore[arg-type]
    return hashlib.sha1(text.encode()).hexdigest()[:10]


def build_dir(cache: Path) -> Path:
    return cache / f"build-{cpu_key(cpu_info())}"


def binary(cache: Path, target: str) -> Path:
    return build_dir(cache) / "bin" / target


def cmake_options(cpu: dict[str, object]) -> list[str]:
    """PROTOCOL's build: native, Release, no network code; only what the tools need. `LLAMA_CURL` (the brief's
    option) is deprecated and ignored in this llama.cpp (libcurl is gone): the network switch is now
    `LLAMA_OPENSSL`. On an x86 CPU with AMX, AMX is turned off (PROTOCOL: its AMX path crashed on Q8_0/Q4_0
    models): with GGML_NATIVE=ON the GGML_AMX_* options are not consulted and `-march=native` turns AMX on,
    so it is also disabled with `-mno-amx-*` compiler flags (an explicit -mno-* wins over -march in GCC/Clang)."""
    options = ["-DGGML_NATIVE=ON", "-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_OPENSSL=OFF",
               "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF",
               "-DLLAMA_BUILD_APP=OFF", "-DLLAMA_USE_PREBUILT_UI=OFF"]
    flags = set(cpu["flags"])  # type: ignore[arg-type]
    if any(f.startswith("amx") for f in flags) and cpu["machine"] in ("x86_64", "AMD64", "i686"):
        no_amx = "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
        options += ["-DGGML_AMX_TILE=OFF", "-DGGML_AMX_INT8=OFF", "-DGGML_AMX_BF16=OFF",
                    f"-DCMAKE_C_FLAGS={no_amx}", f"-DCMAKE_CXX_FLAGS={no_amx}"]
    return options


def _run(command: list[str], what: str, cwd: Path | None = None, log_file: Path | None = None) -> None:
    log("+ " + " ".join(command))
    with open(log_file, "a") if log_file else open(os.devnull, "w") as sink:
        process = subprocess.Popen(command, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        tail: list[str] = []
        assert process.stdout is not None
        for line in process.stdout:
            sink.write(line)
            tail = (tail + [line.rstrip()])[-15:]
            if line.startswith("[") and "%]" in line[:8]:  # make/ninja progress: one line per step, kept short
                print("    " + line.rstrip()[:150], flush=True)
        code = process.wait()
    if code != 0:
        print("\n".join("    " + t for t in tail), file=sys.stderr)
        where = f"; full log: {log_file}" if log_file else ""
        raise LlamaCppError(f"{what} failed with exit code {code}{where}")


def ensure_built(cache: Path | None = None, targets: tuple[str, ...] = DEFAULT_TARGETS, jobs: int = 2) -> Path:
    """Build the `targets` unless their binaries are already in the cache; returns the build's bin directory."""
    cache = cache or default_cache()
    cpu = cpu_info()
    build = build_dir(cache)
    missing = [t for t in targets if not (build / "bin" / t).is_file()]
    if not missing:
        log(f"binaries: {build / 'bin'} ({', '.join(targets)}; cached, not rebuilt)")
        return build / "bin"
    if shutil.which("cmake") is None:
        raise LlamaCppError("cmake is not installed (apt-get install cmake, or pip install cmake)")
    if shutil.which("c++") is None and shutil.which("g++") is None and shutil.which("clang++") is None:
        raise LlamaCppError("no C++ compiler found (apt-get install build-essential)")
    source = ensure_source(cache)
    build.mkdir(parents=True, exist_ok=True)
    log_file = build / "cmpq-build.log"
    log(f"building {', '.join(missing)} for {cpu['model_name']} in {build} (-j{jobs}; log: {log_file})")
    start = time.perf_counter()
    options = cmake_options(cpu)
    if not (build / "CMakeCache.txt").is_file():
        _run(["cmake", "-S", str(source), "-B", str(build), *options], "cmake configure", log_file=log_file)
    _run(["cmake", "--build", str(build), "-j", str(jobs), "--target", *missing], "cmake build", log_file=log_file)
    seconds = time.perf_counter() - start
    still = [t for t in missing if not (build / "bin" / t).is_file()]
    if still:
        raise LlamaCppError(f"the build finished but {', '.join(still)} is not in {build / 'bin'}; see {log_file}")
    info_file = build / "cmpq-build.json"
    info = json.loads(info_file.read_text()) if info_file.is_file() else {}
    info.update({"llama_cpp": version_info(cache), "cmake_options": options,
                 "cpu": {"model_name": cpu["model_name"], "machine": cpu["machine"]},
                 "compiler": compiler_version()})
    info.setdefault("targets", {}).update({t: round(seconds, 1) for t in missing})
    info_file.write_text(json.dumps(info, indent=1) + "\n")
    log(f"built {', '.join(missing)} in {seconds:.0f} s")
    return build / "bin"


def compiler_version() -> str | None:
    for compiler in ("c++", "g++", "clang++"):
        if shutil.which(compiler):
            out = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=False).stdout
            return out.splitlines()[0] if out else None
    return None


def build_info(cache: Path) -> dict[str, object]:
    path = build_dir(cache) / "cmpq-build.json"
    return json.loads(path.read_text()) if path.is_file() else {}


# ---------------------------------------------------------------------------------------------- GGUFs


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def gguf_dir(cache: Path, source: Path) -> Path:
    """Where the GGUFs made from `source` go: keyed by its content, so a different shipped file is never
    mistaken for this one."""
    return cache / "gguf" / sha256(source)[:16]


def quantize(cache: Path, source: Path, qtype: str, threads: int = 2) -> tuple[Path, dict[str, object]]:
    """`llama-quantize --allow-requantize source out qtype threads` unless `out` is cached; returns (path, info)
    where info = {command, seconds, fallback_tensors, cached}, kept in a `.quantize.json` beside the GGUF."""
    out_dir = gguf_dir(cache, source)
    stem = source.name.removesuffix(".gguf")
    stem = stem.rsplit(".", 1)[0] if "." in stem else stem  # SmolLM2-135M-Instruct.Q4_1 -> SmolLM2-135M-Instruct
    out = out_dir / f"{stem}.{qtype}.gguf"
    info_file = out_dir / f"{stem}.{qtype}.quantize.json"
    if out.is_file():
        info = json.loads(info_file.read_text()) if info_file.is_file() else {}
        log(f"{qtype}: {out} (cached)")
        return out, {**info, "cached": True}
    tool = binary(cache, "llama-quantize")
    if not tool.is_file():
        raise LlamaCppError(f"{tool} is missing: build it first (ensure_built)")
    out_dir.mkdir(parents=True, exist_ok=True)
    partial = out_dir / f".{out.name}.partial"
    log_file = out_dir / f"{stem}.{qtype}.quantize.log"
    command = [str(tool), "--allow-requantize", str(source), str(partial), qtype, str(threads)]
    log("+ " + " ".join(command))
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - start
    log_file.write_text(done.stdout + done.stderr)
    if done.returncode != 0 or not partial.is_file():
        partial.unlink(missing_ok=True)
        tail = (done.stderr or done.stdout).strip().splitlines()
        raise LlamaCppError(f"llama-quantize {qtype} failed (exit {done.returncode}): "
                            f"{tail[-1] if tail else ''}; log: {log_file}")
    partial.rename(out)
    fallbacks = sum("falling back" in line for line in (done.stdout + done.stderr).splitlines())
    info = {"command": ["llama-quantize", "--allow-requantize", source.name, out.name, qtype, str(threads)],
            "seconds": round(seconds, 2), "fallback_tensors": fallbacks}
    info_file.write_text(json.dumps(info) + "\n")
    log(f"{qtype}: {out.name} ({out.stat().st_size / 1e6:.1f} MB, {fallbacks} tensors fell back to another type) "
        f"in {seconds:.1f} s")
    return out, {**info, "cached": False}
