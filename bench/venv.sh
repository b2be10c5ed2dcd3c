#!/usr/bin/env bash
# Purpose:  create .deps/bench-venv, the Python side of the benchmarks in bench/, idempotently:
#           torch==2.11.0 (CPU-usable, see below) for bench/allreduce.sh, and torchvision 0.26 +
#           pillow + numpy for bench/decode.sh. Re-running it is a no-op.
# How:      PyPI only has the CUDA build of torch, whose libraries need several GB of nvidia-*
#           wheels to load; we install torch with --no-deps plus its pure-Python deps and the two
#           small CUDA wheels libtorch_cpu.so itself links (cudart, cupti, ~15 MB; as setup.sh does
#           for libtorch), and compile tiny stub libraries for the rest (cuBLAS, cuDNN, NCCL, ...):
#           each exports the exact (versioned) symbols the torch libraries import, and aborts with a
#           message if ever called. CPU-only torch, gloo included, works. torchvision==0.26.0 (the
#           release for torch 2.11) is installed with --no-deps too, so pip cannot replace torch.
# Command:  bash bench/venv.sh      (the bench scripts call it; BENCH_VENV=<path> puts the venv
#           elsewhere than .deps/bench-venv)
# Time:     ~1 min and ~1 GB of downloads the first time (torch), ~10 s more for torchvision;
#           instant afterwards. The venv is ~1.5 GB; nothing is cached.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
log() { printf '[bench-venv] %s\n' "$*" >&2; }
venv=${BENCH_VENV:-"$root/.deps/bench-venv"}
if [ ! -f "$venv/.complete" ]; then
  log "creating $venv (torch 2.11.0 from PyPI, CUDA libraries stubbed)"
  rm -rf "$venv"
  if ! python3 -m venv "$venv" 2>/dev/null; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq && apt-get install -y -qq --no-install-recommends python3-venv >/dev/null
    rm -rf "$venv"
    python3 -m venv "$venv"
  fi
  "$venv/bin/pip" install --quiet --no-cache-dir --no-deps torch==2.11.0 \
    nvidia-cuda-runtime==13.0.96 nvidia-cuda-cupti==13.0.85 filelock==4.3.1 \
    typing_extensions==4.16.0 sympy==1.14.0 mpmath==1.4.1 networkx==3.6.1 Jinja2==3.1.6 \
    MarkupSafe==3.0.4 fsspec==2026.9.0
  site=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  "$venv/bin/python" - "$site/torch/lib" "$site/nvidia/cu13/lib" "$site/torch-cpu-stubs" <<'PY'
# Stub every library the torch libraries loaded by `import torch` need but cannot find here.
import collections, os, re, subprocess, sys
lib, cuda, out = sys.argv[1:4]
load = ["libtorch_python.so", "libtorch.so", "libtorch_cuda.so", "libc10_cuda.so", "libc10.so",
        "libtorch_nvshmem.so", "libtorch_cpu.so", "libshm.so", "libtorch_global_deps.so"]
run = lambda *a: subprocess.run(a, capture_output=True, text=True, check=True).stdout
system = run("ldconfig", "-p")
here = set(os.listdir(lib)) | set(os.listdir(cuda))
missing = {n for f in load for n in re.findall(r"\(NEEDED\).*\[(.+)\]", run("readelf", "-d", f"{lib}/{f}"))
           if n not in here and not re.search(rf"^\s+{re.escape(n)}\s", system, re.M)}
syms = lambda path: [l.split() for l in run("readelf", "--dyn-syms", "-W", path).splitlines()
                     if len(l.split()) >= 8 and l.split()[0].endswith(":")]
defined = {s[7].split("@")[0] for p in [f"{lib}/{f}" for f in load] + [f"{cuda}/{f}" for f in
           os.listdir(cuda) if ".so" in f] for s in syms(p) if s[6] != "UND"}
ver_file, want = {}, {}
for f in load:
    cur = None
    for line in run("readelf", "-V", "-W", f"{lib}/{f}").splitlines():
        if m := re.search(r"File: (\S+)", line): cur = m.group(1)
        if (m := re.search(r"Name: (\S+)\s+Flags", line)) and cur: ver_file[m.group(1)] = cur
    for s in syms(f"{lib}/{f}"):
        if s[6] == "UND" and s[4] == "GLOBAL":
            name, _, ver = s[7].partition("@")
            if (ver and ver_file.get(ver) in missing) or (not ver and name not in defined):
                want[name] = (s[3], ver)
home = sorted(missing)[0]  # unversioned symbols resolve from any loaded library
per_lib = collections.defaultdict(list)
for name, (typ, ver) in want.items():
    per_lib[ver_file[ver] if ver else home].append((name, typ, ver))
os.makedirs(out, exist_ok=True)
for so in sorted(missing):
    c = ["#include <stdio.h>\n#include <stdlib.h>",
         f'static void die(const char *s) {{ fprintf(stderr, "{so} is a CPU-only stub: %s called\\n", s); abort(); }}']
    vers = collections.defaultdict(list)
    for name, typ, ver in per_lib[so]:
        c.append({"OBJECT": f"char {name}[256];", "TLS": f"__thread char {name}[256];"}.get(
            typ, f'void {name}(void) {{ die("{name}"); }}'))
        if ver: vers[ver].append(name)
    open(f"{out}/{so}.c", "w").write("\n".join(c) + "\n")
    args = ["cc", "-shared", "-fPIC", "-w", "-o", f"{lib}/{so}", f"{out}/{so}.c", f"-Wl,-soname,{so}"]
    if vers:
        open(f"{out}/{so}.map", "w").write("".join(f"{v} {{ global: {' '.join(n + ';' for n in ns)} }};\n"
                                                   for v, ns in vers.items()))
        args.append(f"-Wl,--version-script={out}/{so}.map")
    subprocess.run(args, check=True)
    print(f"[bench-venv] stub {so}: {len(per_lib[so])} symbols", file=sys.stderr)
PY
  "$venv/bin/python" -W ignore -c 'import torch.distributed as d; assert d.is_gloo_available()'
  touch "$venv/.complete"
fi

if ! "$venv/bin/python" -W ignore -c 'import torchvision, PIL, numpy' 2>/dev/null; then
  log "installing torchvision 0.26.0, pillow, numpy into $venv"
  "$venv/bin/pip" install --quiet --no-cache-dir --no-deps torchvision==0.26.0 pillow==13.0.0 \
    numpy==2.4.6
  "$venv/bin/python" -W ignore -c 'import torchvision.transforms.v2, PIL.Image, numpy'
fi
