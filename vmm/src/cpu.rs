//! vCPU threads.
