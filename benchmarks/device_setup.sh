# Device machine setup for the benchmarks, sourced from the repository root (it changes this shell's environment):
#
#     source benchmarks/device_setup.sh && python3 benchmarks/bench_train.py ...
#
# The device has torch, triton, transformers and peft but no internet. Carry `.whl` (the bitsandbytes wheel) and
# `.peerwhl` (../shared/peer-wheels/*.whl: unsloth, unsloth_zoo, liger_kernel, trl, datasets, dill, multiprocess),
# both ignored folders of the checkout named in the run's carry list. Unzipping a wheel is installing it for
# these pure-Python packages and bitsandbytes' prebuilt library (under a second; pip install --target: ~26 s).
python3 - <<'PY' || return 1
import glob, zipfile
wheels = sorted(glob.glob(".whl/*.whl") + glob.glob(".peerwhl/*.whl"))
for w in wheels:
    zipfile.ZipFile(w).extractall("/tmp/site")
print(f"device_setup: {len(wheels)} wheels unpacked into /tmp/site: {[w.split('/')[-1].split('-')[0] for w in wheels]}")
PY
# Not the checkout itself: its top-level kernels/ would stand in for the PyPI `kernels` package that transformers
# probes for (bench_train.py puts the checkout on sys.path only where ours runs).
export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
# Offline: Unsloth and the hub client otherwise try the network at import and at from_pretrained.
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 UNSLOTH_DISABLE_STATISTICS=1
export HF_HUB_DISABLE_TELEMETRY=1 DO_NOT_TRACK=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
