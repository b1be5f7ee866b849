# Sourced by scripts/test.sh: NVRTC from PyPI (CUDA 13.0.88, the release matching the GPU
# machines' driver) in a venv under target/, installed only when missing. Exports LD_LIBRARY_PATH
# (libnvrtc for cudarc's dynamic loading). The register and spill reports come from NVRTC's own
# ptxas (tests/kernels_compile.rs), so no separate ptxas is installed.
# Under CI=true the emulator tests fail without NVRTC, so a failed install fails the run.
nvrtc_venv=target/nvrtc-venv
nvrtc_lib() { ls -d "$nvrtc_venv"/lib/python3*/site-packages/nvidia/cu13/lib 2>/dev/null | head -n1; }
if [ -z "$(nvrtc_lib)" ] || [ ! -e "$(nvrtc_lib)/libnvrtc.so.13" ]; then
  python3 -m venv "$nvrtc_venv"
  "$nvrtc_venv/bin/pip" install --quiet --disable-pip-version-check \
    "nvidia-cuda-nvrtc==13.0.88"
fi
NVRTC_LIB_DIR="$(cd "$(nvrtc_lib)" && pwd)"
export LD_LIBRARY_PATH="$NVRTC_LIB_DIR${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
unset nvrtc_venv NVRTC_LIB_DIR
