"""Evaluation: the paper's metrics and benchmark protocols as one resumable run with a readable report.

Modules, in the order a run uses them: `protocols` (presets as data) → `manifests` (what to evaluate) →
`runner` (seeded, resumable generation) → `judges` / `extractors` (the measuring models) → `metrics`
(definitions) → `scoring` (metrics over the samples on disk) → `report` (results.json, markdown, grids, plots),
with the published numbers in `published`.
"""
