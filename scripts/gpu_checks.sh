#!/usr/bin/env bash
# The GPU items no CPU can answer, as one command for a session that is lent a GPU (docs/testing.md "GPU checks"):
#   cuda-tests       the suite's CUDA cases (tests/test_offload.py: images under model CPU offload equal those kept on
#                    the GPU, SD 1.5, FLUX and SD 3; tiny models, seconds)
#   train-transformer  FLUX and SD 3 training on the GPU: the feature cache, buckets, stages, resume and the dry run
#                    (tests/test_train_transformer_*.py, tiny models; on a CPU their `.to(device)` calls move nothing,
#                    so only a GPU tells whether each tensor is where the step needs it)
#   issue 19 item 7  training steps/s and peak memory under fp32, fp16 and bf16 mixed precision at SD 1.5's size,
#                    and SDXL 1024 px with the 24 GB settings           (benchmarks/train_gpu.py)
#   issue 20 item 4  SD 1.5 512 px and SDXL 1024 px, 30 steps, fp16: plain / ipadapter / diffusers, time and peak
#                    memory (benchmarks/inference.py), µs per attention call (benchmarks/per_call.py), and the
#                    compiled UNet: plain / ipadapter / diffusers, default mode and CUDA graphs, SD 1.5 and (under
#                    CUDA graphs) SDXL (benchmarks/compiled.py); and the waits for the GPU in a FLUX generation,
#                    plain and with the adapter (benchmarks/flux_syncs.py, tiny models: the count follows the code
#                    path)
# Every step runs under `timeout` within one budget (GPU_CHECKS_BUDGET_S, default 540 s: the device tool allows 600 s
# a command), its output tee'd to $OUT/logs/<step>.log; a failing or timed-out step is recorded and the next runs.
# At the end: $OUT/summary.md (each step's exit code and time, then every result table), the result tables, and the
# logs joined into $OUT/logs.txt (the device tool returns at most 8 files). Exit 0 only when every step passed.
#
# The device has torch, transformers, accelerate, peft, safetensors, ... but not diffusers, braceexpand nor pytest: they
# travel as wheels (pure Python). Prepare them here once, in the repository's root (.whl/ is ignored by git):
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#     -d .whl diffusers==0.42.1 braceexpand==0.1.7 pytest==9.2.0 pluggy==1.7.0 iniconfig==2.3.1 pygments==2.21.0
# (the versions are constraints.txt's and the test venv's; their other needs are on the device image.) The tree that travels must stay
# under 64 MiB and the tracked training state in resume/ (86 MiB) is not needed there: take it out of the index only
# (its files stay on disk, for the jobs that use them), ~37 MiB and the wheels' 8 MiB are left:
#   git rm -r -q --cached resume && echo /resume/ >> .git/info/exclude
# Then one device-tool call, carry [".whl"], timeout_s 600:
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
#     && export PYTHONPATH=/tmp/site:$PWD/src && bash scripts/gpu_checks.sh
# and, before anything is committed, put resume/ back:
#   git reset -q -- resume && sed -i '\#^/resume/$#d' .git/info/exclude
#
# GPU_CHECKS_STEPS="train compiled" runs only those steps (names as in the summary), e.g. to rerun one that failed;
# GPU_CHECKS_ARCHS=sdxl limits the timing step to one base (default sd15,sdxl; memory always measures both).
#
# Measured on the H200 (two sessions, 2026-12-04; machine start and transfers ~40 s a call, ~10 s warm): env 20 s,
# train 156 s, SD 1.5 timing 94 s (71 s of passes), SDXL timing 151 s, memory (both bases) 57 s, compiled 185 s (two
# inductor compiles, 81 s and 70 s; it now compiles diffusers' UNet too: about 260 s). The whole list does not fit
# one 600 s call; 15 minutes of device time hold two calls. The timing and memory tables are rewritten after each
# base, so a step stopped at its limit keeps the bases it finished. Everything was measured before the fix of the
# per-step wait for the GPU (commit f7b48ca) and before the compiled inputs kept their addresses; to measure after
# (issue 20 item 4), two calls back to back while the machine is warm:
#   GPU_CHECKS_BUDGET_S=570 GPU_CHECKS_STEPS="inference-memory inference-timing" bash ...
#   GPU_CHECKS_BUDGET_S=570 GPU_CHECKS_STEPS="cuda-tests train-transformer per-call flux-syncs compiled-graphs" bash ...
# (per-call, µs per attention call on the GPU, about 30 s; flux-syncs, the FLUX path's waits for the GPU after
# commit 44d37cf, tiny models, seconds; compiled-graphs is `compiled` under CUDA graphs,
# `--mode reduce-overhead`, where the adapter's few kernels per layer cost no launches; `compiled`, the default
# mode, when time is left; `compiled-sdxl`, SDXL at 1024 px under CUDA graphs, three SDXL compiles, in a call of its
# own in a later session.)
# Smoke test on a CPU (every step's wiring, tiny models, quick settings; a few minutes):
#   GPU_CHECKS_SMOKE=1 OMP_NUM_THREADS=1 bash scripts/gpu_checks.sh
set -euo pipefail
shopt -s nullglob
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
out="$(mkdir -p "${OUT:-out/gpu}" && cd "${OUT:-out/gpu}" && pwd)"
python="${PYTHON:-python3}"
export PYTHONPATH="$root/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
all_steps="env cuda-tests train-transformer train inference-timing inference-memory per-call flux-syncs compiled
           compiled-graphs compiled-sdxl"
