"""moee-fast's benchmarks: a package, so that the reference paths and shared helpers are imported
by one name (`benchmarks.reference_path`, `benchmarks.helpers`) from the benchmark suites, the
scripts (`python -m benchmarks.gpu_report`) and the tests (pytest puts the repository root on
`pythonpath`). It is never installed with moee_fast."""
