#!/bin/bash
# The whole efficacy table on a 2-core machine, as two single-threaded lanes (resumable: run it again).
#   bench/efficacy_lanes.sh [RESULTS]     # from the repository root (or a worktree of it at a fixed commit)
# Lane A trains the pretrained teachers, lane B the student worlds' chains (world, shards, teacher and its
# fold teachers, scores, audit, curation); then each lane trains rows (bench/efficacy.py --rows-only: the
# two processes share them through lock files). RESULTS defaults to docs/results/efficacy; logs in RESULTS/logs.
set -u
R=${1:-docs/results/efficacy}
PY=${PYTHON:-.venv/bin/python}
L=$R/logs
mkdir -p "$L"
NOISE="configs/efficacy/noise20.yaml configs/efficacy/noise40.yaml"
PAT="configs/efficacy/patterns20.yaml --rows configs/efficacy/rows_patterns.yaml"
SWEEP="configs/efficacy/noise20.yaml --rows configs/efficacy/sweep.yaml"
log() { echo "[$(date -u +%H:%M:%S)] $*"; }
rows() {  # every stage in order, twice: a stage its lane could not start yet (not prepared) is taken on the second pass
  for pass in 1 2; do
    for stage in "$NOISE --seeds 0" "$PAT --seeds 0" "$NOISE --seeds 1 2" "$PAT --seeds 1 2" "$SWEEP"; do
      $PY bench/efficacy.py $stage --rows-only --results "$R" >> "$L/rows_$1.log" 2>&1; log "lane $1 rc=$?: $stage"
    done
  done
}
rm -f "$L"/*.done
(
  $PY -m pipelines.cli run configs/efficacy/teacher.yaml >> "$L/prep_a.log" 2>&1; log "A teacher rc=$?"
  touch "$L/teacher.done"
  $PY -m pipelines.cli run configs/efficacy/teacher_patterns.yaml >> "$L/prep_a.log" 2>&1; log "A teacher_patterns rc=$?"
  until [ -e "$L/worlds.done" ]; do sleep 30; done
  $PY bench/efficacy.py $PAT --prepare-only --results "$R" >> "$L/prep_a.log" 2>&1; log "A prepare patterns rc=$?"
  rows A
) &
(
  for world in noise20 noise40 patterns20; do
    $PY -m pipelines.cli run configs/efficacy/$world.yaml >> "$L/prep_b.log" 2>&1; log "B $world rc=$?"; done
  touch "$L/worlds.done"
  until [ -e "$L/teacher.done" ]; do sleep 30; done
  $PY bench/efficacy.py $NOISE --prepare-only --results "$R" >> "$L/prep_b.log" 2>&1; log "B prepare noise rc=$?"
  rows B
) &
wait
for stage in "$NOISE" "$PAT" "$SWEEP"; do $PY bench/efficacy.py $stage --tables-only --results "$R" > /dev/null; done
$PY bench/verdict.py --results "$R" > /dev/null
log "done: tables in $R, verdict in $R/verdict.md"