all_steps="$(echo $all_steps)"  # one line, the names space-separated
steps="${GPU_CHECKS_STEPS:-$all_steps}"
# Temporary files in RAM when it has room: the SDXL training rows write ~7 GB of checkpoint and adapter files at their
# end, and the inference benchmark writes each adapter to a file that diffusers and ipadapter then read.
if [[ -d /dev/shm ]] && (($(df --output=avail -k /dev/shm | tail -1) > 32 * 1024 * 1024)); then
  export TMPDIR=/dev/shm
fi

if [[ "${GPU_CHECKS_SMOKE:-0}" == 1 ]]; then
  tag=cpu-smoke
  budget="${GPU_CHECKS_BUDGET_S:-1200}"
  train=(--tiny)
  inference=(--quick --device cpu --dtype float32)
  timing=(--no-memory --repeats 2)
  memory=(--no-timing --memory-repeats 1)
  per_call=(--repeats 2 --calls 20)
  flux=(--device cpu --dtype float32)
  compiled=(--device cpu --dtype float32 --latents 8 --steps 2 --repeats 2 --backend eager)
  graphs=(--mode reduce-overhead)  # the eager backend ignores the mode: the wiring only (CUDA graphs need CUDA)
  compiled_sdxl=(--arch sdxl --device cpu --dtype float32 --latents 8 --steps 2 --repeats 2 --backend eager)
else
  tag=cuda
  budget="${GPU_CHECKS_BUDGET_S:-540}"
  train=()
  inference=(--device cuda --dtype float16 --resolution 512 --sdxl-resolution 1024
             --vith-layers 32 --bigg-layers 48)
  timing=(--steps 30 --sdxl-steps 30 --repeats 3 --no-memory)
  memory=(--steps 2 --sdxl-steps 2 --no-timing)  # a peak does not depend on the step count (same shapes each step)
  per_call=(--device cuda --dtype float16 --repeats 15 --calls 300)
  flux=(--device cuda --dtype bfloat16)
  compiled=(--device cuda --dtype float16 --latents 64 --steps 30 --repeats 5)
  graphs=(--mode reduce-overhead)
  compiled_sdxl=(--arch sdxl --device cuda --dtype float16 --latents 128 --steps 30 --repeats 3)
fi

results="$(mktemp -d)"  # the tables land here and are copied to $OUT at the end: few files while steps run
rm -rf "$out/logs" "$out/logs.txt" "$out/summary.md"
mkdir -p "$out/logs"
start=$SECONDS
summary=("| step | exit | seconds | limit (s) |" "|---|---|---|---|")
failed=0

