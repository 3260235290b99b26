#!/usr/bin/env bash
# Mutation testing of the core with mutmut 3: small bugs are put into the core modules one at a time and the fast
# core tests are run against each; a mutant no test fails on "survives". A developer's periodic check, not part of CI
# (the whole core takes hours on two cores): docs/testing.md has the results and the time it takes,
# docs/mutation-log.md every run's survivors.
#
#   scripts/mutation.sh                           # every core module
#   scripts/mutation.sh runtime.py layers.py      # some of them (paths under src/ipadapter/, globs allowed)
#
# Works from a fresh clone: mutmut (the "mutation" extra) is installed when missing. Runs in a scratch copy of src/ and
# tests/ (MUTATION_DIR, default a new temporary folder, kept for `cd $MUTATION_DIR && mutmut browse`), so the
# working tree never holds a mutant. A reused MUTATION_DIR resumes: mutmut keeps the verdicts of mutants whose
# function is unchanged (it keys them by a hash of the function) and tests only the rest; FRESH=1 starts over, and
# RETEST=1 tests the survivors and the mutants with no test again (mutmut keeps a verdict when only the tests
# changed), except survivors argued equivalent or killed outside the run, which would only survive again at the highest
# cost. The score counts killed and timed-out mutants over all tested ones, leaving out those listed in
# scripts/mutation-equivalent.txt (argued equivalent in docs/mutation-log.md), and counts as killed those listed in
# scripts/mutation-killed-outside.txt (killed by a test the run cannot run, checked by hand). Exits 1 below MIN_SCORE.
# Environment: PYTHON (default python), JOBS (mutants run in parallel, default 1), NICE (default 19), MIN_SCORE (95),
# TESTS (test files under tests/, space-separated, instead of the core's: for modules outside the core), MUTANTS
# (mutant names or globs, space-separated, to run only those: "ipadapter.pipelines.x__check_parts*" for the functions
# a change touched; the score counts the mutants run).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
python="${PYTHON:-python}"
# The core: the UNet adapter (attention, attaching, checkpoints, projections, conditioning, encoders, the prompter)
# and the transformer adapters of FLUX and SD 3.5 in dit/, all but their training loop.
core=(attention.py plan.py groups.py kv.py token_grids.py adapter.py attach.py runtime.py layers.py checkpoint.py
      "projection/*" "conditioning/*" encoders.py prompter.py dit/adapter.py dit/attach.py dit/blocks.py dit/checkpoint.py
      dit/flux_attention.py dit/joint_attention.py dit/layouts.py dit/plan.py dit/step.py)
# The tests of the core: every test file that runs core code, except the app, training, evaluation, miniature and
# benchmark tests (the CLI tests run loading, FaceID embeddings and saved-embedding files, which only the CLI reads).
# The compiled path is checked by test_compiled_plan.py (its plan run without dynamo): test_compile.py counts dynamo's
# graphs, and dynamo traces mutmut's wrapper around every mutated function, which recompiles on each call.
core_tests=(test_core_regressions.py test_runtime.py test_projection_shapes.py test_attention.py test_parity_diffusers.py
       test_checkpoint.py test_prompter.py test_pipelines.py test_embed_cache.py test_conditioning_attention.py
       test_conditioning_combine.py test_conditioning_embeds_file.py test_conditioning_images.py
       test_conditioning_masks.py test_conditioning_negatives.py test_conditioning_presets.py
       test_conditioning_schedules.py test_attach.py test_load.py test_variants.py test_dit_sd3.py test_dit_flux.py
       test_dit_attach.py test_compiled_plan.py test_face_embedding.py test_encoder_loading.py test_prompter_faceid.py
       test_cli_generate.py test_cli_extras.py test_device_reads.py)
read -r -a tests <<< "${TESTS:-${core_tests[*]}}"
# Tests that run the package in a child interpreter: mutmut's trampoline there has no configuration (its stats run
# fails on them) and cannot switch mutants, so they can neither kill nor keep one.
in_child=(test_load.py::test_readme_python_example_runs_as_written
          test_cli_extras.py::test_core_commands_run_without_the_extras
          test_batch_generate.py::test_a_killed_run_resumes_to_the_images_of_an_uninterrupted_one
          test_batch_generate.py::test_two_processes_write_the_images_and_index_of_one
          test_batch_generate.py::test_evaluate_under_two_processes_writes_the_results_of_one
          test_bad_input.py::test_text_files_are_utf8_whatever_the_locale
          test_app.py::test_page_generates_and_refuses_a_non_image
          test_true_cfg.py::test_an_index_is_read_as_utf8_whatever_the_locale)

if ! "$python" -c "import mutmut" 2>/dev/null; then
  "$python" -m pip install --quiet "mutmut>=3.8,<4"
fi
mutmut="$("$python" -c 'import os, sys; print(os.path.dirname(sys.executable))')/mutmut"
[ -x "$mutmut" ] || mutmut=mutmut

work="${MUTATION_DIR:-$(mktemp -d -t ipadapter-mutation.XXXXXX)}"
mkdir -p "$work"
rm -rf "$work/src" "$work/tests" "$work/examples"
[ "${FRESH:-0}" = 1 ] && rm -rf "$work/mutants"
(cd "$root" && tar --exclude=__pycache__ -cf - src tests pyproject.toml README.md examples) | tar -xf - -C "$work"
# mutmut forks each mutant's child from a parent that ran every test, so the children share tqdm's lock between
# processes (a POSIX semaphore): a child killed at its timeout while drawing a progress bar leaves it held, and every
# later child hangs at its first bar, each "timing out" at zero CPU. The scratch copy's bars lock within a process.
printf '\nimport threading  # noqa: E402\n\nfrom tqdm import tqdm  # noqa: E402\n\ntqdm.set_lock(threading.RLock())\n' \
  >> "$work/tests/conftest.py"
