"""Speed benchmarks run from the CLI (`cmpq bench kernels`, `cmpq bench decode`); they write JSON lines and a
Markdown table (PROTOCOL's "Benchmark output")."""