# step NAME CAP COMMAND...: run COMMAND for at most CAP seconds or what is left of the budget, whichever is less.
step() {
  local name=$1 cap=$2 left limit began rc=0
  shift 2
  [[ " $steps " == *" $name "* ]] || return 0
  left=$((budget - (SECONDS - start)))
  limit=$((cap < left ? cap : left))
  if ((limit < 30)); then
    echo "== $name: skipped, ${left} s of the budget left" | tee "$out/logs/$name.log"
    summary+=("| $name | skipped (${left} s left) | 0 | – |")
    failed=1
    return 0
  fi
  echo "== $name (at most ${limit} s): $*"
  began=$SECONDS
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$out/logs/$name.log" || rc=$?
  if ((rc == 124 || rc == 137)); then
    summary+=("| $name | $rc (timed out) | $((SECONDS - began)) | $limit |")
  else
    summary+=("| $name | $rc | $((SECONDS - began)) | $limit |")
  fi
  ((rc == 0)) || failed=1
}

versions='import torch, diffusers, transformers, accelerate, peft
print("torch", torch.__version__, "| CUDA", torch.version.cuda, "| available:", torch.cuda.is_available())
if torch.cuda.is_available():
    print("device:", torch.cuda.get_device_name(), "| capability", torch.cuda.get_device_capability())
print("diffusers", diffusers.__version__, "| transformers", transformers.__version__, "| accelerate",
      accelerate.__version__, "| peft", peft.__version__)'

step env 60 bash -c 'if command -v nvidia-smi >/dev/null; then nvidia-smi; else echo "no nvidia-smi here"; fi
                     "$0" -c "$1"' "$python" "$versions"
step cuda-tests 120 "$python" -m pytest -p no:randomly -p no:cacheprovider -rs tests/test_offload.py
step train-transformer 180 "$python" -m pytest -p no:randomly -p no:cacheprovider -rs tests/test_train_transformer_*.py
step train 180 "$python" benchmarks/train_gpu.py "${train[@]}" --out "$results/train-$tag.md"
step inference-memory 200 "$python" benchmarks/inference.py "${inference[@]}" "${memory[@]}" \
  --out "$results/inference-$tag-memory.md"
step inference-timing 400 "$python" benchmarks/inference.py "${inference[@]}" "${timing[@]}" \
  --archs "${GPU_CHECKS_ARCHS:-sd15,sdxl}" --out "$results/inference-$tag-timing.md"
step per-call 90 "$python" benchmarks/per_call.py "${per_call[@]}" --out "$results/per-call-$tag.md"
step flux-syncs 90 "$python" benchmarks/flux_syncs.py "${flux[@]}" --out "$results/flux-syncs-$tag.md"
step compiled 540 "$python" benchmarks/compiled.py "${compiled[@]}" --out "$results/compiled-$tag.md"
step compiled-graphs 540 "$python" benchmarks/compiled.py "${compiled[@]}" "${graphs[@]}" \
  --out "$results/compiled-graphs-$tag.md"
step compiled-sdxl 540 "$python" benchmarks/compiled.py "${compiled_sdxl[@]}" "${graphs[@]}" \
  --out "$results/compiled-sdxl-$tag.md"

{
  echo "# GPU checks ($tag): $((SECONDS - start)) s of a ${budget} s budget${TMPDIR:+, temporary files in $TMPDIR}"
  echo
  printf '%s\n' "${summary[@]}"
  for table in "$results"/*.md; do
    echo
    sed 's/^# /## /' "$table"
  done
} > "$out/summary.md"
for table in "$results"/*.md; do cp "$table" "$out/"; done
for log in "$out"/logs/*.log; do
  printf '\n===== %s =====\n' "$(basename "$log" .log)"
  cat "$log"
done > "$out/logs.txt"
rm -rf "$out/logs" "$results"
cat "$out/summary.md"
echo
printf '%s\n' "${summary[@]}"  # again, last: the device tool returns only the output's tail
echo "results in $out: $(cd "$out" && ls | tr '\n' ' ')"
exit "$failed"