# mutmut regenerates a file's mutants only when its copy under mutants/ is older than the source. A module that an
# earlier run in this folder copied unmutated (it was not selected then) would stay unmutated: drop such copies. Which
# tests run which function was learnt for the earlier selection of modules and tests and for the code as it was then:
# mutmut runs only those tests on a mutant, so a test added since, or a function added since, would never run. A
# changed selection or any change in src/ or tests/ learns it again (one run of the tests; verdicts stay).
selection="${*:-${core[*]}} | ${tests[*]} | $(cd "$root" && find src tests -name '*.py' | LC_ALL=C sort | xargs cat |
  sha256sum | cut -d' ' -f1)"
if [ "$(cat "$work/selection.txt" 2>/dev/null)" != "$selection" ]; then
  rm -f "$work/mutants/mutmut-stats.json"
fi
echo "$selection" > "$work/selection.txt"
for m in "${@:-${core[@]}}"; do
  for f in "$work"/src/ipadapter/$m; do
    copy="$work/mutants/${f#"$work"/}"
    [ -e "$copy.meta" ] || rm -f "$copy"
  done
done
{
  echo "[mutmut]"
  echo "source_paths = src"
  echo "also_copy ="
  echo "    README.md"
  echo "    examples"
  echo "only_mutate ="
  for m in "${@:-${core[@]}}"; do echo "    src/ipadapter/$m"; done
  echo "pytest_add_cli_args_test_selection ="
  for t in "${tests[@]}"; do echo "    tests/$t"; done
  echo "pytest_add_cli_args ="
  echo "    -m"
  echo "    not slow"
  echo "    -p"
  echo "    no:cacheprovider"
  for t in "${in_child[@]}"; do echo "    --deselect"; echo "    tests/$t"; done
} > "$work/setup.cfg"

cd "$work"
if [ "${RETEST:-0}" = 1 ] && [ -d mutants ]; then
  "$python" - "$root/scripts/mutation-equivalent.txt" "$root/scripts/mutation-killed-outside.txt" <<'EOF'
import json, sys
from pathlib import Path

equivalent = {line.split("#")[0].strip()
              for path in sys.argv[1:] for line in Path(path).read_text().splitlines()} - {""}
for meta in Path("mutants").rglob("*.meta"):
    data = json.loads(meta.read_text())
    data["exit_code_by_key"] = {
        name: None if code == 33 or (code == 0 and name not in equivalent) else code
        for name, code in data["exit_code_by_key"].items()
    }
    meta.write_text(json.dumps(data))
EOF
fi
start=$(date +%s)
# The original src/ must not be importable: mutmut puts mutants/src first on sys.path.
env -u PYTHONPATH HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 \
  nice -n "${NICE:-19}" "$mutmut" run --max-children "${JOBS:-1}" ${MUTANTS:-}
elapsed=$(( $(date +%s) - start ))
"$mutmut" export-cicd-stats >/dev/null
"$mutmut" results --all true > results.txt || true
"$python" - "$root/scripts/mutation-equivalent.txt" "$root/scripts/mutation-killed-outside.txt" "$elapsed" \
  "${MIN_SCORE:-95}" <<'EOF'
import json, sys
from pathlib import Path


def listed(path: str) -> set[str]:
    return {line.split("#")[0].strip() for line in Path(path).read_text().splitlines()} - {""}


equivalent, outside = listed(sys.argv[1]), listed(sys.argv[2])
stats = json.loads(Path("mutants/mutmut-cicd-stats.json").read_text())
status = dict(l.strip().rsplit(": ", 1) for l in Path("results.txt").read_text().splitlines() if ": " in l)
alive = {name: s for name, s in status.items() if s not in ("killed", "timeout", "skipped", "not checked")}
unrun = sum(s == "not checked" for s in status.values())  # left out by MUTANTS
argued = [name for name, s in alive.items() if name in equivalent and s == "survived"]
elsewhere = [name for name, s in alive.items() if name in outside and s == "survived"]
tested = stats["total"] - stats["skipped"] - len(argued) - unrun
killed = stats["killed"] + stats["timeout"] + len(elsewhere)
score = 100.0 * killed / tested if tested else 0.0
print(f"mutants: {stats['total']} (killed {stats['killed']}, timeout {stats['timeout']}, survived {stats['survived']}, "
      f"no tests {stats['no_tests']}, suspicious {stats['suspicious']}, skipped {stats['skipped']}; "
      f"{len(argued)} argued equivalent, {len(elsewhere)} killed by tests outside the run"
      f"{f', {unrun} not run' if unrun else ''}) in {sys.argv[3]} s")
print(f"score: {score:.1f}% of {tested} non-equivalent mutants killed")
for name, s in alive.items():
    if name not in argued and name not in elsewhere:
        print(f"  {s}: {name}")
# A listed mutant that is killed, or no longer exists, means its function changed and the list's numbers now name
# other mutants: every entry of that function must be read again (a renumbered entry can hide a real survivor).
run = {name.rsplit(".", 1)[0] for name in status}  # the modules this run mutated
stale = sorted(name for name in equivalent | outside
               if status.get(name) in ("killed", "timeout") or (name not in status and name.rsplit(".", 1)[0] in run))
for name in stale:
    print(f"  listed but killed or gone, re-check its function's entries: {name}")
sys.exit(0 if score >= float(sys.argv[4]) else 1)
EOF
echo "details: cd $work && $mutmut results / $mutmut show NAME / $mutmut browse"
