"""Evaluation: the paper's metrics and benchmark protocols as one resumable run with a readable report.

Modules, in the order a run uses them: `protocols` (presets as data) → `manifests` (what to evaluate) →
`runner` (seeded, resumable generation) → `judges` / `extractors` (the measuring models) → `metrics`
(definitions) → `scoring` (metrics over the samples on disk) → `report` (results.json, markdown, plots; image grids
from `grid`), with the published numbers in `published`. The miniature world's protocol (its references and
judges) lives in `ipadapter.miniature.protocol`: this package never imports the miniature.
"""
