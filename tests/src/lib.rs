//! Test support and benchmarks for mailbell (see tests/ and src/bin/).
