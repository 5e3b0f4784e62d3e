"""`meraser bench MATRIX.yaml`: models x fingerprints x attacks x seeds x settings, one resumable matrix.

Every cell is an experiment (`meraser.runner`) in its own folder, OUT/cells/<cell id>/: `meraser` runs erase and
recover as stages (the rows of the paper's Table 1, with FSR after every epoch), any other registered attack runs
as the experiment's `attack:` stage (Tables 2 and 3). What several cells need is made once, before them, and shared:
each fingerprinted model (per model, fingerprint and seed, in SHARED/fingerprints/) and MEraser's transferable erase
adapter (per model and seed, in SHARED/shared/), where SHARED is the matrix's `shared` folder (its `out` by default);
cells also share their base and fingerprinted evaluations and identical erase/recover stages there.

The results store, OUT/results.jsonl, holds one row per cell and stage, with the cell's full settings, package
versions, seed, wall time and peak memory. Only this driver writes it, and only after a cell has finished, all of
the cell's rows in one append: a killed bench leaves finished cells in the store and at most one cell half-done in
its folder, which the next run finishes (its stages resume or redo cleanly, see runner.py) before its rows are
written. A cell whose rows are in the store is never run again, so no row is written twice.

plan.py: the matrix and its cells; shared.py: what cells share, and stale cells; execute.py: running cells, the
store and the executors.
"""

from meraser.bench.execute import (BENCH_ENTRIES, EXECUTORS, FAILED, Executor, PeakMemory, check_bench_folder,
                                   finished_cells, record, release_memory, run_bench, run_cell, versions)
from meraser.bench.plan import (ERASE_RECOVER, RESULTS, Cell, Matrix, cells_table, check_models, describe, load_matrix,
                                plan_cells)
from meraser.bench.shared import (MADE, cell_experiment, fingerprint_folder, prepare_shared, shared_parts, shared_root,
                                  shared_work, stale_cells)

__all__ = ["BENCH_ENTRIES", "ERASE_RECOVER", "EXECUTORS", "FAILED", "MADE", "RESULTS", "Cell", "Executor", "Matrix",
           "PeakMemory", "fingerprint_folder", "shared_parts", "cell_experiment", "cells_table", "check_bench_folder",
           "check_models", "describe", "finished_cells", "load_matrix", "plan_cells", "prepare_shared", "record",
           "release_memory", "run_bench", "run_cell", "shared_root", "shared_work", "stale_cells", "versions"]
